"""`synproxy run`: wire keys, engine, shell, rules and metrics together.

One worker process serves one NFQUEUE (NetfilterQueue holds the GIL in its
callback: scale with processes, not threads). With `workers > 1` a supervisor
installs the rules with `--queue-balance` over `queue..queue+workers-1`, starts
one worker per queue (all sharing the key file, so a cookie issued by one
validates in any other), restarts a worker that dies, and removes the rules on
a clean stop.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .cookie import CookieMaker
from .engine import Engine, EngineConfig
from .keys import KeyFileWatcher, KeyRing, load_or_create
from .limits import LimitsConfig
from .shell import Binding

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
    limits: LimitsConfig = LimitsConfig()


def build_engine(opts: RunOptions, keyring: KeyRing) -> Engine:
    cfg = EngineConfig(
        ports=frozenset(opts.ports),
        wscale=opts.wscale,
        mss=opts.mss,
        backend_timeout=opts.backend_timeout,
        idle_timeout=opts.idle_timeout,
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
        mark=opts.mark, bypass=opts.queue_bypass,
    )


def _backend(opts: RunOptions):  # type: ignore[no-untyped-def]
    from . import rules

    return rules.Backend(opts.rules_backend) if opts.rules_backend else rules.detect_backend()


def run(opts: RunOptions) -> None:
    """Serve until SIGTERM/SIGINT; rules are installed at start and removed on a clean exit.

    If the process dies instead, the rules stay and queued traffic is dropped
    (fail-closed), never passed unprotected to the server.
    """
    if opts.worker_index is not None:
        serve_queue(opts, install_rules=False, index=opts.worker_index)
    elif opts.workers > 1:
        supervise(opts)
    else:
        serve_queue(opts, install_rules=opts.install_rules)


def worker_queues(opts: RunOptions, index: int) -> tuple[int, int]:
    """Worker `index`'s traffic and SYN queue, as the rules number them."""
    return opts.queue + index, opts.queue + opts.workers + index


def serve_queue(opts: RunOptions, install_rules: bool, index: int = 0) -> None:
    """Worker `index`: bind its two queues, install the rules if asked, serve until stopped."""
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
                  fail_open=opts.queue_bypass, syn_queue_num=syn_queue)
    addr = _metrics_addr(opts, index)
    if addr:
        registry = CollectorRegistry()
        registry.register(SynproxyCollector(engine, shell.stats, {"traffic": queue, "syn": syn_queue},
                                            lambda now: current["ring"].age(now)))
        serve(registry, addr)
    installed: list[rules.Backend] = []

    def on_bound() -> None:
        """The queue has a reader: now the rules may send traffic to it."""
        if install_rules:
            cfg, backend = _rule_config(opts), _backend(opts)
            rules.install(cfg, backend)
            installed.append(backend)
            log.info("installed %s rules (config %s)", backend.value, cfg.fingerprint)
        log.info(
            "synproxy %s serving ports %s on queue %d, SYNs on queue %d (%s mode), pid %d, key %s",
            __version__, ",".join(map(str, opts.ports)), queue, syn_queue, opts.mode, os.getpid(), keyring.key_id,
        )

    try:
        shell.run(on_bound=on_bound)
    finally:
        for backend in installed:
            rules.remove(backend)
            log.info("removed the %s rules", backend.value)
        log.info("queue %d stopped; %d connections were open", queue, len(engine.conns))


def _worker_main(opts: RunOptions, index: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM
    serve_queue(opts, install_rules=False, index=index)


def supervise(opts: RunOptions) -> None:
    """Run `opts.workers` workers on consecutive queues behind one set of balanced rules."""
    from . import rules

    load_or_create(opts.key_file, time.time())  # create it once, before the workers race for it
    ctx = multiprocessing.get_context("fork")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start(i: int) -> None:
        proc = ctx.Process(target=_worker_main, args=(opts, i), name=f"synproxy-worker-{i}", daemon=False)
        proc.start()
        procs[i] = proc

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    backend = None
    try:
        for i in range(opts.workers):
            start(i)
        time.sleep(0.5)  # let every worker bind its queue before traffic is sent to it
        if opts.install_rules:
            cfg, backend = _rule_config(opts), _backend(opts)
            rules.install(cfg, backend)
            log.info("installed %s rules for queues %d-%d (config %s)", backend.value, opts.queue,
                     opts.queue + 2 * opts.workers - 1, cfg.fingerprint)
        log.info("synproxy %s supervising %d workers, pid %d", __version__, opts.workers, os.getpid())
        while not stopping:
            for i, proc in list(procs.items()):
                if not proc.is_alive() and not stopping:
                    log.error("worker %d (queue %d) exited with %s; restarting it", i, opts.queue + i, proc.exitcode)
                    start(i)
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.join(10)
        if backend is not None:
            rules.remove(backend)
            log.info("removed the %s rules", backend.value)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        log.info("stopped")
