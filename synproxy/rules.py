"""The firewall rules that send protected traffic to the proxy, for iptables or nft.

Rules live only in synproxy's own chains (iptables: SYNPROXY_PY_PRE/OUT in the
raw table, one jump rule each from PREROUTING/OUTPUT) or its own table (nft:
`inet synproxy_py`), rendered from the templates in the top-level `rules/`
directory. Installing is idempotent; a configuration is fingerprinted in a
comment so installing a *different* one is refused unless asked to replace it,
and `show` can say whether what is installed matches. Removing touches nothing
but synproxy's own rules.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from string import Template

CHAIN_PRE = "SYNPROXY_PY_PRE"
CHAIN_OUT = "SYNPROXY_PY_OUT"
NFT_TABLE = "synproxy_py"
DEFAULT_MARK = 0x5350


class Mode(Enum):
    LOCAL = "local"  # the proxy runs on the server's host
    GATEWAY = "gateway"  # the proxy runs on a router in front of the server


class Backend(Enum):
    IPTABLES = "iptables"
    NFT = "nft"


class Owner(Enum):
    """Who installed the rules, and so who removes them."""

    OPERATOR = "operator"  # `synproxy rules install`: they stay until `synproxy rules remove`
    RUN = "run"  # `synproxy run`: removed when it stops cleanly


class RulesError(RuntimeError):
    """One sentence the operator can act on."""


@dataclass(frozen=True)
class RuleConfig:
    ports: tuple[int, ...]
    queue: int = 0
    queues: int = 1  # workers; traffic queues queue..queue+queues-1, balanced by address
    mode: Mode = Mode.LOCAL
    mark: int = DEFAULT_MARK
    bypass: bool = False  # fail open when no proxy is bound to the queue (risky: see README)
    # The servers' addresses or prefixes (--server): only connections to them are proxied. Empty:
    # any address on the protected ports. A family with none given has nothing proxied.
    servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        specs = set()
        for server in self.servers:
            try:
                specs.add(server_spec(server))
            except ValueError as err:
                raise RulesError(f"--server {server}: {err}") from None
        object.__setattr__(self, "servers", tuple(sorted(specs, key=lambda s: (":" in s, s))))
        if not self.ports:
            raise RulesError("at least one protected port is required")
        for port in self.ports:
            if not 1 <= port <= 65535:
                raise RulesError(f"port {port} is outside 1..65535")
        if self.queues < 1 or not 0 <= self.queue <= 65535 - (2 * self.queues - 1):
            raise RulesError(
                f"--queue {self.queue} with {self.queues} worker(s) needs queues {self.queue}.."
                f"{self.queue + 2 * self.queues - 1}, outside 0..65535: choose a lower --queue"
            )
        if not 0 < self.mark < 2**32:
            raise RulesError(f"mark {self.mark:#x} must be a non-zero 32-bit value")

    @property
    def syn_queue(self) -> int:
        """New SYNs go to their own queues, right after the traffic queues (worker i: queue+queues+i)."""
        return self.queue + self.queues

    @property
    def fingerprint(self) -> str:
        """Short id of this configuration, stored with the installed rules."""
        # The layout: "syn-queue", separate SYN queues; "lo", the host's own connections pass (local
        # mode); "rpf", packets from a protected port that arrive where the route to their source
        # does not lead are dropped (gateway mode); "too-big", ICMP fragmentation-needed / packet-too-big
        # about protected connections go to the first worker. Rules of earlier layouts differ, so they count
        # as another configuration.
        text = f"{sorted(set(self.ports))}|{self.queue}|{self.queues}|{self.mode.value}|{self.mark}|{self.bypass}" \
               "|syn-queue|lo|too-big" + ("|rpf" if self.mode is Mode.GATEWAY else "")
        if self.servers:  # (without, the fingerprint of earlier versions' rules stays)
            text += "|servers=" + ",".join(self.servers)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def servers_of(self, family: int) -> list[str]:
        return [s for s in self.servers if (":" in s) == (family == 6)]


def server_spec(value: str) -> str:
    """A --server value as the rules write it: an address, or a prefix (203.0.113.0/28).
    ValueError, saying what is wrong, for anything else."""
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as err:
        raise ValueError(f"{err} (give an address, or a prefix such as 203.0.113.0/28)") from None
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else net.with_prefixlen


# ---------------------------------------------------------------- rendering


def template_text(name: str) -> str:
    """A template from `rules/`.

    A normal install carries them as `synproxy/_rules` (pyproject maps the
    top-level `rules/` there); an editable install or a source checkout has
    only `<repo>/rules`. The packaged copy wins, so a stray `rules/` directory
    next to an installed package can never shadow it.
    """
    packaged = resources.files("synproxy").joinpath("_rules", name)
    if packaged.is_file():
        return packaged.read_text()
    repo = Path(__file__).resolve().parent.parent / "rules" / name
    if repo.is_file():
        return repo.read_text()
    raise RulesError(f"rule template {name} is missing: reinstall synproxy")


TOO_BIG_RATE = 1000  # ICMP "too big" messages a second queued at most (routers send few; a flood of them is cut)
MULTIPORT_MAX = 15  # the iptables multiport match takes at most 15 ports


def _iptables_vars(cfg: RuleConfig) -> dict[str, str]:
    ports = sorted(set(cfg.ports))
    if len(ports) > MULTIPORT_MAX:
        raise RulesError(
            f"iptables can match at most {MULTIPORT_MAX} ports in one rule, {len(ports)} given: "
            "protect fewer ports or use --backend nft"
        )
    if len(ports) == 1:
        dports, sports = f"--dport {ports[0]}", f"--sport {ports[0]}"
    else:
        joined = ",".join(map(str, ports))
        dports, sports = f"-m multiport --dports {joined}", f"-m multiport --sports {joined}"
    def target(first: int) -> str:
        spec = f"--queue-num {first}" if cfg.queues == 1 else f"--queue-balance {first}:{first + cfg.queues - 1}"
        return spec + " --queue-bypass" if cfg.bypass else spec

    # The quoted segment's source port, by u32: IPv4 past both headers' lengths (ICMP header 8
    # bytes), with the quoted protocol TCP; IPv6 without extension headers (outer 40 + 8, quote 40).
    port_values = ",".join(map(str, ports))
    u32_v4 = f"0>>22&0x3C@16>>16&0xFF=6&&0>>22&0x3C@8>>22&0x3C@8>>16={port_values}"
    u32_v6 = f"52>>8&0xFF=6&&88>>16={port_values}"
    return {"dports": dports, "sports": sports, "queue": target(cfg.queue), "syn_queue": target(cfg.syn_queue),
            "dst": _DST, "src": _SRC,
            "mark": f"{cfg.mark:#x}",
            "too_big_v4": f'-p icmp --icmp-type fragmentation-needed -m u32 --u32 "{u32_v4}"',
            "too_big_v6": f'-p ipv6-icmp --icmpv6-type packet-too-big -m u32 --u32 "{u32_v6}"',
            "icmp_limit": f"-m limit --limit {TOO_BIG_RATE}/second --limit-burst {TOO_BIG_RATE}",
            "icmp_queue": f"--queue-num {cfg.queue}" + (" --queue-bypass" if cfg.bypass else "")}


def _nft_vars(cfg: RuleConfig) -> dict[str, str]:
    ports = sorted(set(cfg.ports))
    port_set = str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"
    def target(first: int) -> str:
        spec = f"num {first}" if cfg.queues == 1 else f"num {first}-{first + cfg.queues - 1}"
        return spec + " bypass" if cfg.bypass else spec

    # The quoted segment: IPv4 without options (0x45), TCP, its source port; IPv6: TCP right after
    # the quoted header, its source port. @th is the ICMP header (8 bytes), offsets in bits.
    return {"ports": port_set, "queue": target(cfg.queue), "syn_queue": target(cfg.syn_queue),
            "dst": _DST, "src": _SRC,
            "mark": f"{cfg.mark:#x}",
            "too_big_v4": f"icmp type destination-unreachable icmp code frag-needed @th,64,8 0x45 @th,136,8 6 "
                          f"@th,224,16 {port_set}",
            "too_big_v6": f"icmpv6 type packet-too-big @th,112,8 6 @th,384,16 {port_set}",
            "icmp_limit": f"limit rate {TOO_BIG_RATE}/second burst {TOO_BIG_RATE} packets",
            "icmp_queue": f"num {cfg.queue}" + (" bypass" if cfg.bypass else "")}


# Where a template's rule matches the server's address (${dst}, ${src}): filled in per family by
# _per_family, as one rule's address match differs between IPv4 and IPv6.
_DST, _SRC = "\x00dst\x00", "\x00src\x00"


def _per_family(text: str, cfg: RuleConfig, backend: Backend) -> str:
    """Each rule that matches the server's address: as it is without --server; else one rule per
    family with servers of that family (iptables: `-4`/`-6` lines, which the other family's
    restore skips; nft: `ip`/`ip6` address matches), none for a family without."""
    out = []
    for line in text.splitlines(keepends=True):
        if _DST not in line and _SRC not in line:
            out.append(line)
            continue
        if not cfg.servers:
            out.append(line.replace(_DST + " ", "").replace(_SRC + " ", ""))
            continue
        indent = line[: len(line) - len(line.lstrip())]
        for family, flag, proto in ((4, "-4", "ip"), (6, "-6", "ip6")):
            addrs = cfg.servers_of(family)
            if not addrs:
                continue
            if backend is Backend.IPTABLES:
                joined = ",".join(addrs)
                rule = line.replace(_DST, f"-d {joined}").replace(_SRC, f"-s {joined}")
                out.append(f"{flag} {rule.lstrip()}")
            else:
                match = addrs[0] if len(addrs) == 1 else "{ " + ", ".join(addrs) + " }"
                rule = line.replace(_DST, f"{proto} daddr {match}").replace(_SRC, f"{proto} saddr {match}")
                out.append(indent + rule.lstrip())
    return "".join(out)


def render(cfg: RuleConfig, backend: Backend, owner: Owner = Owner.OPERATOR) -> str:
    """The exact rules `install` would load (what `--dry-run` prints)."""
    if backend is Backend.IPTABLES:
        text = Template(template_text(f"iptables-{cfg.mode.value}.tmpl")).substitute(_iptables_vars(cfg))
        text = _per_family(text, cfg, backend)
        jumps = "".join(
            f'# then, for iptables and ip6tables alike (replacing any earlier jump):\n'
            f'#   -t raw -I {hook} 1 -m comment --comment "{jump_comment(cfg, owner)}" -j {chain}\n'
            for hook, chain in (("PREROUTING", CHAIN_PRE), ("OUTPUT", CHAIN_OUT))
        )
        return text + jumps
    text = _per_family(Template(template_text(f"nft-{cfg.mode.value}.tmpl")).substitute(_nft_vars(cfg)), cfg, backend)
    # The configuration fingerprint (and the owner) ride in the table's comment.
    return text.replace(
        f"table inet {NFT_TABLE} {{", f'table inet {NFT_TABLE} {{\n\tcomment "{jump_comment(cfg, owner)}"', 1
    )


def jump_comment(cfg: RuleConfig, owner: Owner = Owner.OPERATOR) -> str:
    """'synproxy FINGERPRINT', plus ' run' when `synproxy run` installed them (and will remove them)."""
    return f"synproxy {cfg.fingerprint}" + (" run" if owner is Owner.RUN else "")


_COMMENT = re.compile(r'comment "?synproxy ([0-9a-f]{12})( run)?')


# ---------------------------------------------------------------- running the tools


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        package = "nftables" if name == "nft" else "iptables"
        raise RulesError(f"{name} not found: install the {package} package (or choose the other --backend)")
    return path


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RulesError(_explain(argv[0], res.stderr))
    return res


def _explain(tool: str, stderr: str) -> str:
    text = " ".join(stderr.split())
    name = os.path.basename(tool)
    if "Permission denied" in text or "Operation not permitted" in text:
        return f"{name} was refused: installing firewall rules needs root (CAP_NET_ADMIN)"
    for needle, feature in (("NFQUEUE", "NFQUEUE (nfnetlink_queue, xt_NFQUEUE)"), ("CT", "the CT target (xt_CT)"),
                            ("queue", "nft queue (nft_queue, nfnetlink_queue)"), ("notrack", "conntrack (nf_conntrack)"),
                            ("addrtype", "the addrtype match (xt_addrtype)"), ("fib", "nft fib (nft_fib)"),
                            ("rpfilter", "the rpfilter match (ipt_rpfilter, ip6t_rpfilter)"),
                            ("u32", "the u32 match (xt_u32)"), ("limit", "the limit match (xt_limit, nft_limit)")):
        if needle in text and ("load" in text or "No such file" in text or "not supported" in text
                               or "No chain/target/match" in text):
            hint = ("use --backend iptables (its NFQUEUE target needs no nft_queue), or load the module"
                    if needle == "queue" else "load the module or use a kernel with netfilter queue support")
            return f"the kernel lacks {feature}: {hint}"
    return f"{name} failed: {text or 'no message'}"


def iptables_variant() -> str | None:
    """'nf_tables' or 'legacy' for the system's iptables, None if there is none."""
    path = shutil.which("iptables")
    if path is None:
        return None
    out = _run([path, "--version"], check=False).stdout
    return "nf_tables" if "nf_tables" in out else "legacy"


def nft_can_queue() -> bool:
    """Whether this kernel has nft's native queue statement (CONFIG_NFT_QUEUE).

    Asked of the kernel itself: `nft -c` runs the transaction and aborts it.
    Some kernels lack it while iptables' NFQUEUE target (also over nf_tables,
    through the xt compatibility layer) works.
    """
    nft = shutil.which("nft")
    if nft is None:
        return False
    probe = "table inet synproxy_probe { chain p { type filter hook prerouting priority raw; tcp dport 1 queue num 0; }; }"
    return _run([nft, "-c", "-f", "-"], stdin=probe, check=False).returncode == 0


def detect_backend() -> Backend:
    """nft when the system's iptables is itself nf_tables-based (or absent) and the
    kernel can queue from nft; iptables otherwise.

    A host on legacy iptables keeps its rules in the tool its operators use.
    """
    variant = iptables_variant()
    if variant == "legacy":
        return Backend.IPTABLES
    if nft_can_queue():
        return Backend.NFT
    if variant is not None:
        return Backend.IPTABLES
    raise RulesError("neither nft (with queue support) nor iptables was found: install the iptables package")


# ---------------------------------------------------------------- install / remove / show


@dataclass(frozen=True)
class Installed:
    """What `show` finds."""

    present: bool
    fingerprint: str | None  # of the configuration that installed them
    text: str  # the rules as the tool lists them
    owner: Owner = Owner.OPERATOR

    def are(self, cfg: RuleConfig, owner: Owner) -> bool:
        """Present, of this configuration, installed by this owner."""
        return self.present and self.fingerprint == cfg.fingerprint and self.owner is owner

    @property
    def queues(self) -> list[int]:
        """The NFQUEUE numbers the rules send packets to, as listed (iptables-save or nft)."""
        found: set[int] = set()
        for m in _QUEUE_TARGET.finditer(self.text):
            first = int(m.group(1) or m.group(3))
            last = m.group(2) or m.group(4)
            found.update(range(first, int(last) + 1 if last else first + 1))
        return sorted(found)

    @property
    def bypass(self) -> bool:
        """Whether the kernel passes the queues' packets on when nothing reads them (--queue-bypass)."""
        return _QUEUE_BYPASS.search(self.text) is not None


# iptables: --queue-num N, --queue-balance A:B; nft: queue [flags ...] num|to N[-M]
_QUEUE_TARGET = re.compile(r"--queue-(?:num|balance) (\d+)(?::(\d+))?|\bqueue (?:flags \S+ )?(?:num|to) (\d+)(?:-(\d+))?")
# iptables: --queue-bypass; nft: queue flags bypass ..., or queue num N bypass
_QUEUE_BYPASS = re.compile(r"--queue-bypass|\bqueue\b[^\n]*\bbypass\b")


def _iptables_installed(binary: str) -> Installed:
    save = _run([_tool(f"{binary}-save"), "-t", "raw"], check=False).stdout
    ours = [line for line in save.splitlines() if "SYNPROXY_PY" in line]
    fp, owner = None, Owner.OPERATOR
    for line in ours:
        m = _COMMENT.search(line)
        if m:
            fp, owner = m.group(1), Owner.RUN if m.group(2) else Owner.OPERATOR
    return Installed(bool(ours), fp, "\n".join(ours), owner)


def _nft_installed() -> Installed:
    res = _run([_tool("nft"), "list", "table", "inet", NFT_TABLE], check=False)
    if res.returncode != 0:
        return Installed(False, None, "")
    m = _COMMENT.search(res.stdout)
    if m is None:
        return Installed(True, None, res.stdout)
    return Installed(True, m.group(1), res.stdout, Owner.RUN if m.group(2) else Owner.OPERATOR)


def show(backend: Backend) -> list[tuple[str, Installed]]:
    """Installed synproxy rules per table family: [("ipv4", ...), ("ipv6", ...)] or [("inet", ...)]."""
    if backend is Backend.NFT:
        return [("inet", _nft_installed())]
    return [("ipv4", _iptables_installed("iptables")), ("ipv6", _iptables_installed("ip6tables"))]


def install(cfg: RuleConfig, backend: Backend, replace: bool = False, owner: Owner = Owner.OPERATOR) -> bool:
    """Install the rules; False when exactly these, of this owner, were already there (nothing done).

    Rules of this configuration left by another owner are taken over (the comment changes).
    Refuses, with RulesError, rules of another configuration unless `replace`.
    """
    installed = show(backend)
    if all(i.are(cfg, owner) for _, i in installed):
        return False
    other = [i for _, i in installed if i.present and i.fingerprint != cfg.fingerprint]
    if other and not replace:
        hint = ("or install with --replace" if owner is Owner.OPERATOR else
                "or give the same options as they were (rules an older synproxy installed, before an "
                "upgrade that changed their layout, match no options: remove them)")
        raise RulesError(
            f"synproxy rules from another configuration ({other[0].fingerprint}) are installed: "
            f"run `synproxy rules remove` first, {hint}"
        )
    if backend is Backend.NFT:
        _nft_install(cfg, owner)
    else:
        for binary in ("iptables", "ip6tables"):
            _iptables_install(binary, cfg, owner)
    return True


def install_for_run(cfg: RuleConfig, backend: Backend) -> bool:
    """`synproxy run`'s rules; True when they are the daemon's to remove on a clean stop.

    Rules of this configuration that the operator installed (`synproxy rules install`,
    say from synproxy-rules.service) stay the operator's: used as they are and left in
    place (False). Rules a killed `synproxy run` left behind are taken over.
    """
    installed = show(backend)
    if all(i.are(cfg, Owner.OPERATOR) for _, i in installed):
        return False
    install(cfg, backend, owner=Owner.RUN)
    return True


def _nft_install(cfg: RuleConfig, owner: Owner) -> None:
    nft = _tool("nft")
    # One transaction: create-if-missing, delete, load — never a moment without rules.
    script = f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{render(cfg, Backend.NFT, owner)}"
    _run([nft, "-f", "-"], stdin=script)


def _iptables_install(binary: str, cfg: RuleConfig, owner: Owner) -> None:
    restore = _tool(f"{binary}-restore")
    tool = _tool(binary)
    _run([restore, "--noflush"], stdin=render(cfg, Backend.IPTABLES))
    comment = jump_comment(cfg, owner)
    for hook, chain in (("PREROUTING", CHAIN_PRE), ("OUTPUT", CHAIN_OUT)):
        _delete_jumps(tool, hook, chain)
        _run([tool, "-w", "-t", "raw", "-I", hook, "1", "-m", "comment", "--comment", comment, "-j", chain])


def _delete_jumps(tool: str, hook: str, chain: str) -> None:
    """Delete every jump from a built-in chain to ours, whatever its comment."""
    listing = _run([tool, "-w", "-t", "raw", "-S", hook], check=False).stdout
    for line in listing.splitlines():
        if line.startswith(f"-A {hook} ") and line.endswith(f"-j {chain}"):
            rule = line.split()[2:]
            _run([tool, "-w", "-t", "raw", "-D", hook, *_unquote(rule)], check=False)


def _unquote(words: list[str]) -> list[str]:
    """Re-join `-S` output words so quoted comments survive as one argument."""
    out: list[str] = []
    buf: list[str] = []
    for w in words:
        if buf:
            buf.append(w)
            if w.endswith('"'):
                out.append(" ".join(buf).strip('"'))
                buf = []
        elif w.startswith('"') and not (w.endswith('"') and len(w) > 1):
            buf = [w]
        else:
            out.append(w.strip('"'))
    return out


def remove(backend: Backend, run_cfg: RuleConfig | None = None) -> bool:
    """Remove synproxy's rules (only them); False when there were none.

    With `run_cfg` (a stopping `synproxy run`), only rules of that configuration that
    a run installed: ones `synproxy rules install` put in place meanwhile (say with --replace)
    are the operator's and stay; a stopping run removed them, leaving the ports unprotected.
    """
    def ours(installed: Installed) -> bool:
        return installed.present if run_cfg is None else installed.are(run_cfg, Owner.RUN)

    if backend is Backend.NFT:
        if not ours(_nft_installed()):
            return False
        _run([_tool("nft"), "delete", "table", "inet", NFT_TABLE])
        return True
    found = False
    for binary in ("iptables", "ip6tables"):
        if not ours(_iptables_installed(binary)):
            continue
        found = True
        tool = _tool(binary)
        for hook, chain in (("PREROUTING", CHAIN_PRE), ("OUTPUT", CHAIN_OUT)):
            _delete_jumps(tool, hook, chain)
            _run([tool, "-w", "-t", "raw", "-F", chain], check=False)
            _run([tool, "-w", "-t", "raw", "-X", chain], check=False)
    return found
