"""The `synproxy` command line.

Every option of `run` is also an environment variable (shown in --help) and a
key of the TOML config file (`--config`, default /etc/synproxy/synproxy.toml):
the long flag name with dashes as underscores. Precedence: flag, environment,
config file, built-in default.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from . import __version__

if TYPE_CHECKING:
    from .limits import LimitError

DEFAULT_CONFIG = Path("/etc/synproxy/synproxy.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")


def log_format(worker: int | None = None) -> str:
    """The log line format; a worker of several names itself: each logs the same events (a key
    reload N times over), and the operator must tell which worker said what."""
    who = "synproxy" if worker is None else f"synproxy worker {worker}"
    return f"%(asctime)s {who} %(levelname)s %(message)s"


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear sentence for the operator and a non-zero exit."""
    click.echo(f"synproxy: {message}", err=True)
    sys.exit(code)


class AutoOrInt(click.ParamType):
    """'auto' or an integer in [low, high]; 'auto' becomes None."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.name = f"auto|{low}-{high}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or value == "auto":
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)
        if not self.low <= number <= self.high:
            self.fail(f"{number} is outside {self.low}..{self.high}", param, ctx)
        return number


class FiniteRange(click.FloatRange):
    """click.FloatRange without NaN (which passes any range check) or infinity."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Mark(click.ParamType):
    """A packet mark, 1..2**32-1, in decimal or 0x hex (the README and the rules show 0x5350)."""

    name = "MARK"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = value if isinstance(value, int) else int(str(value), 0)
        except ValueError:
            self.fail(f"{value!r} is not a number (decimal, or hex as 0x5350)", param, ctx)
        if not 0 < number < 2**32:
            self.fail(f"{value} is outside 1..0xffffffff", param, ctx)
        return number


class ServerAddress(click.ParamType):
    """A server's address or prefix (203.0.113.10, 2001:db8::/64), as the rules write it."""

    name = "ADDR[/LEN]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .rules import server_spec

        try:
            return server_spec(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _toml_type_error(param: click.Parameter, value: Any) -> str | None:
    """What is wrong with the type of a config file value for `param`, if anything: click alone
    would take `overload_backlog = true` as 1 and `workers = 2.9` as 2."""
    if getattr(param, "is_flag", False):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(param.type, click.types.IntParamType) and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be a whole number"
    if isinstance(param.type, click.types.FloatParamType) and (
            isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    if isinstance(value, bool):
        return "must not be true or false"
    return None


SERVER_HELP = (
    "Only connections to this server address or prefix are proxied; repeat for several, IPv4 and IPv6 "
    "alike (a family without one has nothing proxied). Default: any address on the protected ports."
)


def _toml(value: Any) -> str:
    """A value as the config file writes it (true, "text", [1, 2]), for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _with_origin(err: LimitError) -> str:
    """A bad limit's message, naming the config file or environment variable the value came from
    (`max_pending = -1` in a file was reported as if --max-pending had been given)."""
    ctx = click.get_current_context()
    source = ctx.get_parameter_source(err.key)
    if source is ParameterSource.DEFAULT_MAP:
        return f"{err.key} in {ctx.meta.get('synproxy.config_path')}: {err}"
    if source is ParameterSource.ENVIRONMENT:
        return f"{err} (from SYNPROXY_{err.key.upper()})"
    return str(err)


def load_config(path: Path, explicit: bool) -> dict[str, Any]:
    """The config file as a click default_map; a missing default file is fine."""
    if not path.exists():
        if explicit:
            fail(f"config file {path} does not exist", 2)
        return {}
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        fail(f"cannot read config file {path}: {err}", 2)
    if not isinstance(data, dict):
        fail(f"config file {path} must be a TOML table", 2)
    return data


class ConfigGroup(click.Group):
    """Reads --config before the subcommand parses, so the file supplies its defaults."""

    def invoke(self, ctx: click.Context) -> Any:
        config_path = ctx.params.get("config")
        explicit = config_path is not None
        path = Path(config_path) if explicit else DEFAULT_CONFIG
        data = load_config(path, explicit)
        if data:
            ctx.meta["synproxy.config_path"] = path
            ctx.default_map = self._default_map(ctx, data, path)
            self._file_log_level(ctx, data, path)
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if err.ctx is None or err.ctx.command is self:
                raise
            # A command's bad option value in one line, as every other configuration error
            # (click writes four: usage, a hint, a blank line and the error).
            message = err.format_message()
            param = getattr(err, "param", None)  # a BadParameter's option
            if isinstance(param, click.Option) and isinstance(param.envvar, str) and param.envvar not in os.environ:
                # click names the environment variable even when the value came from a flag
                message = f"Invalid value for {' / '.join(repr(o) for o in param.opts)}: {err.message}"
            fail(f"{message} (see {err.ctx.command_path} --help)", err.exit_code)

    @staticmethod
    def _file_log_level(ctx: click.Context, data: dict[str, Any], path: Path) -> None:
        """Check the file's `log_level`; `main` applies it unless --log-level or
        SYNPROXY_LOG_LEVEL gave one (the group's own options are parsed before the file is read)."""
        level = data.get("log_level")
        if level is None:
            return
        if level not in LOG_LEVELS:
            fail(f"log_level in {path} must be one of {', '.join(LOG_LEVELS)}, got {level!r}", 2)
        ctx.meta["synproxy.file_log_level"] = level

    @staticmethod
    def _file_value(ctx: click.Context, param: click.Parameter, key: str, value: Any, path: Path) -> Any:
        """A file value, checked here so that an error names the file and key (click would blame
        the environment variable); `port = 80` is taken as `port = [80]`."""
        written = _toml(value)
        if param.multiple and not isinstance(value, list):
            value = [value]
        for item in value if param.multiple else [value]:
            wrong = _toml_type_error(param, item)
            if wrong:
                fail(f"{key} = {written} in {path}: {wrong}", 2)
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as err:
            fail(f"{key} = {written} in {path}: {err.message}", 2)
        return value

    def _default_map(self, ctx: click.Context, data: dict[str, Any], path: Path) -> dict[str, Any]:
        """File keys (long option names of `run`, underscores) -> each command's parameter names.

        Only `run`'s options are keys; other commands take those they share with it (ports,
        queue, workers, mode, metrics_addr ...). What one call does (`dry_run`, `replace`,
        `timeout` ...) is no configuration: from a file, `dry_run = true` made the rules
        unit succeed without installing a rule."""

        def keys(param: click.Parameter) -> list[str]:
            return [opt.lstrip("-").replace("-", "_") for opt in getattr(param, "opts", [])]

        allowed = {key for param in self.commands["run"].params for key in keys(param)}

        def for_command(cmd: click.Command) -> dict[str, Any]:
            if isinstance(cmd, click.Group):
                return {name: for_command(sub) for name, sub in cmd.commands.items()}
            out: dict[str, Any] = {}
            for param in cmd.params:
                for key in keys(param):
                    if key in data and key in allowed and param.name:
                        out[param.name] = self._file_value(ctx, param, key, data[key], path)
            return out

        mapping = {name: for_command(cmd) for name, cmd in self.commands.items()}
        unknown = sorted(set(data) - allowed - {"config", "log_level"})
        if unknown:
            fail(f"unknown key(s) in {path}: {', '.join(unknown)}", 2)
        return mapping


@click.group(cls=ConfigGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="synproxy")
@click.option(
    "--config", type=click.Path(dir_okay=False), default=None, envvar="SYNPROXY_CONFIG", show_envvar=True,
    help=f"TOML config file; keys are long option names with underscores. Give it before the "
         f"command: synproxy --config FILE run. [default: {DEFAULT_CONFIG}]",
)
@click.option(
    "--log-level", type=click.Choice(LOG_LEVELS), default="info",
    envvar="SYNPROXY_LOG_LEVEL", show_envvar=True, show_default=True,
)
def main(config: str | None, log_level: str) -> None:
    """synproxy: a transparent SYN-proxy firewall on netfilter queues.

    It answers SYNs for protected ports with cookie SYN-ACKs (no state per SYN),
    validates the client's ACK exactly, replays the handshake to the server with
    the client's own options and translates the connection for its life.
    """
    ctx = click.get_current_context()
    if ctx.get_parameter_source("log_level") is ParameterSource.DEFAULT:
        log_level = ctx.meta.get("synproxy.file_log_level", log_level)
    logging.basicConfig(level=getattr(logging, log_level.upper()), format=log_format())


CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


def effective_caps() -> int:
    """The process's effective capability set (from /proc), 0 if it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _need_root(what: str, raw: bool = True) -> None:
    """Root, or at least the capabilities the datapath needs (as under the systemd unit)."""
    need = 1 << CAP_NET_ADMIN | ((1 << CAP_NET_RAW) if raw else 0)
    if os.geteuid() != 0 and effective_caps() & need != need:
        caps = "CAP_NET_ADMIN and CAP_NET_RAW" if raw else "CAP_NET_ADMIN"
        fail(f"{what} needs root (or {caps}); run it with sudo")


def _limit_options(func: Any) -> Any:
    """Load-shedding caps and rates (0 = unlimited), each a flag, env var and config key."""
    from .limits import LimitsConfig

    d = LimitsConfig()
    specs = [
        ("--max-pending-per-source", int, d.max_pending_per_source,
         "Validated connections per source prefix whose server handshake is in flight (0 = unlimited)."),
        ("--max-established-per-source", int, d.max_established_per_source,
         "Established connections per source prefix (0 = unlimited)."),
        ("--max-pending", int, d.max_pending, "Pending connections in all, per worker (0 = unlimited)."),
        ("--max-established", int, d.max_established, "Established connections in all, per worker (0 = unlimited)."),
        ("--source-prefix-v4", click.IntRange(1, 32), d.source_prefix_v4, "IPv4 prefix length that groups sources."),
        ("--source-prefix-v6", click.IntRange(1, 128), d.source_prefix_v6, "IPv6 prefix length that groups sources."),
        ("--synack-rate-per-source", float, d.synack_rate_per_source,
         "SYN-ACKs per second to one source prefix, the reflection guard (0 = unlimited)."),
        ("--synack-burst-per-source", float, d.synack_burst_per_source,
         "SYN-ACKs one source prefix may get at once before that rate applies (at least 1)."),
        ("--synack-rate-global", float, d.synack_rate_global,
         "SYN-ACKs per second in all, per worker (0 = unlimited)."),
    ]
    for flag, typ, default, text in reversed(specs):
        env = "SYNPROXY_" + flag.lstrip("-").replace("-", "_").upper()
        func = click.option(flag, type=typ, default=default, show_default=True, envvar=env, show_envvar=True,
                            help=text)(func)
    return func


@main.command()
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True, envvar="SYNPROXY_PORT",
              show_envvar=True, help="Protected TCP port; repeat for several (env: space separated).")
@click.option("--queue", type=click.IntRange(0, 65535), default=0, show_default=True, envvar="SYNPROXY_QUEUE",
              show_envvar=True,
              help="First NFQUEUE number: queues Q..Q+N-1 carry traffic, Q+N..Q+2N-1 new SYNs (N = --workers).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, envvar="SYNPROXY_WORKERS",
              show_envvar=True, help="Worker processes, two queues each, balanced by address; share the key file.")
@click.option("--worker-index", type=click.IntRange(0, 63), default=None, envvar="SYNPROXY_WORKER_INDEX",
              show_envvar=True,
              help="Serve only worker I of --workers N, unsupervised (one systemd unit per worker); "
                   "the rules are installed separately (implies --no-rules).")
@click.option("--mode", type=click.Choice(["local", "gateway"]), default="local", show_default=True,
              envvar="SYNPROXY_MODE", show_envvar=True,
              help="local: on the server's host; gateway: on a router in front of it.")
@click.option("--server", "servers", type=ServerAddress(), multiple=True, envvar="SYNPROXY_SERVER", show_envvar=True,
              help=SERVER_HELP)
@click.option("--wscale", type=AutoOrInt(0, 14), default="auto", show_default=True, envvar="SYNPROXY_WSCALE",
              show_envvar=True, help="Window scale advertised to clients; auto mimics the server's.")
@click.option("--mss", type=AutoOrInt(536, 65535), default="auto", show_default=True, envvar="SYNPROXY_MSS",
              show_envvar=True, help="MSS advertised to clients; auto mimics the server's.")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/var/lib/synproxy/cookie.key"), show_default=True, envvar="SYNPROXY_KEY_FILE",
              show_envvar=True, help="Cookie key file shared by all workers (created 0600 if missing).")
@click.option("--metrics-addr", default="127.0.0.1:9531", show_default=True, envvar="SYNPROXY_METRICS_ADDR",
              show_envvar=True, help="HOST:PORT of the Prometheus exporter ('off' disables); worker i uses PORT+i.")
@click.option("--mark", type=Mark(), default=0x5350, show_default="0x5350", envvar="SYNPROXY_MARK",
              show_envvar=True, help="Mark of the proxy's own packets, which the rules let pass; the same as "
                                     "`rules install --mark` when the rules are installed separately.")
@click.option("--rules/--no-rules", "install_rules", default=True, show_default=True, envvar="SYNPROXY_RULES",
              show_envvar=True, help="Install the firewall rules at start and remove them on a clean stop; rules "
                                     "of the same configuration from `rules install` are used and left in place.")
@click.option("--queue-bypass", is_flag=True, envvar="SYNPROXY_QUEUE_BYPASS", show_envvar=True,
              help="Fail open: traffic passes unprotected while no worker is bound or a queue is full (see README).")
@click.option("--queue-binding", type=click.Choice(["netlink", "netfilterqueue"]), default="netlink",
              show_default=True, envvar="SYNPROXY_QUEUE_BINDING", show_envvar=True,
              help="netlink: batched reads and verdicts; netfilterqueue: the NetfilterQueue package (fallback, "
                   "one call per packet, segments up to 4016 bytes).")
@click.option("--backend", "rules_backend", type=click.Choice(["iptables", "nft"]), default=None,
              envvar="SYNPROXY_BACKEND", show_envvar=True, help="Firewall tool for the rules [default: detected].")
@click.option("--backend-timeout", type=FiniteRange(0.1, 60), default=3.0, show_default=True,
              envvar="SYNPROXY_BACKEND_TIMEOUT", show_envvar=True,
              help="Seconds to wait for the server's SYN-ACK before resetting the client.")
@click.option("--idle-timeout", type=FiniteRange(1), default=7440.0, show_default=True,
              envvar="SYNPROXY_IDLE_TIMEOUT", show_envvar=True,
              help="Seconds an established connection may be idle before its state is dropped and both ends "
                   "get a RST for it.")
@click.option("--synack-retries", type=click.IntRange(0, 5), default=2, show_default=True,
              envvar="SYNPROXY_SYNACK_RETRIES", show_envvar=True,
              help="Resends of an unanswered SYN-ACK, 1 s, 3 s, 7 s ... after it, as a server's TCP does: a "
                   "client whose ACK was lost then answers again (where the server speaks first, as in SMTP, "
                   "nothing else completes the connection). Only the last 4096 SYN-ACKs per retry are kept, so "
                   "a flood gets none resent, and at most 64 a second plus twice the ACKs validated the "
                   "second before are resent (0 = never).")
@click.option("--overload-backlog", type=click.IntRange(0, 1023), default=512, show_default=True,
              envvar="SYNPROXY_OVERLOAD_BACKLOG", show_envvar=True,
              help="Once 1024 SYNs have waited in a worker's queue (or the kernel dropped SYNs from it), the SYNs "
                   "waiting at "
                   "which the worker is behind: it then sheds first attempts, remembers them for 4-8 s and "
                   "answers each one's first retransmission (0 = off: the kernel drops the overflow at random, "
                   "retransmissions included, or with --queue-bypass passes it to the server). With --queue-bypass "
                   "any other value acts as 1: an overflow would cross unprotected.")
@_limit_options
def run(
    ports: tuple[int, ...], queue: int, workers: int, worker_index: int | None, mode: str, servers: tuple[str, ...],
    wscale: int | None,
    mss: int | None, key_file: Path, metrics_addr: str, mark: int, install_rules: bool, queue_bypass: bool,
    queue_binding: str,
    rules_backend: str | None, backend_timeout: float, idle_timeout: float, synack_retries: int,
    overload_backlog: int, **limits: Any,
) -> None:
    """Run the proxy until SIGTERM or Ctrl-C (rules installed at start, removed on a clean stop;
    rules an operator installed with `rules install` stay). A clean stop resets both ends of
    every open connection: its state goes with the process.

    The rules go in once every worker has bound its queues; under systemd (Type=notify)
    the service is ready from then on.
    """
    from .daemon import RunOptions, run as run_daemon
    from .keys import KeyFileError
    from .limits import LimitError, LimitsConfig
    from .metrics import parse_addr
    from .rules import RulesError, render
    from .shell import ShellError

    if worker_index is not None and worker_index >= workers:
        fail(f"--worker-index {worker_index} needs --workers {worker_index + 1} or more (workers = {workers})", 2)
    # Every configuration error before anything is bound or installed, with exit status 2
    # (which the systemd unit does not restart on).
    rule_cfg = _rule_config(ports, queue, workers, mode, mark, queue_bypass, servers)
    if metrics_addr != "off":
        try:
            _host, metrics_port = parse_addr(metrics_addr)
        except ValueError as err:
            fail(str(err), 2)
        if metrics_port + workers - 1 > 65535:
            fail(f"--metrics-addr port {metrics_port} leaves no room for {workers} workers "
                 f"(ports {metrics_port}..{metrics_port + workers - 1}): choose a port below {65536 - workers + 1}", 2)
    try:
        limit_cfg = LimitsConfig(**limits)
    except LimitError as err:
        fail(_with_origin(err), 2)
    _need_root("synproxy run")
    if install_rules and worker_index is None:
        backend = _backend(rules_backend)
        try:
            render(rule_cfg, backend)
        except RulesError as err:
            fail(str(err), 2)
    opts = RunOptions(
        ports=tuple(sorted(set(ports))), queue=queue, workers=workers, worker_index=worker_index, mode=mode,
        servers=rule_cfg.servers, wscale=wscale, mss=mss,
        key_file=key_file, metrics_addr=None if metrics_addr == "off" else metrics_addr, mark=mark,
        install_rules=install_rules, queue_bypass=queue_bypass, queue_binding=queue_binding,
        rules_backend=rules_backend,
        backend_timeout=backend_timeout, idle_timeout=idle_timeout, synack_retries=synack_retries,
        overload_backlog=overload_backlog,
        limits=limit_cfg,
    )
    try:
        run_daemon(opts)
    except (ShellError, KeyFileError, RulesError, OSError) as err:
        fail(str(err))


# ---------------------------------------------------------------- rules


def _rule_config(ports: tuple[int, ...], queue: int, queues: int, mode: str, mark: int, bypass: bool,
                 servers: tuple[str, ...]) -> Any:
    from .rules import Mode, RuleConfig, RulesError

    if not ports:
        fail("no protected port: give --port P (or port = [P] in the config file)", 2)
    try:
        return RuleConfig(ports=tuple(sorted(set(ports))), queue=queue, queues=queues, mode=Mode(mode),
                          mark=mark, bypass=bypass, servers=servers)
    except RulesError as err:
        fail(str(err), 2)


def _backend(name: str | None) -> Any:
    from .rules import Backend, RulesError, detect_backend

    try:
        return Backend(name) if name else detect_backend()
    except RulesError as err:
        fail(str(err))


def _rule_options(func: Any) -> Any:
    """The options that define a rule set, shared by install and show."""
    options = [
        click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True, envvar="SYNPROXY_PORT",
                     show_envvar=True, help="Protected TCP port; repeat for several."),
        click.option("--queue", type=click.IntRange(0, 65535), default=0, show_default=True,
                     envvar="SYNPROXY_QUEUE", show_envvar=True,
                     help="First NFQUEUE number; new SYNs use the queues right after the traffic queues."),
        click.option("--queues", "--workers", "queues", type=click.IntRange(1, 64), default=1, show_default=True,
                     envvar=["SYNPROXY_QUEUES", "SYNPROXY_WORKERS"], show_envvar=True,
                     help="Workers the rules feed: N traffic and N SYN queues, balanced by address "
                          "(--queue-balance); the config key `workers` sets it for run and rules alike."),
        click.option("--mode", type=click.Choice(["local", "gateway"]), default="local", show_default=True,
                     envvar="SYNPROXY_MODE", show_envvar=True,
                     help="local: the proxy runs on the server's host; gateway: on a router in front of it."),
        click.option("--server", "servers", type=ServerAddress(), multiple=True, envvar="SYNPROXY_SERVER", show_envvar=True,
                     help=SERVER_HELP),
        click.option("--mark", type=Mark(), default=0x5350, show_default="0x5350",
                     envvar="SYNPROXY_MARK", show_envvar=True, help="Mark of the proxy's own packets."),
        click.option("--queue-bypass", "bypass", is_flag=True, envvar="SYNPROXY_QUEUE_BYPASS", show_envvar=True,
                     help="Fail open: pass traffic unprotected when no proxy is bound (see README)."),
        click.option("--backend", type=click.Choice(["iptables", "nft"]), default=None,
                     envvar="SYNPROXY_BACKEND", show_envvar=True, help="Firewall tool [default: detected]."),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


@main.group()
def rules() -> None:
    """Install, remove or show the firewall rules that feed the proxy."""


@rules.command("install")
@_rule_options
@click.option("--dry-run", is_flag=True, help="Print the exact rules instead of installing them.")
@click.option("--replace", is_flag=True, help="Replace synproxy rules of another configuration.")
def rules_install(ports: tuple[int, ...], queue: int, queues: int, mode: str, servers: tuple[str, ...], mark: int,
                  bypass: bool,
                  backend: str | None, dry_run: bool, replace: bool) -> None:
    """Install synproxy's own chains (iptables) or table (nft); idempotent."""
    from .rules import RulesError, install, render

    cfg = _rule_config(ports, queue, queues, mode, mark, bypass, servers)
    chosen = _backend(backend)
    if dry_run:
        try:
            click.echo(render(cfg, chosen), nl=False)
        except RulesError as err:
            fail(str(err))
        return
    _need_root("synproxy rules install", raw=False)
    try:
        changed = install(cfg, chosen, replace=replace)
    except RulesError as err:
        fail(str(err))
    click.echo(f"{chosen.value} rules {'installed' if changed else 'already installed'} "
               f"(config {cfg.fingerprint}, {mode} mode, ports {','.join(map(str, cfg.ports))}"
               + (f", servers {','.join(cfg.servers)})" if cfg.servers else ")"))


@rules.command("remove")
@click.option("--backend", type=click.Choice(["iptables", "nft"]), default=None, envvar="SYNPROXY_BACKEND",
              show_envvar=True, help="Firewall tool [default: detected].")
def rules_remove(backend: str | None) -> None:
    """Remove synproxy's rules; every other rule is left untouched."""
    from .rules import RulesError, remove

    _need_root("synproxy rules remove", raw=False)
    chosen = _backend(backend)
    try:
        removed = remove(chosen)
    except RulesError as err:
        fail(str(err))
    click.echo(f"{chosen.value} rules {'removed' if removed else 'were not installed'}")


@rules.command("show")
@_rule_options
def rules_show(ports: tuple[int, ...], queue: int, queues: int, mode: str, servers: tuple[str, ...], mark: int,
               bypass: bool,
               backend: str | None) -> None:
    """Show the installed rules, who installed them, whether they match the configuration and
    whether a process reads their queues (exit status 3 when they do not match or are missing,
    4 when no process reads some of their queues: those packets are dropped, or pass unprotected
    with --queue-bypass)."""
    from .nfqueue import bound_queues
    from .rules import Owner, RulesError, show

    _need_root("synproxy rules show", raw=False)
    chosen = _backend(backend)
    cfg = _rule_config(ports, queue, queues, mode, mark, bypass, servers) if ports else None
    try:
        found = show(chosen)
    except RulesError as err:
        fail(str(err))
    mismatch = unread = False
    bound = bound_queues()
    for family, inst in found:
        if not inst.present:
            click.echo(f"{family}: no synproxy rules installed")
            mismatch = mismatch or cfg is not None
            continue
        state = ""
        if cfg is not None:
            ok = inst.fingerprint == cfg.fingerprint
            mismatch = mismatch or not ok
            state = " (matches the configuration)" if ok else " (DIFFERENT from the configuration)"
        by = "synproxy run, removed when it stops" if inst.owner is Owner.RUN else "synproxy rules install"
        click.echo(f"{family}: installed by {by}, config {inst.fingerprint}{state}")
        missing = [q for q in inst.queues if bound is not None and q not in bound]
        if missing:
            unread = True
            fate = "pass to the server unprotected (--queue-bypass)" if inst.bypass else "are dropped (fail-closed)"
            todo = ("the `synproxy run` that installed them is gone (killed?): start it again"
                    if inst.owner is Owner.RUN else "start `synproxy run` (systemctl start synproxy)")
            click.echo(f"{family}: no process reads queue(s) {', '.join(map(str, missing))}, so their packets "
                       f"{fate}: {todo}, or `synproxy rules remove`")
        click.echo(inst.text.rstrip())
    if mismatch:
        sys.exit(3)
    if unread:
        sys.exit(4)


# ---------------------------------------------------------------- demo


@main.command()
@click.option("--seconds", type=FiniteRange(2, 120), default=10.0, show_default=True,
              help="Length of each flood (unprotected, then protected).")
@click.option("--short", is_flag=True, help="A 4-second run of each phase (used by the tests).")
@click.option("--rate", type=click.IntRange(0), default=20000, show_default=True,
              help="SYN/s hping3's flood is paced for (it sends fewer, about half here: the summary counts "
                   "them); 0 = as fast as hping3 can (more than one Python worker handles).")
@click.option("--hold", is_flag=True, help="Keep the lab up after the summary, until Ctrl-C.")
def demo(seconds: float, short: bool, rate: int, hold: bool) -> None:
    """Flood a legacy server in a built-in lab, unprotected and then behind synproxy."""
    from .demo import run_demo

    try:
        run_demo(4.0 if short else seconds, click.echo, hold, rate)
    except PermissionError as err:
        fail(str(err))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: the lab has been torn down")


# ---------------------------------------------------------------- key, probe, status


@main.group()
def key() -> None:
    """Manage the cookie key file shared by all workers."""


@key.command("rotate")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/var/lib/synproxy/cookie.key"), show_default=True, envvar="SYNPROXY_KEY_FILE",
              show_envvar=True, help="The key file the workers read (their --key-file).")
@click.option("--create", is_flag=True,
              help="Make a new key file if there is none (say, before the first start); otherwise a missing "
                   "file is an error, as a mistyped path would get a key no worker reads.")
def key_rotate(key_file: Path, create: bool) -> None:
    """Start a new cookie key; the old one stays valid for cookies already sent.

    Running workers notice the new file within about a second. Only the previous key is kept:
    rotating again within 133 s (a cookie's lifetime plus the workers' grace) stops checking
    the one before, so handshakes still using it fail; rotate warns when that happens.
    """
    import time as _time

    from .cookie import CookieMaker
    from .keys import KeyFileError, load, rotate

    now = _time.time()
    try:
        before = load(key_file)
    except KeyFileError:
        before = None  # missing (rotate says so, or creates it) or unreadable (rotate says why)
    try:
        ring = rotate(key_file, now, create=create)
    except KeyFileError as err:
        fail(str(err))
    what = "created" if ring.generation == 1 else "rotated"
    click.echo(f"{what} {key_file}: key {ring.key_id}, generation {ring.generation}")
    if before is not None and CookieMaker.rotation_breaks_handshakes(before, now):
        click.echo(f"warning: the previous rotation was {now - before.rotated_at:.0f} s ago: handshakes whose "
                   f"SYN-ACK left before it now fail to validate; rotate at most every {CookieMaker.MIN_ROTATION_INTERVAL} s",
                   err=True)


@main.command()
@click.argument("target", metavar="HOST:PORT")
@click.option("--timeout", type=FiniteRange(0, min_open=True), default=3.0, show_default=True,
              metavar="SECONDS", help="Seconds to wait for the server's SYN-ACK.")
def probe(target: str, timeout: float) -> None:
    """Learn what a server announces (MSS, window scale, SACK, timestamps) from a real handshake.

    HOST:PORT is e.g. 192.0.2.7:443 or [2001:db8::7]:443. Probe the server
    directly: a probe that passes through a running synproxy sees what the
    proxy announces instead. The exact MSS needs root (CAP_NET_ADMIN, for
    TCP repair mode); without it the kernel's send MSS is shown, which can
    be lower.
    """
    import socket as _socket

    from .metrics import parse_host_port
    from .status import own_address
    from .status import probe as do_probe

    try:
        host, port = parse_host_port(target, "probe target")
    except ValueError as err:
        fail(str(err), 2)
    try:
        res = do_probe(host, port, timeout)
    except TimeoutError:
        fail(f"no SYN-ACK from {target} within {timeout:g} s (is a firewall dropping the SYN?)")
    except _socket.gaierror as err:
        fail(f"cannot resolve {host}: {err.strerror or err}")
    except OSError as err:
        fail(f"cannot connect to {target}: {err.strerror or err}")
    mss = f"mss {res.mss}" if res.mss_exact else f"mss {res.mss} (estimate)"
    click.echo(f"{target}: {mss}, window scale {res.wscale if res.wscale is not None else 'off'}, "
               f"SACK {'on' if res.sack else 'off'}, timestamps {'on' if res.timestamps else 'off'} "
               f"(handshake {res.connect_ms:.1f} ms)")
    if not res.mss_exact:
        click.echo("the MSS is an estimate: the kernel's send MSS, which it clamps to half the server's window; "
                   "the MSS the server announced needs CAP_NET_ADMIN (run as root)")
    mss_to_give = res.mss
    own = own_address(host)
    if own is not None and own.dev != "lo":
        if own.mss:
            mss_to_give = min(res.mss, own.mss)
        click.echo(f"{host} is this host's own address (on {own.dev}): the handshake went over lo, so the MSS is "
                   "lo's; " + (f"clients coming in on {own.dev} (MTU {own.mtu}) see at most {own.mss}" if own.mss
                               else "clients see that of the interface they come in on"))
    click.echo(f"to mimic it: synproxy run --mss {mss_to_give} --wscale {res.wscale if res.wscale is not None else 0}")


@main.command()
@click.option("--metrics-addr", default="127.0.0.1:9531", show_default=True, envvar="SYNPROXY_METRICS_ADDR",
              show_envvar=True, help="The exporter of the (first) worker.")
@click.option("--interval", type=FiniteRange(0.2, 60), default=1.0, show_default=True,
              help="Seconds between the two scrapes rates are computed from.")
def status(metrics_addr: str, interval: float) -> None:
    """A readable summary of the running daemon, from its metrics (all workers).

    Exits 1 if a worker does not answer (the summary is of the others), 0 otherwise."""
    import time as _time

    from .metrics import parse_addr
    from .status import NotSynproxy, find_workers, label_workers, scrape, summary

    try:
        parse_addr(metrics_addr)
    except ValueError as err:
        fail(str(err), 2)
    try:
        workers = find_workers(metrics_addr)
        addrs = workers.answering
    except NotSynproxy as err:
        fail(str(err))
    except OSError:
        fail(f"no synproxy metrics at {metrics_addr}: is `synproxy run` running with that --metrics-addr?")

    try:
        before = label_workers([scrape(addr) for addr in addrs])
        _time.sleep(interval)
        after = label_workers([scrape(addr) for addr in addrs])
    except (OSError, NotSynproxy) as err:
        fail(f"reading metrics failed: {err}")
    click.echo(summary(before, after, interval, workers))
    if workers.missing:
        sys.exit(1)
