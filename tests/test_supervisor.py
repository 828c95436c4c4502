"""The supervisor's restart policy, on stand-in processes (no fork, no queues), and how a worker
that fails on a bug ends (forked, without queues)."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import sys
import threading
import time

import pytest

from synproxy.daemon import RunOptions, Supervisor


class DeadAtOnce:
    """A worker process that has already exited."""

    exitcode = 1
    pid = None

    def is_alive(self) -> bool:
        return False


class Recording(Supervisor):
    def __init__(self, lifetime: float) -> None:
        super().__init__(RunOptions(ports=(80,), workers=1))
        self.lifetime = lifetime  # how long each "worker" seemed to live before dying
        self.starts: list[float] = []

    def start(self, i: int) -> None:
        now = time.monotonic()
        self.starts.append(now)
        self.procs[i], self.started[i] = DeadAtOnce(), now - self.lifetime  # type: ignore[assignment]


def restarts_within(sup: Recording, seconds: float) -> list[float]:
    sup.start(0)
    watcher = threading.Thread(target=sup.watch)
    watcher.start()
    time.sleep(seconds)
    sup.stopping = True
    watcher.join(5)
    return [b - a for a, b in zip(sup.starts, sup.starts[1:])]


def test_a_worker_that_keeps_dying_at_start_is_restarted_ever_later() -> None:
    gaps = restarts_within(Recording(lifetime=0.0), 3.5)
    # Waits of 0.2, 0.4, 0.8, 1.6 s (each on the 0.2 s watch tick): 4 or 5 restarts, not 17.
    assert 3 <= len(gaps) <= 5, gaps
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[2] >= 0.8, gaps


def test_a_worker_that_ran_a_while_is_restarted_at_once() -> None:
    gaps = restarts_within(Recording(lifetime=60.0), 1.0)
    assert len(gaps) >= 3 and max(gaps) < 0.5, gaps


def _crashing_worker(conn: multiprocessing.connection.Connection) -> None:
    """A worker whose serving fails with a bug, as a forked worker would run it."""
    import synproxy.daemon

    def serve_queue(*args: object, **kwargs: object) -> None:
        kwargs["on_ready"]()  # type: ignore[operator]  # it served, then failed
        raise RuntimeError("boom")

    logging.basicConfig(stream=sys.stderr, force=True)
    synproxy.daemon.serve_queue = serve_queue  # type: ignore[assignment]
    synproxy.daemon._worker_main(RunOptions(ports=(80,), workers=4), 3, conn)


def test_a_worker_that_fails_on_a_bug_logs_it_under_its_name_and_exits_1(capfd: pytest.CaptureFixture[str]) -> None:
    """The traceback of a bug in a worker comes through the worker's log lines, naming it, instead of
    multiprocessing's own report (`Process ForkProcess-1:` and a bare traceback); exit 1 gets it restarted."""
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_crashing_worker, args=(theirs,))
    proc.start()
    proc.join(10)
    assert proc.exitcode == 1
    assert ours.recv() is None  # it had reported serving
    err = capfd.readouterr().err
    assert "synproxy worker 3 ERROR stopped by an unexpected error; the supervisor restarts it" in err, err
    assert "RuntimeError: boom" in err and "Process ForkProcess" not in err, err
