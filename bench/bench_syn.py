"""Micro-benchmark of the per-SYN and per-ACK cost of the engine (not a test).

    .venv/bin/python bench/bench_syn.py [--n 50000]

Per SYN: parse + rate-limit check + cookie + SYN-ACK build with checksums
(engine.handle_raw), each SYN from another source address as in a spoofed flood; and
a SYN shed while the proxy is behind (Engine.overloaded: its key and the retry memory).
Per ACK: parse + exact cookie validation, with the result discarded so no state
accumulates (a bogus ACK: the cost an ACK flood imposes; and a valid one).
Per data packet: parse + translation of an established connection.
"""

from __future__ import annotations

import argparse
import time

from synproxy import packet as P
from synproxy.cookie import CookieMaker
from synproxy.engine import Accept, Drop, Engine, EngineConfig
from synproxy.keys import KeyRing
from synproxy.packet import ACK, PSH, SYN, TcpOptions

NOW = 1_800_000_000.0


def per_call_us(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    ring = KeyRing(current=bytes(32), previous=None, rotated_at=NOW - 5000, generation=1)
    eng = Engine(EngineConfig(ports=frozenset({80})), CookieMaker(ring))
    rows = []
    for family, cli, srv in ((4, "198.18.0.2", "198.18.1.2"), (6, "fd53:5059::2", "fd53:5059:1::2")):
        c, s = P.addr_bytes(cli), P.addr_bytes(srv)

        def source(i: int) -> bytes:  # a different client address per SYN, as in a spoofed flood
            return c[:-2] + (i % 65536).to_bytes(2, "big")

        syns = [
            P.build(family, source(i), s, 1024 + i % 60000, 80, i * 7919, 0, SYN, 64240,
                    TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(i, 0)))
            for i in range(1000)
        ]
        rows.append((f"IPv{family} SYN -> SYN-ACK (parse+cookie+build)",
                     per_call_us(lambda i: eng.handle_raw(syns[i % 1000], NOW), n)))
        # Beyond capacity: a first attempt shed and remembered (each SYN another source and ISN).
        shed_eng = Engine(EngineConfig(ports=frozenset({80})), CookieMaker(ring))
        shed_eng.overloaded = True
        floods = [P.build(family, source(i), s, 1024 + i % 60000, 80, i * 7919 + 13, 0, SYN, 64240,
                          TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(i, 0))) for i in range(5 * n + 1)]
        assert shed_eng.handle_raw(floods.pop(), NOW)[0] == Drop("shed_overload")
        fresh = iter(floods)  # every round new SYNs: a repeat would be answered as a retransmission
        rows.append((f"IPv{family} SYN shed while behind (peek+retry memory)",
                     per_call_us(lambda i: shed_eng.handle_raw(next(fresh), NOW), n)))
        bogus = [P.build(family, c, s, 1024 + i, 80, i * 7919 + 1, 12345, ACK, 500, TcpOptions(ts=(i, 1)))
                 for i in range(1000)]
        rows.append((f"IPv{family} bogus ACK rejected (parse+check)",
                     per_call_us(lambda i: eng.handle_raw(bogus[i % 1000], NOW), n)))
        cookie = eng.cookies
        opts = cookie.encode_options(family, 1460, 7, True)
        isn = 4242
        ck = cookie.make(family, c, s, 5555, 80, isn, opts, NOW)
        rows.append((f"IPv{family} valid cookie check only",
                     per_call_us(lambda i: cookie.check(family, c, s, 5555, 80, isn, ck, NOW), n)))
        # an established connection's data packet, both directions
        eng2 = Engine(EngineConfig(ports=frozenset({80})), CookieMaker(ring))
        c0 = source(0)  # syns[0] comes from here
        sa = P.parse(eng2.handle_raw(syns[0], NOW)[1].data)  # type: ignore[union-attr]
        eng2.handle_raw(P.build(family, c0, s, 1024, 80, 1, sa.seq + 1, ACK, 500,
                                TcpOptions(ts=(1, sa.options.ts[0]))), NOW)
        eng2.handle_raw(P.build(family, s, c0, 80, 1024, 999, 1, SYN | ACK, 65000,
                                TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(50, 1))), NOW)
        assert eng2.established == 1, "the benchmark connection did not open"
        down = P.build(family, s, c0, 80, 1024, 1000, 1, ACK | PSH, 500, TcpOptions(ts=(60, 2)), b"x" * 1448)
        up = P.build(family, c0, s, 1024, 80, 1, sa.seq + 1, ACK | PSH, 500,
                     TcpOptions(ts=(2, 60)), b"y" * 1448)
        for name, seg in (("server->client", down), ("client->server", up)):
            verdict = eng2.handle_raw(seg, NOW)[0]
            assert isinstance(verdict, Accept) and verdict.payload is not None, verdict  # really translated
            rows.append((f"IPv{family} 1448-byte segment translated, {name}",
                         per_call_us(lambda i, seg=seg: eng2.handle_raw(seg, NOW), n)))
    width = max(len(r[0]) for r in rows)
    print(f"{'operation':<{width}}  µs/call  calls/s (one core)")
    for name, us in rows:
        print(f"{name:<{width}}  {us:7.2f}  {1e6 / us:12,.0f}")


if __name__ == "__main__":
    main()
