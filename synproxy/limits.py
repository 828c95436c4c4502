"""Load shedding: caps on pending/established connections and SYN-ACK rate limits.

Pure and clock-free like the engine. Sources are grouped by prefix (/32 and
/128 by default, /24 and /64 selectable) so an attacker cannot dodge a
per-source cap by spreading over a subnet.

The SYN-ACK token buckets live in a fixed array indexed by a keyed hash of the
source prefix: memory is the same whatever the flood, and no state is created
per unvalidated SYN. Two prefixes that share a bucket share its rate, which
only ever makes the limit stricter for them.

Beyond capacity, RetryMemory (two fixed bitmaps) remembers the first attempts the
proxy shed so that their retransmissions are answered first.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from enum import Enum


class Shed(Enum):
    """Why a packet was refused; the value is the metric label."""

    PER_SOURCE_PENDING = "per_source_pending"
    PER_SOURCE_ESTABLISHED = "per_source_established"
    GLOBAL_PENDING = "global_pending"
    GLOBAL_ESTABLISHED = "global_established"
    SYNACK_RATE_SOURCE = "synack_rate_source"
    SYNACK_RATE_GLOBAL = "synack_rate_global"
    OVERLOAD = "overload"  # more SYNs than the proxy can answer: a first attempt waits for its retransmission


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Caps (0 = unlimited) and rates (SYN-ACKs per second; 0 = unlimited)."""

    max_pending_per_source: int = 256
    max_established_per_source: int = 4096
    max_pending: int = 65536
    max_established: int = 1_000_000
    source_prefix_v4: int = 32
    source_prefix_v6: int = 128
    synack_rate_per_source: float = 1000.0
    synack_burst_per_source: float = 2000.0
    synack_rate_global: float = 0.0
    synack_buckets: int = 1 << 16  # size of the hashed bucket array (a power of two)

    def __post_init__(self) -> None:
        # Each error names the option (LimitError): --max-pending, config key max_pending.
        for name in ("max_pending_per_source", "max_established_per_source", "max_pending", "max_established"):
            if getattr(self, name) < 0:
                raise LimitError(name, f"must be 0 (unlimited) or more, got {getattr(self, name)}")
        if not 1 <= self.source_prefix_v4 <= 32:
            raise LimitError("source_prefix_v4", f"must be 1..32, got {self.source_prefix_v4}")
        if not 1 <= self.source_prefix_v6 <= 128:
            raise LimitError("source_prefix_v6", f"must be 1..128, got {self.source_prefix_v6}")
        for name in ("synack_rate_per_source", "synack_rate_global"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise LimitError(name, f"must be a number of SYN-ACKs per second, 0 (unlimited) or more, "
                                 f"got {value}")
        # A bucket that never holds one token answers nobody: every SYN would be shed.
        if not (math.isfinite(self.synack_burst_per_source) and self.synack_burst_per_source >= 1):
            raise LimitError("synack_burst_per_source", f"must be at least 1 SYN-ACK, "
                             f"got {self.synack_burst_per_source}")
        if self.synack_buckets <= 0 or self.synack_buckets & (self.synack_buckets - 1):
            raise ValueError("synack_buckets must be a power of two")  # not an operator's option


class LimitError(ValueError):
    """A bad limit, in the operator's words (`--max-pending must be ...`); `key` is the field,
    which is also the option's config key, so the CLI can say where the value came from."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{_flag(key)} {problem}")
        self.key = key


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def prefix_of(addr: bytes, bits: int) -> bytes:
    """The first `bits` bits of a packed address, as bytes (the grouping key)."""
    full, rest = divmod(bits, 8)
    if not rest:
        return addr[:full]
    return addr[:full] + bytes((addr[full] & (0xFF << (8 - rest)) & 0xFF,))


class TokenBuckets:
    """A fixed array of token buckets addressed by a hash."""

    def __init__(self, size: int, rate: float, burst: float) -> None:
        self.mask = size - 1
        self.rate = rate
        self.burst = burst
        self.tokens = array("d", [burst]) * size
        self.stamp = array("d", [0.0]) * size

    def take(self, key: object, now: float) -> bool:
        i = hash(key) & self.mask  # str/bytes hashes are SipHash with a per-process key
        elapsed = now - self.stamp[i]
        if elapsed < 0:  # the wall clock stepped back: refill nothing, never drain
            elapsed = 0.0
        tokens = self.tokens[i] + elapsed * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp[i] = now
        if tokens < 1.0:
            self.tokens[i] = tokens
            return False
        self.tokens[i] = tokens - 1.0
        return True


class GlobalBucket:
    """One token bucket for the whole proxy."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.tokens = self.burst
        self.stamp = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Limits:
    """Counts validated connections per source prefix and decides what to shed.

    Counts are plain ints in two dicts (small ints are shared objects in CPython), not an
    object per source: a source costs one dict entry per state it has connections in.
    """

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.pending_by_source: dict[bytes, int] = {}
        self.established_by_source: dict[bytes, int] = {}
        self.pending = 0
        self.established = 0
        self._synack = (
            TokenBuckets(config.synack_buckets, config.synack_rate_per_source, config.synack_burst_per_source)
            if config.synack_rate_per_source
            else None
        )
        self._global = GlobalBucket(config.synack_rate_global) if config.synack_rate_global else None
        # Prefix lengths for source_key, None for a whole address (the default): once per SYN.
        self._v4_bits = None if config.source_prefix_v4 == 32 else config.source_prefix_v4
        self._v6_bits = None if config.source_prefix_v6 == 128 else config.source_prefix_v6

    @property
    def sources(self) -> set[bytes]:
        """Source prefixes with at least one pending or established connection."""
        return set(self.pending_by_source) | set(self.established_by_source)

    def source_key(self, family: int, addr: bytes) -> bytes:
        bits = self._v4_bits if family == 4 else self._v6_bits
        return addr if bits is None else prefix_of(addr, bits)

    def _over_cap(self, source: bytes) -> Shed | None:
        """The first cap a new connection from `source` would exceed. The established caps count
        pending connections too: each is established once the server answers, and counted
        apart, a source with 4,096 established connections and its handshakes in flight
        was seen holding 4,108 under a cap of 4,096."""
        cfg = self.config
        if cfg.max_pending and self.pending >= cfg.max_pending:
            return Shed.GLOBAL_PENDING
        if cfg.max_established and self.established + self.pending >= cfg.max_established:
            return Shed.GLOBAL_ESTABLISHED
        pending = self.pending_by_source.get(source, 0)
        if cfg.max_pending_per_source and pending >= cfg.max_pending_per_source:
            return Shed.PER_SOURCE_PENDING
        if (cfg.max_established_per_source
                and self.established_by_source.get(source, 0) + pending >= cfg.max_established_per_source):
            return Shed.PER_SOURCE_ESTABLISHED
        return None

    def check_syn(self, source: bytes, now: float) -> Shed | None:
        """Whether a SYN from this source may get a SYN-ACK (None = yes)."""
        over = self._over_cap(source)
        if over is not None:
            return over
        if self._synack is not None and not self._synack.take(source, now):
            return Shed.SYNACK_RATE_SOURCE
        if self._global is not None and not self._global.take(now):
            return Shed.SYNACK_RATE_GLOBAL
        return None

    def check_open(self, source: bytes) -> Shed | None:
        """Whether a validated ACK may open a backend connection (None = yes)."""
        return self._over_cap(source)

    @staticmethod
    def _inc(table: dict[bytes, int], source: bytes) -> None:
        table[source] = table.get(source, 0) + 1

    @staticmethod
    def _dec(table: dict[bytes, int], source: bytes) -> None:
        left = table[source] - 1
        if left:
            table[source] = left
        else:
            del table[source]

    def opened(self, source: bytes) -> None:
        self._inc(self.pending_by_source, source)
        self.pending += 1

    def promoted(self, source: bytes) -> None:
        self._dec(self.pending_by_source, source)
        self._inc(self.established_by_source, source)
        self.pending -= 1
        self.established += 1

    def closed(self, source: bytes, was_pending: bool) -> None:
        if was_pending:
            self._dec(self.pending_by_source, source)
            self.pending -= 1
        else:
            self._dec(self.established_by_source, source)
            self.established -= 1


class RetryMemory:
    """Which shed SYNs were seen lately, so that a retransmission is answered first.

    When SYNs arrive faster than the proxy can answer them, some must go unanswered;
    the kernel would drop the queue's overflow at random, real clients and spoofed
    sources alike. A flood's spoofed SYNs are not retransmitted; a real client's SYN
    is, with the same addresses, ports and ISN, one retransmission timeout later (1 s
    on Linux). So under overload the proxy sheds first attempts itself and remembers
    them here; a SYN found here is a retransmission and is answered, once: a flood
    that repeats a fixed set of spoofed SYNs gets each answered once per memory span,
    not every time (without that, such a flood at 100,000 SYN/s had all its repeats
    answered and failed 44 of 351 legitimate connections, against 5 with no shedding).

    Bloom filters: bitmaps in which a key sets two bits, both taken from one 64-bit hash
    of it (Python's keyed hash): one of keys shed, one of keys answered, in two
    generations of GENERATION seconds each, so a key is remembered for one to two
    generations. Memory is at most 4 x BITS / 8 bytes however many SYNs are shed,
    nothing is allocated until the first shed, and a generation older than that (a quiet
    spell, a clock stepped back) is forgotten. A false positive answers a spoofed SYN (as
    the proxy would without the overload) or, in the answered bitmap, makes a client wait
    for its next retransmission. With one bit a key, a spoofed SYN landing on a client's
    bit in the second before its retransmission was answered in its place and marked the
    bit answered, so the retransmission was shed: 0.56% of clients' retransmissions in a
    simulation shedding 32,000 keys/s (a full-speed hping3 flood), of which 2.1% were
    answered; with two bits none of 3,894, and 0.11% answered, for 0.1 us more a SYN.
    """

    BITS_LOG2 = 23
    BITS = 1 << BITS_LOG2  # 1 MiB a bitmap; the two bits come from hash bits 0-22 and 23-45
    GENERATION = 4.0  # seconds: Linux retransmits a SYN at 1, 3 and 7 s; others at 3 s

    def __init__(self) -> None:
        self._mask, self._shift = self.BITS - 1, self.BITS_LOG2
        # Bitmaps of keys shed and keys answered: this generation's (allocated at its
        # first use) and the previous generation's (None once forgotten).
        self._shed: bytearray | None = None
        self._answered: bytearray | None = None
        self._old_shed: bytearray | None = None
        self._old_answered: bytearray | None = None
        self._generation_start = self._rotate_at = float("-inf")

    @property
    def bytes_used(self) -> int:
        maps = (self._shed, self._answered, self._old_shed, self._old_answered)
        return sum(len(m) for m in maps if m is not None)

    def _stale(self, now: float) -> bool:
        """Nothing remembered can be a retransmission's key at `now`: all of it is too old, or
        the clock went back."""
        age = now - self._generation_start
        return age >= 2 * self.GENERATION or age < 0

    def _rotate(self, now: float) -> None:
        if self._stale(now):
            self._old_shed = self._old_answered = None
        else:
            self._old_shed, self._old_answered = self._shed, self._answered
        self._shed, self._answered = bytearray(self.BITS >> 3), bytearray(self.BITS >> 3)
        self._generation_start, self._rotate_at = now, now + self.GENERATION

    @property
    def forget_at(self) -> float | None:
        """When everything remembered is too old to matter (None: nothing is)."""
        return None if self._shed is None else self._generation_start + 2 * self.GENERATION

    def forget_old(self, now: float) -> None:
        """Free the bitmaps once nothing in them can be a retransmission's key any more
        (or the clock stepped back): a worker's memory returns after an overload."""
        if self._shed is not None and self._stale(now):
            self._shed = self._answered = self._old_shed = self._old_answered = None
            self._generation_start = self._rotate_at = float("-inf")

    def answer(self, key: object, now: float) -> bool:
        """True for a shed SYN's first repeat (answer it); otherwise False (shed it), and remembered."""
        if now >= self._rotate_at or now < self._generation_start:
            self._rotate(now)
        h = hash(key)
        mask = self._mask
        a = h & mask  # two positions from one 64-bit hash
        i = a >> 3
        bi = 1 << (a & 7)
        b = (h >> self._shift) & mask
        j = b >> 3
        bj = 1 << (b & 7)
        shed = self._shed
        if not (shed[i] & bi and shed[j] & bj):  # type: ignore[index]
            old = self._old_shed
            if old is None or not (old[i] & bi and old[j] & bj):
                shed[i] |= bi  # type: ignore[index]  # a first attempt
                shed[j] |= bj  # type: ignore[index]
                return False
        answered, old = self._answered, self._old_answered
        if (answered[i] & bi and answered[j] & bj) or (old is not None and old[i] & bi and old[j] & bj):  # type: ignore[index]
            return False  # answered once already: a repeating flood, not a client
        answered[i] |= bi  # type: ignore[index]
        answered[j] |= bj  # type: ignore[index]
        return True
