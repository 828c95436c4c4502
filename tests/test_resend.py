"""The resend ring: fixed memory, oldest first, overwritten when full."""

from __future__ import annotations

import pytest

from synproxy.resend import MAX_SYNACK, ResendRing


def test_packets_come_out_oldest_first_with_their_due_times() -> None:
    ring = ResendRing(4)
    assert ring.next_due() is None and len(ring) == 0
    ring.push(1.0, b"a" * 60)
    ring.push(2.5, b"b" * MAX_SYNACK)
    assert len(ring) == 2 and ring.next_due() == 1.0
    assert ring.pop() == b"a" * 60 and ring.next_due() == 2.5
    assert ring.pop() == b"b" * MAX_SYNACK and ring.next_due() is None


def test_a_full_ring_overwrites_the_oldest() -> None:
    ring = ResendRing(3)
    for i in range(7):
        ring.push(float(i), bytes([i]) * 40)
    assert len(ring) == 3 and ring.next_due() == 4.0
    assert [ring.pop()[0] for _ in range(3)] == [4, 5, 6]
    assert ring.next_due() is None


def test_its_memory_is_allocated_once() -> None:
    ring = ResendRing(8)
    size = len(ring._buf)  # noqa: SLF001 - the one thing this test is about
    for i in range(1000):
        ring.push(float(i), b"x" * (40 + i % 41))
    assert len(ring._buf) == size  # noqa: SLF001


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        ResendRing(0)
    with pytest.raises(ValueError):
        ResendRing(1).push(0.0, b"x" * (MAX_SYNACK + 1))
