"""Start-up as systemd sees it (Type=notify): READY=1 only once every queue is bound and the rules
are in place, STOPPING=1 on the way out; a worker that cannot start is one clear line and a
non-zero exit, with no rules left behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from synproxy.daemon import READY_LINE
from synproxy.lab import Lab

from .e2e import SYNPROXY, bound_queues, synproxy_rules_in

pytestmark = pytest.mark.e2e

QUEUE = 500 + os.getpid() % 500


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """What systemd listens on (a path: the lab's namespaces share the file system)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(15)
        yield sock


def start(lab: Lab, tmp_path: Path, sock: socket.socket, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, NOTIFY_SOCKET=sock.getsockname())
    return lab.popen("server", [SYNPROXY, "run", "--port", "8080", "--queue", str(QUEUE), "--metrics-addr", "off",
                                "--key-file", str(tmp_path / "cookie.key"), *extra],
                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def serving_lines(out: str) -> dict[int, str]:
    """The "serving ports ... on queue Q" log line of each traffic queue Q in `out`."""
    found = (re.search(r"serving ports \S+ on queue (\d+),", line) for line in out.splitlines())
    return {int(m[1]): m.string for m in found if m}


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_once_bound_and_protected_stopping_on_the_way_out(lab: Lab, tmp_path: Path,
                                                                 notify_socket: socket.socket, workers: int) -> None:
    proc = start(lab, tmp_path, notify_socket, "--workers", str(workers))
    assert notify_socket.recv(100) == b"READY=1"
    # At that moment, not later: every worker's two queues are read and the rules send to them.
    assert bound_queues(lab) >= set(range(QUEUE, QUEUE + 2 * workers))
    assert synproxy_rules_in(lab, "server")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert notify_socket.recv(100) == b"STOPPING=1"
    assert proc.wait(20) == 0
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):  # one READY=1 for the service: the workers do not send their own
        print(notify_socket.recv(100))
    assert not synproxy_rules_in(lab, "server")
    # Each of several workers names itself in its log lines (they log the same events); a single
    # worker and the supervisor do not claim to be one.
    out = proc.stdout.read() if proc.stdout else ""
    assert set(serving_lines(out)) == {QUEUE + i for i in range(workers)}, out
    for line in out.splitlines():
        worker = re.search(r"on queue (\d+), SYNs|queue (\d+) stopped;", line)
        if worker and workers > 1:
            assert f" synproxy worker {int(worker[1] or worker[2]) - QUEUE} INFO " in line, out
        else:  # the supervisor's, or the single worker's
            assert " synproxy INFO " in line, out
    assert f" synproxy INFO {READY_LINE}" in out, out


def test_worker_that_cannot_bind_is_one_line_and_a_failed_start(lab: Lab, tmp_path: Path,
                                                                notify_socket: socket.socket) -> None:
    # Another process holds worker 1's traffic queue (QUEUE+1) and nothing of worker 0's.
    squatter = start(lab, tmp_path, notify_socket, "--no-rules", "--queue", str(QUEUE + 1), "--workers", "3",
                     "--worker-index", "0")
    assert notify_socket.recv(100) == b"READY=1"
    began = time.monotonic()
    res = lab.run("server", [SYNPROXY, "run", "--port", "8080", "--queue", str(QUEUE), "--workers", "2",
                             "--metrics-addr", "off", "--key-file", str(tmp_path / "cookie.key")],
                  check=False, timeout=30, env=dict(os.environ, NOTIFY_SOCKET=notify_socket.getsockname()))
    assert res.returncode == 1, res
    assert time.monotonic() - began < 10
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("synproxy: worker 1 could not start: cannot bind NFQUEUE"), res.stderr
    assert res.stderr.count("cannot bind") == 1, res.stderr  # said once, not also in the worker's log
    assert "Traceback" not in res.stderr
    assert not synproxy_rules_in(lab, "server")
    notify_socket.settimeout(0.2)
    assert notify_socket.recv(100) == b"STOPPING=1"  # never READY=1
    squatter.send_signal(signal.SIGTERM)
    out, _ = squatter.communicate(timeout=20)
    # --worker-index 0 (one unit per worker) names itself, READY_LINE included
    assert " synproxy worker 0 INFO " in serving_lines(out)[QUEUE + 1], out
    assert any(f" synproxy worker 0 INFO {READY_LINE}" in line for line in out.splitlines()), out
