"""Path MTU discovery through the proxy: a router between the proxy and the client whose link is
narrower than the client's MSS sends the server "fragmentation needed" (IPv4) or "packet too big"
(IPv6), quoting the segment as the client saw it. The server's TCP takes such a message only if the
quoted sequence number is one it sent, so without translation it ignored them, kept sending
segments too large for the path, and the download stalled for good (30 s timeouts, v4 and v6)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .e2e import Proxied, proxied

pytestmark = pytest.mark.e2e

NARROW_MTU = 1280  # the router's link toward the clients; the clients and the server have 1500
SIZE = 300_000


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def narrow(request: pytest.FixtureRequest) -> Iterator[tuple[Proxied, int]]:
    """The gateway lab with a narrower link toward the clients, and how many workers the proxy runs."""
    with proxied("gateway", clients=4, start=False) as px:
        px.lab.run("router", ["ip", "link", "set", "eth0", "mtu", str(NARROW_MTU)])
        px.start_proxy("--workers", str(request.param))
        yield px, request.param


def test_downloads_through_a_narrower_link_complete(narrow: tuple[Proxied, int]) -> None:
    """Every client, v4 and v6: the download arrives whole, and the proxy put the server's own
    sequence numbers back into the routers' messages. With two workers the messages all go to
    the first one, which hands on those about connections the second holds."""
    px, workers = narrow
    for host in ("client", "client2", "client3", "client4"):
        for family in (4, 6):
            res = px.client("get", px.url(family, f"/bytes/{SIZE}"), "--timeout", "10", host=host, timeout=60)
            assert res.get("bytes") == SIZE and res.get("status") == 200, (host, family, res)
    metrics = [px.worker_metrics(i) for i in range(workers)]
    translated = [m['synproxy_icmp_too_big_total{outcome="translated"}'] for m in metrics]
    assert sum(translated) >= 2, translated  # at least one message per family
    if workers == 2 and translated[1]:  # the second worker's came through the first
        assert metrics[0]['synproxy_icmp_too_big_total{outcome="not_held"}'] >= translated[1]
