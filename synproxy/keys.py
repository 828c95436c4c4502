"""The cookie master secrets: a small key file shared by every worker on a host.

All worker processes (one per queue) must make and check cookies with the same
secret, since a client's ACK may reach another worker than its SYN did (queue
balancing changes, restarts). So the secret lives in a file, created once
(race-free between workers starting together), rotated atomically by
`synproxy key rotate`, and re-read by every worker through `KeyFileWatcher`.

File format (text, version 1; see docs/cookie.md)::

    # synproxy cookie key file; keep it private (mode 0600)
    version=1
    generation=2
    rotated_at=1800000000.25
    current=<64 hex digits>
    previous=<64 hex digits>      (absent before the first rotation)

`rotated_at` is the unix time at which `current` became current; the previous
secret is still accepted for two cookie slots after it (see cookie.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_KEY_FILE",
    "FORMAT_VERSION",
    "KEY_BYTES",
    "KeyFileError",
    "KeyFileWatcher",
    "KeyRing",
    "load",
    "load_or_create",
    "rotate",
]

log = logging.getLogger(__name__)

DEFAULT_KEY_FILE = Path("/var/lib/synproxy/cookie.key")
FORMAT_VERSION = 1
KEY_BYTES = 32
_MAX_FILE_SIZE = 4096  # a valid file is ~250 bytes; refuse to slurp anything big
_HEADER = "# synproxy cookie key file; keep it private (mode 0600). Format: docs/cookie.md\n"

PathLike = str | os.PathLike[str]


class KeyFileError(Exception):
    """The key file cannot be used; the message is one sentence for the operator."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The current master secret and, after a rotation, the one it replaced."""

    current: bytes = field(repr=False)
    previous: bytes | None = field(repr=False)
    rotated_at: float  # unix time at which `current` became current
    generation: int = 1  # 1 when created, +1 per rotation

    def __post_init__(self) -> None:
        if len(self.current) != KEY_BYTES or (self.previous is not None and len(self.previous) != KEY_BYTES):
            raise ValueError(f"cookie secrets must be {KEY_BYTES} bytes")

    def age(self, now: float) -> float:
        """Seconds since the current secret became current (for metrics and rotation policy)."""
        return now - self.rotated_at

    @property
    def key_id(self) -> str:
        """A short non-secret fingerprint of the current secret, to compare workers in logs."""
        return hashlib.blake2s(b"synproxy-key-id", key=self.current, digest_size=4).hexdigest()

    @classmethod
    def generate(cls, now: float) -> KeyRing:
        """A fresh ring with a random secret and no previous one."""
        return cls(current=secrets.token_bytes(KEY_BYTES), previous=None, rotated_at=now, generation=1)

    def rotated(self, now: float) -> KeyRing:
        """current -> previous, a fresh random current."""
        return KeyRing(
            current=secrets.token_bytes(KEY_BYTES),
            previous=self.current,
            rotated_at=now,
            generation=self.generation + 1,
        )


# ---------------------------------------------------------------- format


def dumps(ring: KeyRing) -> str:
    """The file's text for a ring."""
    lines = [
        _HEADER,
        f"version={FORMAT_VERSION}\n",
        f"generation={ring.generation}\n",
        f"rotated_at={ring.rotated_at!r}\n",
        f"current={ring.current.hex()}\n",
    ]
    if ring.previous is not None:
        lines.append(f"previous={ring.previous.hex()}\n")
    return "".join(lines)


def loads(text: str, where: str = "key file") -> KeyRing:
    """Parse the file's text strictly; anything unexpected is KeyFileError."""

    def bad(why: str) -> KeyFileError:
        return KeyFileError(f"{where} is corrupt ({why}); restore it or delete it to create a new key")

    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise bad("a line is not name=value")
        if name in fields:
            raise bad(f"{name} appears twice")
        fields[name] = value
    if fields.get("version") != str(FORMAT_VERSION):
        raise bad(f"version is {fields.get('version')!r}, this program reads version {FORMAT_VERSION}")
    unknown = set(fields) - {"version", "generation", "rotated_at", "current", "previous"}
    if unknown:
        raise bad(f"unknown field {sorted(unknown)[0]!r}")

    def secret(name: str) -> bytes:
        value = fields[name]
        if len(value) != 2 * KEY_BYTES:
            raise bad(f"{name} is not {KEY_BYTES} bytes of hex")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise bad(f"{name} is not hex") from None

    try:
        generation = int(fields["generation"])
        rotated_at = float(fields["rotated_at"])
        current = secret("current")
    except KeyError as missing:
        raise bad(f"{missing.args[0]} is missing") from None
    except ValueError:
        raise bad("generation or rotated_at is not a number") from None
    if generation < 1 or rotated_at != rotated_at or rotated_at in (float("inf"), float("-inf")):
        raise bad("generation or rotated_at is out of range")
    previous = secret("previous") if "previous" in fields else None
    return KeyRing(current=current, previous=previous, rotated_at=rotated_at, generation=generation)


# ---------------------------------------------------------------- file I/O


def _read(path: Path) -> tuple[KeyRing, os.stat_result]:
    """Read and check the file; FileNotFoundError passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise KeyFileError(
                f"key file {path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); fix its owner"
            )
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o});"
                f" run chmod 600 {path}"
            )
        data = os.read(fd, _MAX_FILE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_SIZE:
        raise KeyFileError(f"key file {path} is corrupt (larger than {_MAX_FILE_SIZE} bytes)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is corrupt (not ASCII text)") from None
    return loads(text, f"key file {path}"), st


def load(path: PathLike) -> KeyRing:
    """Read an existing key file (KeyFileError if it is missing or unusable)."""
    p = Path(path)
    try:
        return _read(p)[0]
    except FileNotFoundError:
        raise KeyFileError(f"key file {p} does not exist") from None
    except KeyFileError:
        raise
    except OSError as err:
        raise KeyFileError(f"key file {p} cannot be read: {err.strerror}") from None


def _ensure_dir(directory: Path) -> None:
    """Create the key's directory (0700) if missing, but not its parents: a path whose
    parent does not exist is more likely a typo than a wish for a new tree."""
    if directory.is_dir():
        return
    if not directory.parent.is_dir():
        raise KeyFileError(f"cannot create the key directory {directory}: {directory.parent} does not exist")
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return  # another worker made it
    os.chmod(directory, 0o700)  # against a umask that strips owner bits


def _write_temp(directory: Path, name: str, ring: KeyRing) -> Path:
    """Write the ring to a fresh private temp file in `directory`, synced to disk."""
    while True:
        tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            break
        except FileExistsError:
            continue
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, dumps(ring).encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write of the key file between processes (flock on the directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _os_error(p: Path, err: OSError) -> KeyFileError:
    return KeyFileError(f"key file {p} cannot be created or replaced: {err.strerror or err}")


def load_or_create(path: PathLike, now: float) -> KeyRing:
    """Read the key file, creating it (random secret, mode 0600) if missing.

    Creation is race-free without locks: the content is written to a private
    temp file and hard-linked to the final name, which fails if another process
    got there first; then everyone reads whichever file won.
    """
    p = Path(path)
    try:
        return _read(p)[0]
    except FileNotFoundError:
        pass
    except OSError as err:
        raise KeyFileError(f"key file {p} cannot be read: {err.strerror}") from None
    try:
        _ensure_dir(p.parent)
        tmp = _write_temp(p.parent, p.name, KeyRing.generate(now))
        try:
            os.link(tmp, p)
        except FileExistsError:
            pass  # another worker won the race; use its key
        finally:
            os.unlink(tmp)
        _fsync_dir(p.parent)
        return _read(p)[0]
    except KeyFileError:
        raise
    except OSError as err:
        raise _os_error(p, err) from None


def rotate(path: PathLike, now: float, create: bool = False) -> KeyRing:
    """Make a new current secret, keep the old one as previous; atomic replace.

    Workers pick the new file up through `KeyFileWatcher`; cookies made with the
    old secret stay valid for their normal lifetime. A missing file is an error
    (a mistyped path would otherwise get a key no worker reads) unless `create`.
    """
    p = Path(path)
    try:
        if not create and not p.exists():
            raise KeyFileError(f"key file {p} does not exist: nothing to rotate (check --key-file; "
                               "`synproxy run` creates it, `key rotate --create` makes a new one)")
        _ensure_dir(p.parent)
        with _dir_lock(p.parent):
            try:
                old = _read(p)[0]
            except FileNotFoundError:
                old = None
            ring = old.rotated(now) if old is not None else KeyRing.generate(now)
            tmp = _write_temp(p.parent, p.name, ring)
            try:
                os.rename(tmp, p)
            except BaseException:
                os.unlink(tmp)
                raise
            _fsync_dir(p.parent)
        return ring
    except KeyFileError:
        raise
    except OSError as err:
        raise _os_error(p, err) from None


def _signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KeyFileWatcher:
    """Notices a replaced key file; one `os.stat` per poll (call it about once a second).

    `known`: the ring the caller is using. If given, the first poll reports the
    file's ring when it differs (a rotation between loading and watching is not
    missed); otherwise the file as it is now is the baseline.
    """

    def __init__(self, path: PathLike, known: KeyRing | None = None) -> None:
        self.path = Path(path)
        self._known = known
        self._sig: tuple[int, int, int, int, int] | None = None
        self.last_error: str | None = None
        if known is None:
            try:
                self._known, st = _read(self.path)
                self._sig = _signature(st)
            except (OSError, KeyFileError) as err:
                self.last_error = str(err)

    def poll(self) -> KeyRing | None:
        """The new ring if the file changed to different keys, else None.

        A missing or unusable file keeps the old keys (logged once per change):
        a broken rotation must not take the proxy down.
        """
        try:
            sig = _signature(os.stat(self.path))
        except OSError as err:
            self._note_error(f"key file {self.path} cannot be read: {err.strerror}", None)
            return None
        if sig == self._sig:
            return None
        try:
            ring, st = _read(self.path)
        except (OSError, KeyFileError) as err:
            self._note_error(str(err), sig)
            return None
        self._sig = _signature(st)
        self.last_error = None
        if ring == self._known:
            return None
        self._known = ring
        return ring

    def _note_error(self, message: str, sig: tuple[int, int, int, int, int] | None) -> None:
        if message != self.last_error:
            log.warning("%s; keeping the keys in use", message)
        self.last_error = message
        self._sig = sig

