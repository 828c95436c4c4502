"""The cookie key file: private creation, race-free sharing, refusal, rotation, watching."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synproxy import keys
from synproxy.keys import KeyFileError, KeyFileWatcher, KeyRing, load, load_or_create, rotate

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

NOW = 1_800_000_000.5


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def leftovers(d: Path) -> list[str]:
    return sorted(n.name for n in d.iterdir() if n.name.endswith(".tmp"))


def test_create_private_file_and_dir(tmp_path: Path) -> None:
    path = tmp_path / "synproxy" / "cookie.key"  # the key directory is made, its parent exists
    old_umask = os.umask(0o022)
    try:
        ring = load_or_create(path, NOW)
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert ring.generation == 1 and ring.previous is None and ring.rotated_at == NOW
    assert len(ring.current) == 32 and ring.current != bytes(32)
    assert leftovers(path.parent) == []
    text = path.read_text()
    assert "version=1" in text and f"current={ring.current.hex()}" in text


def test_reload_gives_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "cookie.key"
    first = load_or_create(path, NOW)
    assert load_or_create(path, NOW + 999) == first
    assert load(path) == first


def test_load_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load(tmp_path / "nope.key")


def _worker(path: str, barrier: Barrier, out: multiprocessing.Queue[str]) -> None:
    barrier.wait()
    out.put(load_or_create(path, NOW).current.hex())


@pytest.mark.parametrize("round_", range(3))
def test_workers_racing_to_create_end_with_one_key(tmp_path: Path, round_: int) -> None:
    path = tmp_path / "keys" / "cookie.key"  # the directory is created in the race too
    n = 8
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    out: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(path), barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [out.get(timeout=30) for _ in range(n)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(set(got)) == 1
    assert got[0] == load(path).current.hex()
    assert leftovers(path.parent) == []
    assert mode(path) == 0o600


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o660, 0o644, 0o620, 0o602, 0o610])
def test_group_or_world_access_is_refused(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "cookie.key"
    load_or_create(path, NOW)
    os.chmod(path, bad_mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create(path, NOW)
    with pytest.raises(KeyFileError):
        rotate(path, NOW)  # and never rewritten with the bad mode kept
    os.chmod(path, 0o600)
    load_or_create(path, NOW)


def test_another_owner_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cookie.key"
    load_or_create(path, NOW)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(KeyFileError, match="owned by uid"):
        load_or_create(path, NOW)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cookie.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        load_or_create(tmp_path / "cookie.key", NOW)


GOOD = "version=1\ngeneration=3\nrotated_at=1800000000.5\ncurrent=" + "ab" * 32 + "\nprevious=" + "cd" * 32 + "\n"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "\x00\x01\x02",
        "version=2\ngeneration=1\nrotated_at=1\ncurrent=" + "ab" * 32 + "\n",  # a future version
        "generation=1\nrotated_at=1\ncurrent=" + "ab" * 32 + "\n",  # no version
        GOOD.replace("ab" * 32, "ab" * 31),  # short secret
        GOOD.replace("ab" * 32, "zz" * 32),  # not hex
        GOOD.replace("generation=3", "generation=x"),
        GOOD.replace("generation=3", "generation=0"),
        GOOD.replace("rotated_at=1800000000.5", "rotated_at=nan"),
        GOOD.replace("rotated_at=1800000000.5\n", ""),
        GOOD + "current=" + "ab" * 32 + "\n",  # twice
        GOOD + "colour=blue\n",  # unknown field
        GOOD + "no equals sign\n",
        GOOD + "#" * 5000,  # too big
        GOOD.replace("version=1", "version=1\u00e9"),  # not ASCII
    ],
)
def test_corrupt_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cookie.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, text.encode("utf-8"))
    os.close(fd)
    with pytest.raises(KeyFileError, match="corrupt"):
        load_or_create(path, NOW)
    assert path.read_bytes() == text.encode("utf-8")  # never overwritten


def test_good_file_parses(tmp_path: Path) -> None:
    ring = keys.loads(GOOD + "# a comment\n\n")
    assert ring == KeyRing(current=b"\xab" * 32, previous=b"\xcd" * 32, rotated_at=1800000000.5, generation=3)


@given(
    current=st.binary(min_size=32, max_size=32),
    previous=st.none() | st.binary(min_size=32, max_size=32),
    rotated_at=st.floats(0, 1e11),
    generation=st.integers(1, 2**63),
)
def test_format_round_trip(current: bytes, previous: bytes | None, rotated_at: float, generation: int) -> None:
    ring = KeyRing(current=current, previous=previous, rotated_at=rotated_at, generation=generation)
    assert keys.loads(keys.dumps(ring)) == ring


def test_rotate_keeps_previous(tmp_path: Path) -> None:
    path = tmp_path / "cookie.key"
    first = load_or_create(path, NOW)
    second = rotate(path, NOW + 100)
    assert second.previous == first.current and second.current != first.current
    assert second.generation == 2 and second.rotated_at == NOW + 100
    assert load(path) == second and mode(path) == 0o600
    third = rotate(path, NOW + 200)
    assert third.previous == second.current and third.generation == 3
    assert load(path) == third
    assert leftovers(tmp_path) == []
    assert third.age(NOW + 260) == 60


def test_rotate_creates_a_missing_file_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "new" / "cookie.key"
    with pytest.raises(KeyFileError, match="does not exist: nothing to rotate"):
        rotate(path, NOW)  # a mistyped --key-file must not get a key no worker reads
    assert not path.parent.exists()
    ring = rotate(path, NOW, create=True)
    assert ring.generation == 1 and load(path) == ring and mode(path.parent) == 0o700


def test_no_directory_tree_from_a_typo(tmp_path: Path) -> None:
    """Only the key's own directory is created, never missing parents."""
    for make in (lambda p: load_or_create(p, NOW), lambda p: rotate(p, NOW, create=True)):
        with pytest.raises(KeyFileError, match="does not exist"):
            make(tmp_path / "typo" / "sub" / "cookie.key")
        assert not (tmp_path / "typo").exists()


def test_watcher_sees_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "cookie.key"
    load_or_create(path, NOW)
    watcher = KeyFileWatcher(path)
    assert watcher.poll() is None
    rotated = rotate(path, NOW + 1)
    assert watcher.poll() == rotated
    assert watcher.poll() is None
    again = rotate(path, NOW + 2)
    assert watcher.poll() == again


def test_watcher_with_known_ring_does_not_miss_an_early_rotation(tmp_path: Path) -> None:
    path = tmp_path / "cookie.key"
    ring = load_or_create(path, NOW)
    rotated = rotate(path, NOW + 1)  # before the watcher exists
    watcher = KeyFileWatcher(path, known=ring)
    assert watcher.poll() == rotated
    assert watcher.poll() is None
    assert KeyFileWatcher(path, known=rotated).poll() is None


def test_watcher_ignores_a_touch_and_survives_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "cookie.key"
    ring = load_or_create(path, NOW)
    watcher = KeyFileWatcher(path, known=ring)
    os.utime(path, ns=(1, 1))
    assert watcher.poll() is None  # same keys
    os.chmod(path, 0o644)
    assert watcher.poll() is None and watcher.last_error and "chmod" in watcher.last_error
    os.chmod(path, 0o600)
    path.unlink()
    assert watcher.poll() is None and watcher.last_error
    rotated = rotate(path, NOW + 5, create=True)  # recreated by a rotation
    assert watcher.poll() == rotated and watcher.last_error is None


def test_keyring_hides_secrets_and_checks_lengths() -> None:
    ring = KeyRing(current=b"\x11" * 32, previous=b"\x22" * 32, rotated_at=NOW, generation=7)
    assert "11" * 8 not in repr(ring) and "22" * 8 not in repr(ring)
    assert len(ring.key_id) == 8 and ring.key_id == KeyRing(b"\x11" * 32, None, 0.0).key_id
    with pytest.raises(ValueError):
        KeyRing(current=b"short", previous=None, rotated_at=NOW)
