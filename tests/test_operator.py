"""The operator's commands against a real lab: probe, status, key rotate, config file, env vars, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .e2e import SINK_PORT, eventually, proxied

SYNPROXY = str(Path(sys.executable).parent / "synproxy")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYNPROXY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.e2e
def test_probe_status_and_key_rotation() -> None:
    with proxied("gateway", start=False) as px:
        # probe the server itself (nothing in between yet), shaped to window scale 2
        px.lab.sysctl("server", "net.ipv4.tcp_rmem", "4096 131072 212992")
        px.restart_server("--rcvbuf", "200000")
        out = px.lab.run("client", [SYNPROXY, "probe", f"{px.server_addr(4)}:8080"]).stdout
        assert "mss 1460, window scale 2, SACK on, timestamps on" in out, out
        assert "synproxy run --mss 1460 --wscale 2" in out
        px.start_proxy()
        px.client("many", px.url(4, "/"), "--count", "20", "--concurrency", "2")
        status = px.lab.run("router", [SYNPROXY, "status", "--metrics-addr", f"127.0.0.1:{px.metrics_port}",
                                       "--interval", "0.5"]).stdout
        assert "1 worker(s) answering" in status and "established" in status and "state           normal" in status
        rotated = px.lab.run("router", [SYNPROXY, "key", "rotate", "--key-file", str(px.key_file)]).stdout
        assert "generation 2" in rotated
        assert "key file changed; reloaded" in eventually(px.log, lambda log: "reloaded" in log)
        res = px.client("chunks", px.server_addr(4), str(SINK_PORT), "--chunks", "3,5")
        assert res["ok"]
        # A broken key file: the keys in use stay, and the metrics and status say so (before: only the log).
        good = px.key_file.read_bytes()
        assert px.metrics()["synproxy_cookie_key_file_ok"] == 1
        px.key_file.write_text("garbage\n")
        key_file_ok = lambda: px.metrics()["synproxy_cookie_key_file_ok"]  # noqa: E731
        assert eventually(key_file_ok, lambda ok: ok == 0) == 0
        status = px.lab.run("router", [SYNPROXY, "status", "--metrics-addr", f"127.0.0.1:{px.metrics_port}",
                                       "--interval", "0.2"]).stdout
        assert "the key file is missing or unusable (see the log)" in status, status
        assert "is corrupt" in px.log() and "keeping the keys in use" in px.log()
        assert px.client("get", px.url(4, "/"))["status"] == 200  # served with the keys in use
        px.key_file.write_bytes(good)
        assert eventually(key_file_ok, lambda ok: ok == 1) == 1


def test_config_file_and_environment(tmp_path: Path) -> None:
    """Keys of the TOML file and SYNPROXY_* variables reach the options; flags win over both."""
    conf = tmp_path / "synproxy.toml"
    conf.write_text('port = [8443, 8080]\nqueue = 4\nmode = "gateway"\n')
    out = cli("--config", str(conf), "rules", "install", "--dry-run", "--backend", "iptables").stdout
    assert "--dports 8080,8443" in out and "--queue-num 4" in out and "--dport" not in out.replace("--dports", "")
    env = cli("--config", str(conf), "rules", "install", "--dry-run", "--backend", "iptables",
              env={"SYNPROXY_QUEUE": "9"}).stdout
    assert "--queue-num 9" in env
    flag = cli("--config", str(conf), "rules", "install", "--dry-run", "--backend", "iptables", "--queue", "11",
               env={"SYNPROXY_QUEUE": "9"}).stdout
    assert "--queue-num 11" in flag
    conf.write_text("prot = 1\n")
    bad = cli("--config", str(conf), "run")
    assert bad.returncode == 2 and bad.stderr.strip() == f"synproxy: unknown key(s) in {conf}: prot"
    missing = cli("--config", str(tmp_path / "nope.toml"), "run")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    hex_mark = cli("rules", "install", "--dry-run", "--backend", "iptables", "--port", "80", "--mark", "0x7").stdout
    assert "--mark 0x7 " in hex_mark  # the mark as the README writes it, in hex
    conf.write_text("port = 8443\n")  # one port without a list is a list of one
    assert "--dport 8443 " in cli("--config", str(conf), "rules", "install", "--dry-run", "--backend", "iptables").stdout
    conf.write_text('port = [8443]\nqueue = "abc"\nwscale = 15\n')
    bad = cli("--config", str(conf), "rules", "install", "--dry-run")  # the file's key is named, not an env var
    assert bad.returncode == 2 and bad.stderr == f'synproxy: queue = "abc" in {conf}: must be a whole number\n'
    conf.write_text('port = [8443]\nwscale = 15\n')
    bad = cli("--config", str(conf), "run")
    assert bad.returncode == 2 and bad.stderr == f"synproxy: wscale = 15 in {conf}: 15 is outside 0..14\n"
    # A limit the file sets wrong is blamed on the file, one from the environment on its variable.
    conf.write_text('port = [8443]\nmax_pending = -1\n')
    bad = cli("--config", str(conf), "run")
    assert bad.returncode == 2 and bad.stderr == (
        f"synproxy: max_pending in {conf}: --max-pending must be 0 (unlimited) or more, got -1\n")
    bad = cli("run", "--port", "8443", env={"SYNPROXY_MAX_PENDING": "-1"})
    assert bad.returncode == 2 and bad.stderr == (
        "synproxy: --max-pending must be 0 (unlimited) or more, got -1 (from SYNPROXY_MAX_PENDING)\n")


@pytest.mark.parametrize(("text", "message"), [
    # click alone took these as 1, 2 and True: shedding at one waiting SYN, two workers, fail-open
    ("overload_backlog = true", "overload_backlog = true in {conf}: must be a whole number"),
    ("workers = 2.9", "workers = 2.9 in {conf}: must be a whole number"),
    ('queue_bypass = "yes"', 'queue_bypass = "yes" in {conf}: must be true or false'),
    ('port = "eighty"', 'port = "eighty" in {conf}: must be a whole number'),
    ("backend_timeout = true", "backend_timeout = true in {conf}: must be a number"),
    ("idle_timeout = nan", "idle_timeout = nan in {conf}: nan is not a finite number"),
    # what one call does is no configuration: the rules unit "succeeded" and installed nothing
    ("dry_run = true", "unknown key(s) in {conf}: dry_run"),
    ("replace = true\ninterval = 2.0", "unknown key(s) in {conf}: interval, replace"),
])
def test_config_file_values_of_the_wrong_kind_are_refused(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "synproxy.toml"
    conf.write_text(f"port = [8443]\n{text}\n" if not text.startswith("port") else text + "\n")
    for command in (["run"], ["rules", "install", "--backend", "iptables"]):
        bad = cli("--config", str(conf), *command)
        assert bad.returncode == 2 and bad.stderr == f"synproxy: {message.format(conf=conf)}\n", (command, bad.stderr)


def test_not_root_is_one_clear_line() -> None:
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYNPROXY, "run",
                          "--port", "8080"], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip() == "synproxy: synproxy run needs root (or CAP_NET_ADMIN and CAP_NET_RAW); run it with sudo"


def test_bad_values_are_one_line_errors() -> None:
    for args, needle in ((["run", "--port", "8080", "--wscale", "15"], "15 is outside 0..14"),
                         (["run", "--port", "8080", "--metrics-addr", "nohostport"], "metrics address must be HOST:PORT"),
                         (["run", "--port", "8080", "--source-prefix-v4", "40"], "40"),
                         (["probe", "localhost"], "HOST:PORT"),
                         (["run", "--port", "8080", "--metrics-addr", "fd00::1:9531"], "(IPv6: [ADDR]:PORT)"),
                         (["rules", "install", "--dry-run", "--port", "80", "--mark", "zz"], "not a number"),
                         (["rules", "install", "--dry-run", "--port", "80", "--mark", "0"], "outside 1..0xffffffff"),
                         # NaN passes any range check: it crashed run (idle) or was taken (backend)
                         (["run", "--port", "8080", "--idle-timeout", "nan"], "'nan' is not a finite number"),
                         (["run", "--port", "8080", "--backend-timeout", "nan"], "'nan' is not a finite number"),
                         (["status", "--interval", "nan"], "'nan' is not a finite number"),
                         # click's own checks: one line too (click writes four), no env var named for a flag
                         (["run", "--port", "8080", "--overload-backlog", "-1"],
                          "synproxy: Invalid value for '--overload-backlog': -1 is not in the range 0<=x<=1023. "
                          "(see synproxy run --help)"),
                         (["run", "--config", "x"], "No such option '--config'")):
        res = cli(*args)
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)
        assert res.stderr.startswith("synproxy: ") and res.stderr.count("\n") == 1, (args, res.stderr)



def test_capabilities_suffice_without_root() -> None:
    """As under the systemd unit: a non-root process holding CAP_NET_ADMIN may manage the rules."""
    lab_free = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+net_admin,+net_raw",
         "--ambient-caps=+net_admin,+net_raw", SYNPROXY, "rules", "show", "--backend", "iptables"],
        capture_output=True, text=True,
    )
    assert lab_free.returncode == 0, lab_free.stderr
    assert "needs root" not in lab_free.stderr


def test_key_rotate_warns_when_rotations_come_too_close(tmp_path: Path) -> None:
    """A cookie lives up to 128 s, and a worker may make old-key cookies 5 s after a rotation; the key
    before the previous rotation is not checked at all, so a second rotation within 133 s breaks
    handshakes in flight with the oldest key: say so."""
    key = str(tmp_path / "cookie.key")
    first, second = cli("key", "rotate", "--key-file", key, "--create"), cli("key", "rotate", "--key-file", key)
    assert first.returncode == second.returncode == 0 and not first.stderr and not second.stderr  # nothing to break
    third = cli("key", "rotate", "--key-file", key)
    assert third.returncode == 0 and "generation 3" in third.stdout
    assert third.stderr.startswith("warning: the previous rotation was 0 s ago") and "at most every 133 s" in third.stderr
