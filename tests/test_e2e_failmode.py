"""What a dead daemon leaves behind (issue 4, overload behaviour): its rules stay, and the
queues they send to have no reader. By default that is fail-closed: protected traffic is
dropped and nothing reaches the server. With --queue-bypass it is fail-open: traffic
goes to the server unprotected, as documented with its risk."""

from __future__ import annotations

import os
import signal

import pytest

from .e2e import Proxied, proxied, synproxy_rules_in

pytestmark = pytest.mark.e2e


def connects(px: Proxied, timeout: float) -> bool:
    """Whether one GET from the client completes within `timeout` (a SYN retransmission fits in 3 s)."""
    return px.client("many", px.url(4, "/"), "--count", "1", "--timeout", str(timeout))["ok"] == 1


def kill_daemon(px: Proxied) -> None:
    """SIGKILL: no chance to remove its rules, as after a crash or the OOM killer."""
    assert px.proc is not None
    os.kill(px.proc.pid, signal.SIGKILL)
    px.proc.wait(10)


@pytest.mark.parametrize("mode", ["local", "gateway"])
@pytest.mark.parametrize("bypass", [False, True], ids=["default", "queue-bypass"])
def test_killed_daemon_fails_closed_unless_bypass_asked(mode: str, bypass: bool) -> None:
    with proxied(mode, start=False) as px:
        px.count_server_syns()
        px.start_proxy(*(["--queue-bypass"] if bypass else []))
        assert connects(px, 5)
        through_proxy = px.server_syns()
        assert through_proxy >= 1  # the proxy's own SYN to the server (the replayed handshake)

        kill_daemon(px)
        assert synproxy_rules_in(px.lab, px.proxy_host)  # left behind
        if bypass:
            assert connects(px, 3)  # fail-open: straight to the server, unprotected
            assert px.server_syns() == through_proxy + 1
        else:
            assert not connects(px, 3)  # fail-closed: the SYN and its retransmission are dropped
            assert px.server_syns() == through_proxy

        px.start_proxy(*(["--queue-bypass"] if bypass else []))  # back: new connections work at once
        assert connects(px, 3)
