"""Connections the proxy gives up, end to end. Idle ones, on a shortened scale (--idle-timeout 6 s
stands for the default 7440 s; the 10-minute idle is an engine-level test): idle within the limit
still delivers, idle beyond it is forgotten and counted, and both ends' sockets are reset at once.
And every open one at a clean stop, whose state goes with the process: both ends reset at once."""

from __future__ import annotations

import subprocess
import time

import pytest

from .e2e import PYTHON, SINK_PORT, proxied

pytestmark = pytest.mark.e2e

HOLD = (
    "import json,socket,sys,time\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
    "try:\n"
    "  s.sendall(b'early');time.sleep(float(sys.argv[3]));s.sendall(b'-late');s.shutdown(socket.SHUT_WR)\n"
    "  s.settimeout(float(sys.argv[4]))\n"
    "  r=b''\n"
    "  while True:\n"
    "    p=s.recv(65536)\n"
    "    if not p: break\n"
    "    r+=p\n"
    "  print(bytes.fromhex(json.loads(r)['data']).decode())\n"
    "except OSError as e: print(type(e).__name__)\n"
)

# Sends, then waits for an answer that never comes: prints how the wait ended and after how long.
WAIT = (
    "import socket,sys,time\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
    "s.sendall(b'early');s.settimeout(float(sys.argv[3]));t=time.monotonic()\n"
    "try: s.recv(65536);print('answered')\n"
    "except OSError as e: print(type(e).__name__)\n"
    "print(round(time.monotonic()-t,1))\n"
)


def test_idle_within_limit_delivers_and_beyond_is_forgotten() -> None:
    with proxied("local", start=False) as px:
        px.start_proxy("--idle-timeout", "6")
        within = px.lab.run("client", [PYTHON, "-c", HOLD, px.server_addr(4), str(SINK_PORT), "4", "5"], timeout=30)
        assert within.stdout.strip() == "early-late"
        resets = px.snmp("server")["EstabResets"], px.snmp("client")["EstabResets"]
        waited = px.lab.run("client", [PYTHON, "-c", WAIT, px.server_addr(4), str(SINK_PORT), "30"], timeout=60)
        m = px.metrics()
        assert m['synproxy_connections_closed_total{reason="idle"}'] >= 1
        # Both sockets were reset by the proxy when it forgot the connection (EstabResets counts
        # an established socket that a RST closed): the server is not left waiting for its client,
        # and the client learns at once instead of when its next write times out, minutes later.
        assert px.snmp("server")["EstabResets"] - resets[0] == 1
        assert px.snmp("client")["EstabResets"] - resets[1] == 1
        how, after = waited.stdout.split()
        assert how == "ConnectionResetError", waited.stdout
        assert 6 <= float(after) < 12, waited.stdout  # the idle timeout, and at most a sweep or two
        # A client that slept through it: its late bytes find no translation (and no socket).
        beyond = px.lab.run("client", [PYTHON, "-c", HOLD, px.server_addr(4), str(SINK_PORT), "10", "3"], timeout=30)
        assert beyond.stdout.strip() in ("TimeoutError", "ConnectionResetError", "BrokenPipeError"), beyond.stdout
        assert px.client("chunks", px.server_addr(4), str(SINK_PORT), "--chunks", "3,5")["ok"]


def test_a_clean_stop_resets_open_connections_at_both_ends() -> None:
    with proxied("local", start=False) as px:
        px.start_proxy()
        resets = px.snmp("server")["EstabResets"], px.snmp("client")["EstabResets"]
        waiting = px.lab.popen("client", [PYTHON, "-c", WAIT, px.server_addr(4), str(SINK_PORT), "30"],
                               stdout=subprocess.PIPE, text=True)
        time.sleep(2)  # connected, its bytes delivered, waiting for an answer
        assert px.stop_proxy() == 0
        out, _ = waiting.communicate(timeout=40)
        how, after = out.split()
        # Reset when the proxy stopped, not left to time out (here at 30 s; a write, after minutes).
        assert how == "ConnectionResetError", out
        assert float(after) < 5, out  # about 2 s of waiting, then the stop (within its poll's 1 s)
        assert px.snmp("server")["EstabResets"] - resets[0] == 1
        assert px.snmp("client")["EstabResets"] - resets[1] == 1
        assert "reset 1 connections at both ends" in px.log()
        px.start_proxy()  # and new connections work at once
        assert px.client("chunks", px.server_addr(4), str(SINK_PORT), "--chunks", "3,5")["ok"]
