"""`synproxy run`: wire keys, engine, shell, rules and metrics together.

One worker process serves one NFQUEUE (NetfilterQueue holds the GIL in its
callback: scale with processes, not threads). With `workers > 1` a supervisor
starts one worker per queue (all sharing the key file, so a cookie issued by one
validates in any other), waits until every worker has bound its queues, installs
the rules with `--queue-balance` over them, restarts a worker that dies, and
removes the rules on a clean stop. Under systemd (`Type=notify`) the service is
ready once the rules are in place.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .cookie import CookieMaker
from .engine import Engine, EngineConfig
from .keys import KeyFileError, KeyFileWatcher, KeyRing, load_or_create
from .limits import LimitsConfig
from .sdnotify import notify
from .shell import Binding, ShellError

if TYPE_CHECKING:
    from .rules import Backend

log = logging.getLogger("synproxy")

DEFAULT_KEY_FILE = Path("/var/lib/synproxy/cookie.key")
DEFAULT_MARK = 0x5350


@dataclass(frozen=True)
class RunOptions:
    """Everything `synproxy run` needs, already validated by the CLI."""

    ports: tuple[int, ...]
    queue: int = 0  # traffic queue (the first, with several workers)
    workers: int = 1
    worker_index: int | None = None  # serve only this worker of `workers`, unsupervised, no rules
    mode: str = "local"
    servers: tuple[str, ...] = ()  # --server: only connections to these are proxied (empty: any)
    wscale: int | None = None  # None = auto
    mss: int | None = None  # None = auto
    key_file: Path = DEFAULT_KEY_FILE
    metrics_addr: str | None = "127.0.0.1:9531"  # worker i listens on port + i
    mark: int = DEFAULT_MARK
    install_rules: bool = True
    queue_bypass: bool = False  # fail open: rules bypass an unbound queue, the kernel bypasses a full one
    queue_binding: str = "netlink"  # or "netfilterqueue" (the fallback, one system call per packet)
    rules_backend: str | None = None
    backend_timeout: float = 3.0
    idle_timeout: float = 7440.0
    synack_retries: int = 2  # resends of an unanswered SYN-ACK (see Engine.RESEND_SLOTS)
    overload_backlog: int = 512  # SYNs waiting at which a worker sheds first attempts (0 = never)
    limits: LimitsConfig = LimitsConfig()


def build_engine(opts: RunOptions, keyring: KeyRing) -> Engine:
    cfg = EngineConfig(
        ports=frozenset(opts.ports),
        wscale=opts.wscale,
        mss=opts.mss,
        backend_timeout=opts.backend_timeout,
        idle_timeout=opts.idle_timeout,
        synack_retries=opts.synack_retries,
        ts_base=secrets.randbits(32),
        limits=opts.limits,
        max_packet=Binding(opts.queue_binding).copy_range,
    )
    return Engine(cfg, CookieMaker(keyring))


def _metrics_addr(opts: RunOptions, index: int) -> str | None:
    if not opts.metrics_addr or index == 0:
        return opts.metrics_addr
    host, _, port = opts.metrics_addr.rpartition(":")
    return f"{host}:{int(port) + index}"


def _rule_config(opts: RunOptions):  # type: ignore[no-untyped-def]
    from . import rules

    return rules.RuleConfig(
        ports=tuple(opts.ports), queue=opts.queue, queues=opts.workers, mode=rules.Mode(opts.mode),
        mark=opts.mark, bypass=opts.queue_bypass, servers=opts.servers,
    )


def _backend(opts: RunOptions):  # type: ignore[no-untyped-def]
    from . import rules

    return rules.Backend(opts.rules_backend) if opts.rules_backend else rules.detect_backend()


def name_worker_in_logs(index: int) -> None:
    """This process's log lines say `synproxy worker INDEX` (all of them: every logger here
    writes through the root's handlers), so N workers' identical lines can be told apart."""
    from .cli import log_format

    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(log_format(index)))


def run(opts: RunOptions) -> None:
    """Serve until SIGTERM/SIGINT; rules are installed at start and removed on a clean exit.

    If the process dies instead, the rules stay and queued traffic is dropped
    (fail-closed), never passed unprotected to the server.
    """
    try:
        if opts.worker_index is not None:
            name_worker_in_logs(opts.worker_index)  # one of several, each its own unit
            serve_queue(opts, install_rules=False, index=opts.worker_index, on_ready=_ready)
        elif opts.workers > 1:
            supervise(opts)
        else:
            serve_queue(opts, install_rules=opts.install_rules, on_ready=_ready)
    finally:
        notify("STOPPING=1")


def _install_rules(opts: RunOptions, what: str) -> Backend | None:
    """Install the rules once the queues are read; the backend whose rules this process must
    remove on a clean stop, or None when they are the operator's (`synproxy rules install`)."""
    from . import rules

    cfg, backend = _rule_config(opts), _backend(opts)
    if not rules.install_for_run(cfg, backend):
        log.info("using the %s rules `synproxy rules install` put in place (config %s); "
                 "they stay after synproxy stops", backend.value, cfg.fingerprint)
        return None
    log.info("installed %s rules %s(config %s)", backend.value, what, cfg.fingerprint)
    return backend


def _remove_own_rules(opts: RunOptions, backend: Backend) -> None:
    """On a clean stop, the rules this run installed go; rules installed over them meanwhile stay."""
    from . import rules

    cfg = _rule_config(opts)
    if rules.remove(backend, run_cfg=cfg):
        log.info("removed the %s rules", backend.value)
    else:
        log.info("left the %s rules in place: they are no longer the ones this run installed (config %s)",
                 backend.value, cfg.fingerprint)


READY_LINE = "synproxy ready"  # logged once the service protects (or serves, with --no-rules)


def _ready() -> None:
    """The service is up: its queues are bound, its rules in place. One log line for people
    and scripts, whatever the mode; READY=1 for systemd (Type=notify)."""
    log.info("%s, pid %d", READY_LINE, os.getpid())
    notify("READY=1")


def worker_queues(opts: RunOptions, index: int) -> tuple[int, int]:
    """Worker `index`'s traffic and SYN queue, as the rules number them."""
    return opts.queue + index, opts.queue + opts.workers + index


def serve_queue(
    opts: RunOptions, install_rules: bool, index: int = 0, on_ready: Callable[[], None] | None = None
) -> None:
    """Worker `index`: bind its two queues, install the rules if asked, call `on_ready`, serve until stopped."""
    from prometheus_client import CollectorRegistry

    from . import rules
    from .metrics import SynproxyCollector, serve
    from .shell import Shell

    keyring = load_or_create(opts.key_file, time.time())
    engine = build_engine(opts, keyring)
    watcher = KeyFileWatcher(opts.key_file, known=keyring)
    current = {"ring": keyring}

    def on_tick(now: float) -> None:
        ring = watcher.poll()
        if ring is not None:
            log.info("cookie key file changed; reloaded (key %s)", ring.key_id)
            engine.cookies.set_keyring(ring)
            current["ring"] = ring

    queue, syn_queue = worker_queues(opts, index)
    if opts.queue_bypass and opts.queue_binding == "netfilterqueue":
        log.warning("--queue-bypass: NetfilterQueue cannot set fail-open on a full queue; "
                    "only an unbound queue is bypassed")
    shell = Shell(engine, queue, opts.mark, on_tick=on_tick, binding=Binding(opts.queue_binding),
                  fail_open=opts.queue_bypass, syn_queue_num=syn_queue, overload_backlog=opts.overload_backlog,
                  pass_on_queue=queue + 1 if index + 1 < opts.workers else None)
    addr = _metrics_addr(opts, index)
    if addr:
        registry = CollectorRegistry()
        registry.register(SynproxyCollector(engine, shell.stats, {"traffic": queue, "syn": syn_queue},
                                            lambda now: current["ring"].age(now), workers=opts.workers,
                                            key_file_ok=lambda: watcher.last_error is None))
        try:
            serve(registry, addr)
        except OSError as err:
            why = (err.strerror or str(err)).lower()
            raise ShellError(f"cannot serve metrics on {addr}: {why} (give another --metrics-addr, or off)") from err
    installed: list[rules.Backend] = []
    serving = False

    def on_bound() -> None:
        """The queue has a reader: now the rules may send traffic to it."""
        nonlocal serving
        serving = True
        if install_rules:
            backend = _install_rules(opts, "")
            if backend is not None:
                installed.append(backend)
        log.info(
            "synproxy %s serving ports %s on queue %d, SYNs on queue %d (%s mode), pid %d, key %s",
            __version__, ",".join(map(str, opts.ports)), queue, syn_queue, opts.mode, os.getpid(), keyring.key_id,
        )
        if on_ready is not None:
            on_ready()

    try:
        shell.run(on_bound=on_bound)
    finally:
        for backend in installed:
            _remove_own_rules(opts, backend)
        if serving:
            log.info("queue %d stopped; %d connections were open", queue, len(engine.conns))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(supervisor: int) -> None:
    """SIGTERM this worker when its supervisor dies, however it dies. A SIGKILLed supervisor
    left its workers serving as orphans, holding the queues and metrics ports, so the next
    `synproxy run` could not start."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the supervisor: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != supervisor:  # it died before the request took effect
        os._exit(1)


def _worker_main(opts: RunOptions, index: int, report: multiprocessing.connection.Connection,
                 awaited: bool = False, supervisor: int | None = None) -> None:
    """A supervised worker: it reports None once serving, or why it could not start.

    While the supervisor awaits its start (`awaited`, the first start) the supervisor prints
    why it could not, once; otherwise (a restart, or later) nobody reads the report and the
    worker logs the reason itself.
    """
    name_worker_in_logs(index)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM
    # Not the supervisor's handler, inherited by the fork: a SIGTERM before the worker serves
    # (the supervisor giving up its start) must end it; the shell installs its own when serving.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if supervisor is not None:
        _die_with(supervisor)
    os.environ.pop("NOTIFY_SOCKET", None)  # the supervisor speaks for the service

    def tell(message: str | None) -> None:
        try:
            report.send(message)
        except OSError:  # the supervisor stopped listening: it is going away and will say so
            pass

    serving = False

    def on_ready() -> None:
        nonlocal serving
        serving = True
        tell(None)

    try:
        serve_queue(opts, install_rules=False, index=index, on_ready=on_ready)
    except (ShellError, KeyFileError, OSError) as err:
        if awaited and not serving:
            tell(str(err))
        else:
            log.error("%s", err)  # the line names the worker
        sys.exit(1)
    except Exception:  # a bug: logged under the worker's name (not multiprocessing's), then restarted
        log.exception("stopped by an unexpected error; the supervisor restarts it")
        if awaited and not serving:
            tell("stopped by an unexpected error (traceback above)")
        sys.exit(1)


class Supervisor:
    """Worker processes on consecutive queues behind one set of balanced rules."""

    START_TIMEOUT = 15.0  # for every worker to bind its queues
    RESTART_DELAY_MAX = 10.0  # a worker that keeps dying at once is restarted at most this often

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.ctx = multiprocessing.get_context("fork")
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.reports: dict[int, multiprocessing.connection.Connection] = {}
        self.started: dict[int, float] = {}
        self.delay: dict[int, float] = {}
        self.stopping = False

    def start(self, i: int, awaited: bool = False) -> None:
        """Start worker i; `awaited`: await_ready() will read (and say) why it could not start."""
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker_main, args=(self.opts, i, send, awaited, os.getpid()),
                                name=f"synproxy-worker-{i}", daemon=False)
        proc.start()
        send.close()  # the worker holds the other copy: its exit reads as EOF here
        old = self.reports.pop(i, None)
        if old is not None:
            old.close()
        self.procs[i], self.reports[i], self.started[i] = proc, receive, time.monotonic()

    def await_ready(self) -> None:
        """Return once every worker serves; ShellError (one sentence) if one cannot."""
        deadline = time.monotonic() + self.START_TIMEOUT
        waiting = dict(self.reports)
        while waiting and not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                late = ", ".join(map(str, sorted(waiting)))
                raise ShellError(f"worker {late} did not bind its queues within {self.START_TIMEOUT:.0f} s")
            for conn in multiprocessing.connection.wait(list(waiting.values()), min(left, 0.2)):
                i = next(k for k, c in waiting.items() if c is conn)
                try:
                    why = conn.recv()
                except EOFError:
                    why = f"it exited with status {self.procs[i].exitcode} before serving"
                if why is not None:
                    raise ShellError(f"worker {i} could not start: {why}")
                del waiting[i]

    def watch(self) -> None:
        """Restart workers that die, until stopped; one that dies soon after starting waits longer each time."""
        due: dict[int, float] = {}
        while not self.stopping:
            now = time.monotonic()
            for i, proc in list(self.procs.items()):
                if proc.is_alive() or self.stopping:
                    continue
                if i not in due:
                    quick = now - self.started[i] < 5.0
                    self.delay[i] = min(max(self.delay.get(i, 0.0), 0.1) * 2, self.RESTART_DELAY_MAX) if quick else 0.0
                    due[i] = now + self.delay[i]
                    log.error("worker %d (queue %d) exited with %s; restarting it%s", i, self.opts.queue + i,
                              proc.exitcode, f" in {self.delay[i]:.1f} s" if self.delay[i] else "")
                if now >= due[i]:
                    del due[i]
                    self.start(i)
            time.sleep(0.2)

    def stop_workers(self) -> None:
        """SIGTERM to every worker; SIGKILL to any still running 10 s later: none outlives the supervisor."""
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for i, proc in self.procs.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %d did not stop within 10 s; killing it", i)
                proc.kill()
                proc.join(5)


def supervise(opts: RunOptions) -> None:
    """Run `opts.workers` workers; rules once all serve; READY=1 for systemd once the rules are in."""
    load_or_create(opts.key_file, time.time())  # create it once, before the workers race for it
    sup = Supervisor(opts)

    def stop(*_: object) -> None:
        sup.stopping = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    backend = None
    try:
        for i in range(opts.workers):
            sup.start(i, awaited=True)
        sup.await_ready()  # no traffic is sent to a queue before its worker reads it
        if opts.install_rules and not sup.stopping:
            backend = _install_rules(opts, f"for queues {opts.queue}-{opts.queue + 2 * opts.workers - 1} ")
        if not sup.stopping:
            log.info("synproxy %s supervising %d workers, pid %d", __version__, opts.workers, os.getpid())
            _ready()
            sup.watch()
    finally:
        sup.stop_workers()
        if backend is not None:
            _remove_own_rules(opts, backend)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        log.info("stopped")
