"""`synproxy status`'s summary from two scrapes: rates where rates matter, the operator's next step."""

from __future__ import annotations

from synproxy.status import Samples, summary


def scrape(syn: float, shed: float, syn_drops: float, traffic_drops: float = 0.0) -> Samples:
    return {
        ("synproxy_build_info", (("version", "9.9"),)): 1.0,
        ("synproxy_syn_received_total", ()): syn,
        ("synproxy_synack_sent_total", ()): syn - shed,
        ("synproxy_ack_valid_total", ()): 10.0,
        ("synproxy_shed_total", (("reason", "synack_rate_source"),)): shed,
        ("synproxy_shed_total", (("reason", "global_pending"),)): 0.0,
        ("synproxy_nfqueue_waiting", (("queue", "syn"),)): 900.0,
        ("synproxy_nfqueue_waiting", (("queue", "traffic"),)): 0.0,
        ("synproxy_nfqueue_dropped_total", (("cause", "queue_full"), ("queue", "syn"))): syn_drops,
        ("synproxy_nfqueue_dropped_total", (("cause", "socket_full"), ("queue", "syn"))): 0.0,
        ("synproxy_nfqueue_dropped_total", (("cause", "queue_full"), ("queue", "traffic"))): traffic_drops,
    }


def test_flood_beyond_capacity() -> None:
    text = summary(scrape(1_000_000, 5_000, 200_000), scrape(1_080_000, 6_000, 230_000), 2.0, 1)
    assert "state           under a SYN flood" in text
    assert "SYNs                40,000/s" in text
    assert "shed            synack_rate_source 500/s (6,000 total)" in text  # zero reasons left out
    assert ("syn queue       waiting 900, kernel drops 15,000/s (230,000 total): more SYNs than the workers "
            "answer (add workers or cores)") in text
    assert "traffic queue   waiting 0, kernel drops 0/s (0 total)" in text
    assert "established traffic is being lost" not in text


def test_quiet_proxy_and_lost_traffic() -> None:
    text = summary(scrape(100, 0, 0, 5), scrape(110, 0, 0, 9), 1.0, 2)
    assert "2 worker(s) answering" in text and "state           normal" in text
    assert "shed            nothing" in text
    assert "syn queue       waiting 900, kernel drops 0/s (0 total)" in text
    assert "traffic queue   waiting 0, kernel drops 4/s (9 total): established traffic is being lost" in text
