"""`synproxy run`: wire keys, engine, shell, rules and metrics together."""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .cookie import CookieMaker
from .engine import BackendProfile, Engine, EngineConfig
from .keys import KeyFileWatcher, KeyRing, load_or_create

log = logging.getLogger("synproxy")

DEFAULT_KEY_FILE = Path("/var/lib/synproxy/cookie.key")
DEFAULT_MARK = 0x5350


@dataclass(frozen=True)
class RunOptions:
    """Everything `synproxy run` needs, already validated by the CLI."""

    ports: tuple[int, ...]
    queue: int = 0
    mode: str = "local"
    wscale: int | None = None  # None = auto
    mss: int | None = None  # None = auto
    key_file: Path = DEFAULT_KEY_FILE
    metrics_addr: str | None = "127.0.0.1:9531"
    mark: int = DEFAULT_MARK
    install_rules: bool = True
    rules_backend: str | None = None
    backend_timeout: float = 3.0
    idle_timeout: float = 7440.0
    profiles: dict[tuple[int, bytes, int], BackendProfile] = field(default_factory=dict)


def build_engine(opts: RunOptions, keyring: KeyRing) -> Engine:
    cfg = EngineConfig(
        ports=frozenset(opts.ports),
        wscale=opts.wscale,
        mss=opts.mss,
        backend_timeout=opts.backend_timeout,
        idle_timeout=opts.idle_timeout,
        ts_base=secrets.randbits(32),
    )
    engine = Engine(cfg, CookieMaker(keyring))
    for (family, addr, port), prof in opts.profiles.items():
        engine.learn_profile(family, addr, port, prof)
    return engine


def run(opts: RunOptions) -> None:
    """Serve until SIGTERM/SIGINT; rules are installed first and removed on a clean exit.

    If the process dies instead, the rules stay and queued traffic is dropped
    (fail-closed), never passed unprotected to the server.
    """
    from prometheus_client import CollectorRegistry

    from .metrics import SynproxyCollector, serve
    from .shell import Shell

    keyring = load_or_create(opts.key_file, time.time())
    engine = build_engine(opts, keyring)
    watcher = KeyFileWatcher(opts.key_file, known=keyring)
    current = {"ring": keyring}

    def on_tick(now: float) -> None:
        ring = watcher.poll()
        if ring is not None:
            log.info("cookie key file changed; reloaded")
            engine.cookies.set_keyring(ring)
            current["ring"] = ring

    shell = Shell(engine, opts.queue, opts.mark, on_tick=on_tick)
    if opts.metrics_addr:
        registry = CollectorRegistry()
        registry.register(
            SynproxyCollector(engine, shell.stats, opts.queue, lambda now: current["ring"].age(now))
        )
        serve(registry, opts.metrics_addr)
    from . import rules

    installed: list[rules.Backend] = []

    def on_bound() -> None:
        """The queue has a reader: now the rules may send traffic to it."""
        if opts.install_rules:
            cfg = rules.RuleConfig(
                ports=tuple(opts.ports), queue=opts.queue, mode=rules.Mode(opts.mode), mark=opts.mark
            )
            backend = rules.Backend(opts.rules_backend) if opts.rules_backend else rules.detect_backend()
            rules.install(cfg, backend)
            installed.append(backend)
            log.info("installed %s rules (config %s)", backend.value, cfg.fingerprint)
        else:
            log.info("not installing rules (--no-rules): they must already be in place")
        log.info(
            "synproxy %s serving ports %s on queue %d (%s mode), pid %d",
            __version__, ",".join(map(str, opts.ports)), opts.queue, opts.mode, os.getpid(),
        )

    try:
        shell.run(on_bound=on_bound)
    finally:
        for backend in installed:
            rules.remove(backend)
            log.info("removed the %s rules", backend.value)
        log.info("stopped; %d connections were open", len(engine.conns))
