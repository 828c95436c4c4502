"""`synproxy rules` against the real iptables and nft of a fresh network namespace."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from synproxy import rules as R
from synproxy.lab import Lab

pytestmark = pytest.mark.e2e
SYNPROXY = str(Path(sys.executable).parent / "synproxy")

OPERATOR_RULES = [
    ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "53", "-j", "CT", "--notrack"],
    ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
    ["ip6tables", "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "--dport", "25", "-j", "DROP"],
    ["nft", "add", "table", "inet", "operator"],
    ["nft", "add", "chain", "inet", "operator", "in", "{ type filter hook input priority 0; }"],
    ["nft", "add", "rule", "inet", "operator", "in", "tcp", "dport", "2222", "drop"],
]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        for argv in OPERATOR_RULES:
            lab.run("server", argv)
        yield lab


def snapshot(lab: Lab) -> list[str]:
    """Every rule and every non-built-in chain of the namespace, without counters or handles.

    Empty built-in chains are left out: iptables-nft creates them on first use
    (policy accept, no rules, no effect) and never deletes them.
    """
    items: list[str] = []
    for tool in ("iptables-save", "ip6tables-save"):
        table = ""
        for line in lab.run("server", [tool]).stdout.splitlines():
            if line.startswith("*"):
                table = line
            elif line.startswith("-A") or (line.startswith(":") and " - " in line):
                items.append(f"{tool} {table} {line}")
    ruleset = json.loads(lab.run("server", ["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
    for entry in ruleset:
        if "rule" in entry:
            rule = dict(entry["rule"])
            rule.pop("handle", None)
            expr = [e for e in rule.pop("expr") if "counter" not in e]
            items.append(f"nft rule {json.dumps(rule, sort_keys=True)} {json.dumps(expr, sort_keys=True)}")
        elif "chain" in entry and "hook" not in entry["chain"]:
            items.append(f"nft chain {entry['chain']['family']} {entry['chain']['table']} {entry['chain']['name']}")
    return sorted(items)


def cli(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return lab.run("server", [SYNPROXY, *args], check=check)




def nft_can_queue(lab: Lab) -> bool:
    code = "from synproxy.rules import nft_can_queue; print(nft_can_queue())"
    return lab.run("server", [sys.executable, "-c", code]).stdout.strip() == "True"


@pytest.mark.parametrize("mode", ["local", "gateway"])
@pytest.mark.parametrize("ports", [("8080",), ("80", "443", "8443")])
def test_iptables_install_twice_then_remove_restores_everything(lab: Lab, mode: str, ports: tuple[str, ...]) -> None:
    before = snapshot(lab)
    port_args = [a for p in ports for a in ("--port", p)]
    args = ["rules", "install", "--backend", "iptables", "--mode", mode, "--queue", "7", "--queues", "2", *port_args]
    assert "installed" in cli(lab, *args).stdout
    first = snapshot(lab)
    assert "already installed" in cli(lab, *args).stdout
    assert snapshot(lab) == first  # idempotent
    for tool in ("iptables", "ip6tables"):
        raw = lab.run("server", [tool, "-t", "raw", "-S"]).stdout
        assert raw.count("-j SYNPROXY_PY_PRE") == 1 and raw.count("-j SYNPROXY_PY_OUT") == 1
        assert "--queue-balance 7:8" in raw and "--notrack" in raw
        if tool == "iptables":  # ours come before the operator's own raw rules
            assert raw.index("-A PREROUTING -m comment") < raw.index("-A PREROUTING -p udp")
    shown = cli(lab, "rules", "show", "--backend", "iptables", "--mode", mode, "--queue", "7", "--queues", "2",
                *port_args, check=False)
    assert "matches the configuration" in shown.stdout
    # No `synproxy run` reads the queues here: said, with exit status 4.
    assert shown.returncode == 4, shown
    assert ("ipv4: no process reads queue(s) 7, 8, 9, 10, so their packets are dropped (fail-closed): start "
            "`synproxy run` (systemctl start synproxy), or `synproxy rules remove`") in shown.stdout, shown.stdout
    other = cli(lab, "rules", "install", "--backend", "iptables", "--port", "9999", check=False)
    assert other.returncode == 1 and "another configuration" in other.stderr and other.stderr.count("\n") == 1
    assert snapshot(lab) == first
    differs = cli(lab, "rules", "show", "--backend", "iptables", "--port", "9999", check=False)
    assert differs.returncode == 3 and "DIFFERENT" in differs.stdout
    assert "removed" in cli(lab, "rules", "remove", "--backend", "iptables").stdout
    assert snapshot(lab) == before
    assert "were not installed" in cli(lab, "rules", "remove", "--backend", "iptables").stdout


def test_replace_switches_configuration(lab: Lab) -> None:
    before = snapshot(lab)
    cli(lab, "rules", "install", "--backend", "iptables", "--port", "80")
    cli(lab, "rules", "install", "--backend", "iptables", "--port", "81", "--replace")
    raw = lab.run("server", ["iptables", "-t", "raw", "-S"]).stdout
    assert "--dport 81" in raw and "--dport 80 " not in raw and raw.count("-j SYNPROXY_PY_PRE") == 1
    cli(lab, "rules", "remove", "--backend", "iptables")
    assert snapshot(lab) == before


@pytest.mark.parametrize("mode", ["local", "gateway"])
def test_nft_rules(lab: Lab, mode: str) -> None:
    """Real nft: installed and removed when this kernel can queue from nft; otherwise a clear refusal."""
    before = snapshot(lab)
    args = ["rules", "install", "--backend", "nft", "--mode", mode, "--port", "80", "--port", "443"]
    if not nft_can_queue(lab):
        res = cli(lab, *args, check=False)
        assert res.returncode == 1 and "kernel lacks nft queue" in res.stderr and "use --backend iptables" in res.stderr
        assert snapshot(lab) == before
        # The rendering is still checked by nft itself, with the queue statements (the only
        # part this kernel lacks, CONFIG_NFT_QUEUE) swapped for counters.
        cfg = R.RuleConfig(ports=(80, 443), mode=R.Mode(mode))
        text = re.sub(r"queue num \S+( bypass)?", "counter", R.render(cfg, R.Backend.NFT))
        check = lab.run("server", ["nft", "-c", "-f", "-"], input=text, check=False)
        assert check.returncode == 0, check.stderr
        return
    cli(lab, *args)
    first = snapshot(lab)
    cli(lab, *args)
    assert snapshot(lab) == first
    assert "table inet synproxy_py" in first
    cli(lab, "rules", "remove", "--backend", "nft")
    assert snapshot(lab) == before


def test_dry_run_prints_exact_rules_without_root_changes(lab: Lab) -> None:
    before = snapshot(lab)
    out = cli(lab, "rules", "install", "--dry-run", "--backend", "iptables", "--port", "8080", "--queue-bypass").stdout
    assert "-A SYNPROXY_PY_PRE -p tcp --dport 8080 -m addrtype --dst-type LOCAL -j NFQUEUE --queue-num 0 --queue-bypass" in out
    assert "-I PREROUTING 1" in out
    nft = cli(lab, "rules", "install", "--dry-run", "--backend", "nft", "--port", "8080").stdout
    assert "table inet synproxy_py" in nft and "queue num 0" in nft
    assert snapshot(lab) == before


def test_bad_values_are_one_line_errors(lab: Lab) -> None:
    res = cli(lab, "rules", "install", "--backend", "iptables", check=False)
    assert res.returncode == 2 and "no protected port" in res.stderr
    res = cli(lab, "rules", "install", "--port", "70000", check=False)
    assert res.returncode == 2 and "70000" in res.stderr


NFT_LIFECYCLE = """
import json, re, sys
from synproxy import rules as R

real_render = R.render


def render(cfg, backend, owner=R.Owner.OPERATOR):
    # This kernel may lack nft's queue statement (CONFIG_NFT_QUEUE): counters stand in for
    # it, so the rest (table, chains, notrack, fib, marks, the transaction) is the real thing.
    text = real_render(cfg, backend, owner)
    return re.sub(r"queue num \\S+( bypass)?", "counter", text) if backend is R.Backend.NFT else text


R.render = render
step, mode, ports = sys.argv[1], R.Mode(sys.argv[2]), tuple(map(int, sys.argv[3].split(",")))
cfg = R.RuleConfig(ports=ports, mode=mode, queue=3, queues=2, bypass=True)
try:
    if step == "install":
        print(json.dumps({"changed": R.install(cfg, R.Backend.NFT)}))
    elif step == "replace":
        print(json.dumps({"changed": R.install(cfg, R.Backend.NFT, replace=True)}))
    else:
        print(json.dumps({"removed": R.remove(R.Backend.NFT)}))
except R.RulesError as err:
    print(json.dumps({"error": str(err)}))
"""


@pytest.mark.parametrize("mode", ["local", "gateway"])
def test_nft_lifecycle_with_counters_for_queues(lab: Lab, mode: str) -> None:
    """install twice, refuse another config, replace, remove: the operator's nft ruleset is as before."""

    def step(*args: str) -> dict[str, object]:
        return json.loads(lab.python("server", NFT_LIFECYCLE, *args).stdout)

    before = snapshot(lab)
    assert step("install", mode, "80,443") == {"changed": True}
    first = snapshot(lab)
    listing = lab.run("server", ["nft", "list", "table", "inet", R.NFT_TABLE]).stdout
    assert "notrack" in listing and "0x00005350" in listing
    assert ("fib daddr type local" in listing) == (mode == "local")
    assert step("install", mode, "80,443") == {"changed": False}
    assert snapshot(lab) == first
    refused = step("install", mode, "81")
    assert "another configuration" in str(refused.get("error"))
    assert snapshot(lab) == first
    assert step("replace", mode, "81") == {"changed": True}
    listing = lab.run("server", ["nft", "list", "table", "inet", R.NFT_TABLE]).stdout
    assert "dport 81 " in listing and "443" not in listing
    assert step("remove", mode, "81") == {"removed": True}
    assert snapshot(lab) == before
    assert step("remove", mode, "81") == {"removed": False}


def test_too_many_ports_for_iptables_is_refused_before_touching_anything(lab: Lab) -> None:
    before = snapshot(lab)
    ports = [a for p in range(1000, 1016) for a in ("--port", str(p))]
    res = cli(lab, "rules", "install", "--backend", "iptables", *ports, check=False)
    assert res.returncode == 1 and "at most 15 ports" in res.stderr and res.stderr.count("\n") == 1
    assert snapshot(lab) == before
    cfg = R.RuleConfig(ports=tuple(range(1000, 1016)))
    with pytest.raises(R.RulesError, match="at most 15"):
        R.render(cfg, R.Backend.IPTABLES)
    assert "{ 1000, 1001," in R.render(cfg, R.Backend.NFT)  # nft sets have no such limit


def test_templates_ship_with_the_package() -> None:
    """Every template in rules/ is packaged as synproxy/_rules (see pyproject.toml)."""
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    conf = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert conf["package-dir"]["synproxy._rules"] == "rules" and "synproxy._rules" in conf["packages"]
    assert conf["package-data"]["synproxy._rules"] == ["*.tmpl"]
    names = {p.name for p in (repo / "rules").iterdir()}
    assert names and all(n.endswith(".tmpl") for n in names)
    for name in names:
        assert R.template_text(name) == (repo / "rules" / name).read_text()


def test_dry_run_errors_are_one_line_too(lab: Lab) -> None:
    ports = [a for p in range(1000, 1016) for a in ("--port", str(p))]
    res = cli(lab, "rules", "install", "--dry-run", "--backend", "iptables", *ports, check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "at most 15 ports" in res.stderr


@pytest.mark.parametrize("backend", list(R.Backend))
@pytest.mark.parametrize("queue, queues, bypass, want", [(5, 2, True, [5, 6, 7, 8]), (0, 1, False, [0, 1])])
def test_installed_rules_tell_their_queues_and_bypass(backend: R.Backend, queue: int, queues: int, bypass: bool,
                                                      want: list[int]) -> None:
    """What `rules show` checks against the bound queues, read back from the rules' text."""
    cfg = R.RuleConfig(ports=(8080,), queue=queue, queues=queues, bypass=bypass)
    installed = R.Installed(True, cfg.fingerprint, R.render(cfg, backend))
    assert installed.queues == want and installed.bypass is bypass
    listed = R.Installed(True, None, "tcp dport 8080 queue flags bypass to 5-6\ntcp sport 8080 queue to 7")  # nft list
    assert listed.queues == [5, 6, 7] and listed.bypass


@pytest.mark.parametrize("mode", ["local", "gateway"])
def test_servers_restrict_the_rules_per_family(lab: Lab, mode: str) -> None:
    """--server: the rules match only the servers' addresses, each family its own; a family with
    none gets no rule for the protected ports (its traffic passes, unproxied); the ICMP rules stay."""
    before = snapshot(lab)
    args = ["rules", "install", "--backend", "iptables", "--mode", mode, "--port", "8080",
            "--server", "198.18.0.1", "--server", "203.0.113.0/28"]
    out = cli(lab, *args).stdout
    try:
        assert "servers 198.18.0.1,203.0.113.0/28" in out, out
        v4 = lab.run("server", ["iptables", "-t", "raw", "-S"]).stdout
        v6 = lab.run("server", ["ip6tables", "-t", "raw", "-S"]).stdout
        port_rules = [line for line in v4.splitlines() if "port 8080" in line]
        assert len(port_rules) == 2 * 6, v4  # six rules match the ports, in either mode
        for line in port_rules:  # iptables lists the two servers as one rule each
            assert ("-d 198.18.0.1/32" in line or "-s 198.18.0.1/32" in line
                    or "-d 203.0.113.0/28" in line or "-s 203.0.113.0/28" in line), line
        assert "port 8080" not in v6 and "-p ipv6-icmp" in v6, v6
        # the servers in another order, or repeated, are the same configuration
        again = cli(lab, "rules", "install", "--backend", "iptables", "--mode", mode, "--port", "8080",
                    "--server", "203.0.113.0/28", "--server", "198.18.0.1", "--server", "198.18.0.1")
        assert "already installed" in again.stdout
        # without --server it is another configuration
        other = cli(lab, "rules", "install", "--backend", "iptables", "--mode", mode, "--port", "8080", check=False)
        assert other.returncode == 1 and "another configuration" in other.stderr
    finally:
        assert "removed" in cli(lab, "rules", "remove", "--backend", "iptables").stdout
    assert snapshot(lab) == before


def test_server_rendering_without_a_kernel() -> None:
    """Without --server the rules are exactly what they were; with, one rule per family that has
    servers (iptables -4/-6 lines, nft ip/ip6 matches)."""
    plain = R.RuleConfig(ports=(80,), mode=R.Mode.GATEWAY)
    assert "-d " not in R.render(plain, R.Backend.IPTABLES) and "daddr" not in R.render(plain, R.Backend.NFT)
    cfg = R.RuleConfig(ports=(80, 443), mode=R.Mode.GATEWAY, servers=("2001:db8::/64", "192.0.2.7"))
    assert cfg.servers == ("192.0.2.7", "2001:db8::/64") and cfg.fingerprint != plain.fingerprint
    ipt = R.render(cfg, R.Backend.IPTABLES)
    assert "-4 -A SYNPROXY_PY_PRE -d 192.0.2.7 -p tcp -m multiport --dports 80,443 -j CT --notrack" in ipt
    assert "-6 -A SYNPROXY_PY_PRE -s 2001:db8::/64 -p tcp -m multiport --sports 80,443 -m rpfilter --invert -j DROP" in ipt
    nft = R.render(cfg, R.Backend.NFT)
    assert "ip daddr 192.0.2.7 tcp dport { 80, 443 } notrack" in nft
    assert "ip6 saddr 2001:db8::/64 tcp sport { 80, 443 } fib saddr . iif oif missing drop" in nft
    v4_only = R.render(R.RuleConfig(ports=(80,), servers=("192.0.2.7",)), R.Backend.NFT)
    assert "ip6 daddr" not in v4_only and "ip daddr 192.0.2.7 tcp dport 80" in v4_only
    with pytest.raises(R.RulesError, match="host bits set"):
        R.RuleConfig(ports=(80,), servers=("192.0.2.7/24",))
