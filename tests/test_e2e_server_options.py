"""A server that declines options the proxy offered clients on its behalf (real kernels).

Until a server has been seen, the proxy's SYN-ACK offers what Linux does by default (SACK,
timestamps, window scaling). A server with net.ipv4.tcp_sack, tcp_timestamps or
tcp_window_scaling at 0 then declines them in its own handshake: that first connection must
still carry data both ways intact, and the next client must be offered what the server takes
(window scaling excepted: the proxy always scales toward the client and rescales the
server's unscaled windows).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from synproxy.peers import pattern_sha256

from .e2e import SINK_PORT, Proxied, proxied

pytestmark = pytest.mark.e2e

SIZE = 3_000_000
INFO_FIELD = {"tcp_timestamps": "timestamps", "tcp_sack": "sack", "tcp_window_scaling": "wscale_ok"}


@pytest.fixture(scope="module", params=["local", "gateway"])
def px(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    with proxied(request.param, start=False) as p:
        yield p


def negotiated(px: Proxied, family: int) -> tuple[dict[str, object], dict[str, object]]:
    """(the client's, the server's) view of a connection to the sink."""
    res = px.client("chunks", px.server_addr(family), str(SINK_PORT), "--chunks", "1000,1000")
    assert res["ok"], res
    return res["client_tcp"], res["server_tcp"]  # type: ignore[return-value]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("knob", list(INFO_FIELD))
def test_a_server_declining_an_option_still_gets_every_byte(px: Proxied, knob: str, family: int) -> None:
    field = INFO_FIELD[knob]
    px.lab.sysctl("server", f"net.ipv4.{knob}", "0")
    px.start_proxy()  # nothing learnt yet: the proxy offers the option on the server's behalf
    try:
        client, server = negotiated(px, family)
        assert client[field] and not server[field], (client, server)
        got = px.client("get", px.url(family, f"/bytes/{SIZE}"), timeout=60)
        assert got["sha256"] == pattern_sha256(SIZE), got
        sent = px.client("upload", px.url(family, "/upload"), "--size", str(SIZE), timeout=60)
        assert sent["ok"], sent
        client, server = negotiated(px, family)  # learnt from the first handshake with the sink
        assert client[field] == (field == "wscale_ok") and not server[field], (client, server)
    finally:
        px.stop_proxy()
        px.lab.sysctl("server", f"net.ipv4.{knob}", "1")
