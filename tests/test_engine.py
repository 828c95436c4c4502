"""The engine driven packet by packet, without a kernel: handshake, translation, timers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from synproxy import packet as P
from synproxy.cookie import CookieMaker
from synproxy.engine import (
    Accept,
    Action,
    Direction,
    Drop,
    Engine,
    EngineConfig,
    Hold,
    PassOn,
    Release,
    Send,
    State,
    conn_key,
    split_key,
)
from synproxy.keys import KeyRing
from synproxy.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, TcpOptions

U32 = 0xFFFFFFFF
C2S, S2C = Direction.FROM_CLIENT, Direction.FROM_SERVER
T0 = 1_800_000_000.0


def make_engine(**kw: object) -> Engine:
    ring = KeyRing(current=bytes(range(32)), previous=None, rotated_at=T0 - 10_000, generation=1)
    cfg = EngineConfig(ports=frozenset({80}), ts_base=12345, **kw)  # type: ignore[arg-type]
    return Engine(cfg, CookieMaker(ring))


@dataclass
class Flow:
    """One client/server pair and helpers that build their packets."""

    family: int = 4
    client_isn: int = 1_000_000
    server_isn: int = 3_000_000_000
    cport: int = 40000
    client_ws: int | None = 7
    client_mss: int | None = 1460
    sack: bool = True
    ts: bool = True
    client_tsval: int = 500
    ecn: bool = False  # the SYN asks for ECN (ECE and CWR)

    def __post_init__(self) -> None:
        if self.family == 4:
            self.client, self.server = P.addr_bytes("198.18.0.2"), P.addr_bytes("198.18.1.2")
        else:
            self.client, self.server = P.addr_bytes("fd53:5059::2"), P.addr_bytes("fd53:5059:1::2")

    def c(self, seq: int, ack: int, flags: int, window: int = 500, payload: bytes = b"",
          ts: tuple[int, int] | None = None, opts: TcpOptions | None = None) -> P.Packet:
        o = opts or TcpOptions(ts=ts)
        return P.parse(P.build(self.family, self.client, self.server, self.cport, 80, seq, ack, flags, window, o, payload))

    def s(self, seq: int, ack: int, flags: int, window: int = 500, payload: bytes = b"",
          ts: tuple[int, int] | None = None, opts: TcpOptions | None = None) -> P.Packet:
        o = opts or TcpOptions(ts=ts)
        return P.parse(P.build(self.family, self.server, self.client, 80, self.cport, seq, ack, flags, window, o, payload))

    def syn(self) -> P.Packet:
        return self.c(self.client_isn, 0, SYN | (ECE | CWR if self.ecn else 0), 64240, opts=TcpOptions(
            mss=self.client_mss, wscale=self.client_ws, sack_ok=self.sack,
            ts=(self.client_tsval, 0) if self.ts else None))


def sends(actions: list[Action], kind: str | None = None) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and (kind is None or a.kind == kind)]


def one(actions: list[Action], kind: str) -> P.Packet:
    got = sends(actions, kind)
    assert len(got) == 1, actions
    pkt = P.parse(got[0].data)
    assert P.checksum_ok(pkt)
    return pkt


def released(actions: list[Action]) -> list[P.Packet]:
    """The held packets these actions pass (Release with an Accept), checked and parsed."""
    out = []
    for a in actions:
        if isinstance(a, Release) and isinstance(a.verdict, Accept):
            assert a.verdict.payload is not None
            pkt = P.parse(a.verdict.payload)
            assert P.checksum_ok(pkt)
            out.append(pkt)
    return out


def accepted(actions: list[Action]) -> P.Packet:
    first = actions[0]
    assert isinstance(first, Accept) and first.payload is not None, actions
    pkt = P.parse(first.payload)
    assert P.checksum_ok(pkt)
    return pkt


def handshake(eng: Engine, f: Flow, now: float = T0, server_ws: int | None = 7,
              server_ts: int = 9_000_000, data: bytes = b"", server_ecn: bool = True,
              ) -> tuple[P.Packet, P.Packet, list[Action]]:
    """Run the three-way handshake plus the server side; returns (synack, syn to server, last actions)."""
    out = eng.handle(f.syn(), C2S, now)
    assert isinstance(out[0], Drop)
    synack = one(out, "synack")
    ts = (f.client_tsval + 1, synack.options.ts[0]) if synack.options.ts else None
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | (PSH if data else 0), 502, data, ts=ts), C2S, now)
    syn = one(out, "syn")
    sa_opts = TcpOptions(mss=1460, wscale=server_ws, sack_ok=syn.options.sack_ok,
                         ts=(server_ts, syn.options.ts[0]) if syn.options.ts else None)
    # Linux with net.ipv4.tcp_ecn = 2 (its default) agrees to an ECN-setup SYN with ECE
    ece = ECE if server_ecn and syn.flags & (ECE | CWR) == ECE | CWR else 0
    out = eng.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK | ece, 65160, opts=sa_opts), S2C, now + 0.001)
    return synack, syn, out


# ------------------------------------------------------------------ SYN and cookie


@pytest.mark.parametrize("family", [4, 6])
def test_syn_gets_cookie_synack_and_no_state(family: int) -> None:
    eng, f = make_engine(), Flow(family=family)
    out = eng.handle(f.syn(), C2S, T0)
    assert out[0] == Drop("syn_answered")
    synack = one(out, "synack")
    assert synack.flags == SYN | ACK and synack.ack == f.client_isn + 1
    assert (synack.src, synack.dst, synack.sport, synack.dport) == (f.server, f.client, 80, f.cport)
    o = synack.options
    assert o.mss == (1460 if family == 4 else 1440) and o.wscale == 7 and o.sack_ok and o.ts is not None and o.ts[1] == f.client_tsval
    assert synack.window > 0  # never a zero window: a lost third ACK must not hang the client
    assert eng.conns == {} and eng.stats.syn_received == 1
    again = one(eng.handle(f.syn(), C2S, T0 + 1), "synack")
    assert again.seq == synack.seq  # a retransmitted SYN gets the same cookie


@pytest.mark.parametrize("flags", [SYN | FIN, SYN | RST, SYN | FIN | PSH, SYN | FIN | RST | PSH | ACK])
@pytest.mark.parametrize("state", ["none", "pending", "established"])
@pytest.mark.parametrize("fast_paths", [True, False])
def test_syn_with_fin_or_rst_is_dropped_in_every_state(flags: int, state: str, fast_paths: bool) -> None:
    """No TCP stack sends SYN with FIN or RST (scanners do, to slip past filters): Linux drops
    such a packet in LISTEN, so it gets no SYN-ACK here, crosses nothing and changes nothing."""
    eng, f = make_engine(), Flow()
    eng.fast_paths = fast_paths
    if state == "pending":
        synack = one(eng.handle(f.syn(), C2S, T0), "synack")
        one(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK), C2S, T0), "syn")
    elif state == "established":
        handshake(eng, f)
    before = (eng.pending, eng.established)
    syn = f.c(f.client_isn, 0, flags, 64240, opts=TcpOptions(mss=1460, wscale=7, sack_ok=True))
    assert eng.handle_raw(syn.raw, T0 + 1) == [Drop("bad_flags")]
    assert (eng.pending, eng.established) == before and eng.stats.dropped["bad_flags"] == 1
    assert eng.stats.synack_sent == (0 if state == "none" else 1)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 100, U32])
def test_ack_off_by_k_never_validates(k: int) -> None:
    eng, f = make_engine(), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    out = eng.handle(f.c(f.client_isn + 1 + k, synack.seq + 1, ACK, payload=b"abcde"), C2S, T0)
    assert out == [Drop("cookie_invalid")] and eng.conns == {}
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1 + k, ACK), C2S, T0)
    assert out == [Drop("cookie_invalid")]


def test_cookie_expires() -> None:
    eng, f = make_engine(), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK), C2S, T0 + 600)
    assert out == [Drop("cookie_invalid")]


@pytest.mark.parametrize("family", [4, 6])
def test_ack_replays_client_options_to_server(family: int) -> None:
    eng, f = make_engine(), Flow(family=family, client_mss=1400, client_ws=9)
    _, syn, _ = handshake(eng, f)
    assert syn.flags == SYN and syn.seq == f.client_isn
    assert (syn.src, syn.dst, syn.sport, syn.dport) == (f.client, f.server, f.cport, 80)  # real client address
    assert syn.options.mss == 1400 and syn.options.wscale == 9 and syn.options.sack_ok
    assert syn.options.ts == (f.client_tsval + 1, 0)


def test_no_timestamps_keeps_wscale_and_sack() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack, syn, _ = handshake(eng, f)
    assert synack.options.ts is None and synack.options.wscale == 7 and synack.options.sack_ok
    assert syn.options.ts is None and syn.options.wscale == 7 and syn.options.sack_ok


def test_all_options_off() -> None:
    eng, f = make_engine(), Flow(ts=False, sack=False, client_ws=None, client_mss=None)
    synack, syn, out = handshake(eng, f, server_ws=None)
    assert synack.options.wscale is None and not synack.options.sack_ok and synack.options.ts is None
    assert syn.options.wscale is None and not syn.options.sack_ok and syn.options.mss == 536
    upd = one(out, "window_update")
    assert upd.window == 65160  # no scaling either side


@pytest.mark.parametrize("mss,want", [(536, 536), (1220, 1220), (1460, 1460), (1500, 1460), (8960, 8960), (600, 536)])
def test_server_never_gets_mss_above_clients(mss: int, want: int) -> None:
    eng, f = make_engine(), Flow(client_mss=mss)
    _, syn, _ = handshake(eng, f)
    assert syn.options.mss == want <= mss


def test_mss_capped_by_what_the_queue_copies() -> None:
    """NetfilterQueue copies 4016 bytes: no MSS the proxy announces may allow a longer segment."""
    eng, f = make_engine(max_packet=4016), Flow(client_mss=8960)
    synack, syn, _ = handshake(eng, f)
    assert syn.options.mss == 4016 - 60
    assert synack.options.mss is not None and synack.options.mss <= 4016 - 60


# ------------------------------------------------------------------ server handshake


def test_server_synack_is_stolen_and_acked() -> None:
    eng, f = make_engine(), Flow()
    synack, syn, out = handshake(eng, f)
    assert out[0] == Drop("synack_stolen")
    ack = one(out, "ack")
    assert ack.flags == ACK and ack.seq == f.client_isn + 1 and ack.ack == f.server_isn + 1
    assert ack.options.ts == (f.client_tsval + 1, 9_000_000)
    upd = one(out, "window_update")
    assert upd.seq == synack.seq + 1 and upd.ack == f.client_isn + 1
    assert upd.window == 65160 >> 7  # the server's SYN-ACK window in the client's scale
    assert upd.options.ts == (synack.options.ts[0], f.client_tsval + 1)  # the proxy's clock continues
    conn = next(iter(eng.conns.values()))
    assert conn.state is State.ESTABLISHED and eng.established == 1 and eng.pending == 0


def test_translation_both_ways() -> None:
    eng, f = make_engine(), Flow()
    synack, _, _ = handshake(eng, f)
    cookie = synack.seq
    # server -> client: seq and TSval move into the proxy's spaces
    got = accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 1, ACK | PSH, 1000, b"hello", ts=(9_000_050, 501)), S2C, T0 + 1))
    assert got.seq == cookie + 1 and got.ack == f.client_isn + 1 and got.payload == b"hello"
    assert got.options.ts == ((synack.options.ts[0] + 50) & U32, 501)
    # client -> server: ack and TSecr move back; SACK blocks too
    sack_opts = TcpOptions(ts=(510, got.options.ts[0]), sack=((cookie + 100, cookie + 200),))
    back = accepted(eng.handle(f.c(f.client_isn + 1, cookie + 6, ACK, 300, opts=sack_opts), C2S, T0 + 1))
    assert back.ack == f.server_isn + 6 and back.seq == f.client_isn + 1
    assert back.options.ts == (510, 9_000_050)
    assert back.options.sack == ((f.server_isn + 100, f.server_isn + 200),)
    assert back.window == 300  # same scale both sides: untouched


@pytest.mark.parametrize("advertised,server_ws", [(2, 7), (12, 7), (7, 0), (7, 14), (14, 0), (0, 14)])
def test_window_rescaled_between_scales(advertised: int, server_ws: int) -> None:
    eng, f = make_engine(wscale=advertised), Flow()
    synack, _, out = handshake(eng, f, server_ws=server_ws)
    assert synack.options.wscale == advertised
    for field_value in (0, 1, 100, 511, 724, 4000, 65535):
        got = accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 1, ACK, field_value), S2C, T0 + 1))
        real = field_value << server_ws
        assert got.window == min(max(real >> advertised, 1 if real else 0), 0xFFFF)
        assert (got.window == 0) == (real == 0)  # a window is closed only when the server closed it
        if real >= 1 << advertised:
            assert got.window << advertised <= real  # never promise more than the server offers


def test_small_server_window_never_reaches_the_client_as_zero() -> None:
    """The stall reproduced end to end: proxy on scale 12, server on 2 under memory pressure
    offering 2 segments (2896 bytes, field 724). Rounded down that is a zero window: the client
    only probes, the server never gets the data that would open its window, the upload hangs."""
    eng, f = make_engine(wscale=12), Flow()
    handshake(eng, f, server_ws=2)
    got = accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 1, ACK, 724), S2C, T0 + 1))
    assert got.window == 1  # 4096 bytes: the client sends, the server takes what fits


def test_first_window_update_is_rescaled() -> None:
    """The window update after the handshake carries the server's (unscaled) SYN-ACK window,
    rescaled like any other."""
    eng, f = make_engine(wscale=0), Flow(client_ws=0)
    _, _, out = handshake(eng, f, server_ws=7)
    assert one(out, "window_update").window == 65160  # the SYN-ACK's unscaled window, client scale 0
    eng, f = make_engine(wscale=14), Flow(client_ws=14)
    synack, _, out = handshake(eng, f, server_ws=14)
    assert one(out, "window_update").window == 3  # 65160 bytes at scale 14: 3.98 units, rounded down


def test_client_window_rescaled_when_server_declines_scaling() -> None:
    eng, f = make_engine(), Flow(client_ws=5)
    handshake(eng, f, server_ws=None)
    back = accepted(eng.handle(f.c(f.client_isn + 1, 0, ACK, 100), C2S, T0 + 1))
    assert back.window == 100 << 5
    big = accepted(eng.handle(f.c(f.client_isn + 1, 0, ACK, 5000), C2S, T0 + 1))
    assert big.window == 0xFFFF


def test_auto_wscale_follows_server_from_next_slot() -> None:
    eng, f = make_engine(), Flow()
    handshake(eng, f, server_ws=3)
    first = one(eng.handle(Flow(cport=40001).syn(), C2S, T0 + 1), "synack")
    assert first.options.wscale == 7  # latched for the current slot
    later = one(eng.handle(Flow(cport=40002).syn(), C2S, T0 + 200), "synack")
    assert later.options.wscale == 3


# ------------------------------------------------------------------ data before the server is connected


def test_data_on_the_ack_is_held_and_released() -> None:
    """The data stays in the kernel's queue (Hold) and passes by verdict when the server
    answers; its ACK completes the server's handshake, so no separate ACK is sent."""
    eng, f = make_engine(), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    ts = (f.client_tsval + 1, synack.options.ts[0])
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, 502, b"GET / HTTP/1.0\r\n\r\n", ts=ts), C2S, T0)
    hold = out[0]
    assert isinstance(hold, Hold) and len(sends(out, "syn")) == 1 and eng.held_packets == 1
    sa = TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(77, f.client_tsval + 1))
    out = eng.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK, 65160, opts=sa), S2C, T0)
    assert out[0] == Drop("synack_stolen") and sends(out, "ack") == []
    assert [a.token for a in out if isinstance(a, Release)] == [hold.token]
    (data,) = released(out)
    assert data.payload == b"GET / HTTP/1.0\r\n\r\n" and data.seq == f.client_isn + 1
    assert data.ack == f.server_isn + 1  # translated into the server's space
    assert data.options.ts == (f.client_tsval + 1, 77)  # TSecr in the server's clock
    assert len(sends(out, "window_update")) == 1 and eng.held_packets == 0


def test_lost_third_ack_first_data_segment_validates() -> None:
    eng, f = make_engine(), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    ts = (f.client_tsval + 2, synack.options.ts[0])
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, 502, b"abc", ts=ts), C2S, T0)
    assert isinstance(out[0], Hold) and len(sends(out, "syn")) == 1
    out = eng.handle(f.c(f.client_isn + 4, synack.seq + 1, ACK | PSH, 502, b"defgh", ts=ts), C2S, T0)
    assert len(out) == 1 and isinstance(out[0], Hold)
    syn = P.parse(sends(eng.handle(f.syn(), C2S, T0), "synack")[0].data)  # unrelated: still stateless
    sa = TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(77, f.client_tsval + 2))
    out = eng.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK, 65160, opts=sa), S2C, T0)
    assert [p.payload for p in released(out)] == [b"abc", b"defgh"]
    del syn


def test_shifted_segment_after_lost_small_segment_is_not_accepted() -> None:
    """SYN cookies ate my dog: ACK and a 3-byte segment lost, the 5-byte one arrives first."""
    eng, f = make_engine(), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    ts = (f.client_tsval + 2, synack.options.ts[0])
    out = eng.handle(f.c(f.client_isn + 4, synack.seq + 1, ACK | PSH, 502, b"defgh", ts=ts), C2S, T0)
    assert out == [Drop("cookie_invalid")] and not eng.conns
    # the retransmission of the first segment then opens it at the right offset
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, 502, b"abcdefgh", ts=ts), C2S, T0 + 0.2)
    assert one(out, "syn").seq == f.client_isn


def test_tfo_syn_with_data_loses_nothing() -> None:
    eng, f = make_engine(), Flow()
    syn = f.c(f.client_isn, 0, SYN, 64240, b"early", opts=TcpOptions(mss=1460, wscale=7, ts=(1, 0), unknown=((34, b""),)))
    synack = one(eng.handle(syn, C2S, T0), "synack")
    assert synack.ack == f.client_isn + 1  # the data is not acknowledged, so the client sends it again
    assert all(k != 34 for k, _ in synack.options.unknown)


# ------------------------------------------------------------------ backend trouble and timers


def test_server_refuses() -> None:
    eng, f = make_engine(), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, ts=(501, synack.options.ts[0])), C2S, T0)
    out = eng.handle(f.s(0, f.client_isn + 1, RST | ACK, 0), S2C, T0 + 0.001)
    rst = one(out, "rst")
    assert rst.flags & RST and rst.seq == synack.seq + 1 and rst.dst == f.client
    assert eng.conns == {} and eng.pending == 0 and eng.stats.backend_handshakes["refused"] == 1


def test_silent_server_syn_resent_then_client_reset() -> None:
    eng, f = make_engine(backend_timeout=3.0), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, ts=(501, synack.options.ts[0])), C2S, T0)
    assert eng.next_deadline() == T0 + 1.0
    assert len(sends(eng.handle_timer(T0 + 1.0), "syn")) == 1
    assert len(sends(eng.handle_timer(T0 + 2.0), "syn")) == 1
    out = eng.handle_timer(T0 + 3.0)
    to_client = [P.parse(s.data) for s in sends(out, "rst") if s.dst == f.client]
    assert len(to_client) == 1 and to_client[0].seq == synack.seq + 1
    assert eng.conns == {} and eng.pending == 0 and eng.stats.backend_handshakes["timeout"] == 1


def test_synack_retransmit_gets_ack_again() -> None:
    eng, f = make_engine(), Flow()
    handshake(eng, f)
    sa = TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(9_000_100, f.client_tsval + 1))
    out = eng.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK, 65160, opts=sa), S2C, T0 + 1)
    assert out[0] == Drop("synack_retransmit") and one(out, "ack").ack == f.server_isn + 1


def test_fin_both_ways_then_linger_then_gone() -> None:
    eng, f = make_engine(closing_linger=5.0), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    accepted(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, FIN | ACK), C2S, T0 + 1))
    fin = accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 2, FIN | ACK), S2C, T0 + 1))
    assert fin.seq == synack.seq + 1
    assert eng.established == 0 and eng.stats.closed["fin"] == 1
    last = accepted(eng.handle(f.c(f.client_isn + 2, synack.seq + 2, ACK), C2S, T0 + 1.1))
    assert last.ack == f.server_isn + 2
    eng.handle_timer(T0 + 7)
    assert eng.conns == {}


def test_rst_from_server_forwarded_and_state_closed() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    rst = accepted(eng.handle(f.s(f.server_isn + 1, 0, RST), S2C, T0 + 1))
    assert rst.seq == synack.seq + 1
    assert eng.established == 0


def test_idle_timeout_and_activity_extends_it() -> None:
    eng, f = make_engine(idle_timeout=640.0), Flow(ts=False)  # ticks of 640/IDLE_TICKS = 10 s
    handshake(eng, f)
    eng.handle(f.c(f.client_isn + 1, 0, ACK), C2S, T0 + 500)
    eng.handle_timer(T0 + 601)
    assert len(eng.conns) == 1  # active at 500: lives at least until 1140
    gone_at = next(t for t in range(601, 2000) if eng.handle_timer(T0 + t) is not None and not eng.conns)
    assert eng.stats.closed["idle"] == 1
    # never before the timeout; at most two ticks plus one sweep interval (a tenth of it) later
    assert 500 + 640 < gone_at <= 500 + 640 + 2 * 10 + 64 + 1


def test_idle_expiry_resets_both_ends_at_what_each_last_acknowledged() -> None:
    """Without the proxy's state the connection cannot go on. The server, which may be waiting
    for its client (or for one a forged cookie made up), and the client, which would learn only
    after its retransmissions into the void time out, each get a RST at the sequence number it
    last acknowledged, which each takes exactly; a reordered older ACK does not move it back."""
    eng, f = make_engine(idle_timeout=640.0), Flow(ts=True)
    synack, _, _ = handshake(eng, f)
    accepted(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, payload=b"hello", ts=(10, synack.options.ts[0])),
                        C2S, T0 + 1))
    world = accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 6, ACK | PSH, payload=b"world!", ts=(20, 10)),
                                S2C, T0 + 1))
    assert world.seq == synack.seq + 1
    accepted(eng.handle(f.c(f.client_isn + 6, synack.seq + 7, ACK, ts=(11, world.options.ts[0])), C2S, T0 + 1))
    # "hello" again, overtaken by the ACK above: its older ACK number must not count
    accepted(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, payload=b"hello", ts=(10, synack.options.ts[0])),
                        C2S, T0 + 1))
    out: list = []
    for t in range(2, 2000):
        out = eng.handle_timer(T0 + t)
        if not eng.conns:
            break
    assert len(out) == 2
    to_server = [P.parse(a.data) for a in sends(out, "rst") if a.dst == f.server]
    to_client = [P.parse(a.data) for a in sends(out, "rst") if a.dst == f.client]
    assert len(to_server) == len(to_client) == 1
    rst = to_server[0]
    assert rst.src == f.client
    assert (rst.sport, rst.dport, rst.seq, rst.ack, rst.flags) == (f.cport, 80, f.client_isn + 6, 0, RST)
    rst = to_client[0]
    assert rst.src == f.server
    assert (rst.sport, rst.dport, rst.seq, rst.ack, rst.flags) == (80, f.cport, synack.seq + 7, 0, RST)
    assert eng.stats.closed["idle"] == 1 and eng.established == 0


def test_idle_expiry_resets_a_client_that_never_sent_at_the_synack_it_acknowledged() -> None:
    eng, f = make_engine(idle_timeout=640.0), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    out: list = []
    for t in range(2, 2000):
        out = eng.handle_timer(T0 + t)
        if not eng.conns:
            break
    to_client = [P.parse(a.data) for a in sends(out, "rst") if a.dst == f.client]
    assert [(p.seq, p.flags) for p in to_client] == [(synack.seq + 1, RST)]


def test_a_clean_stop_resets_both_ends_of_every_connection() -> None:
    """The state goes with the process: each end of an established connection gets a RST at the
    number it last acknowledged, a pending one's client and server theirs (and its held data a
    drop verdict), a closing one nothing; the engine is left empty."""
    eng = make_engine()
    est, pend, closing = Flow(ts=True), Flow(cport=40001, ts=False), Flow(cport=40002, ts=False)
    synack, _, _ = handshake(eng, est)
    world = accepted(eng.handle(est.s(est.server_isn + 1, est.client_isn + 1, ACK | PSH, payload=b"hi", ts=(20, 10)),
                                S2C, T0 + 1))
    accepted(eng.handle(est.c(est.client_isn + 1, world.seq + 2, ACK, ts=(11, world.options.ts[0])), C2S, T0 + 1))
    out = eng.handle(pend.syn(), C2S, T0)
    p_synack = one(out, "synack")
    out = eng.handle(pend.c(pend.client_isn + 1, p_synack.seq + 1, ACK | PSH, payload=b"held"), C2S, T0)
    assert any(isinstance(a, Send) and a.kind == "syn" for a in out)
    c_synack, _, _ = handshake(eng, closing)
    eng.handle(closing.c(closing.client_isn + 1, c_synack.seq + 1, RST), C2S, T0 + 1)
    assert eng.conns[conn_key(4, closing.client, closing.server, closing.cport, 80)].state is State.CLOSING
    out = eng.reset_all()
    rsts = [(a.dst, P.parse(a.data)) for a in sends(out, "rst")]
    got = sorted((dst == est.server, p.sport if dst == est.server else p.dport, p.seq, p.flags) for dst, p in rsts)
    assert got == sorted([
        (True, est.cport, est.client_isn + 1, RST), (False, est.cport, world.seq + 2, RST),
        (True, pend.cport, pend.client_isn + 1, RST), (False, pend.cport, p_synack.seq + 1, RST | ACK),
    ])
    assert [a.verdict for a in out if isinstance(a, Release)] == [Drop("held_discarded")]
    assert eng.conns == {} and eng.established == 0 and eng.limits.pending == 0
    assert eng.reset_all() == []


def test_new_connection_on_same_tuple_after_close() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    eng.handle(f.c(f.client_isn + 1, synack.seq + 1, FIN | ACK), C2S, T0 + 1)
    eng.handle(f.s(f.server_isn + 1, f.client_isn + 2, FIN | ACK), S2C, T0 + 1)
    f2 = Flow(ts=False, client_isn=f.client_isn + 100_000, server_isn=77)
    synack2, syn2, out = handshake(eng, f2, now=T0 + 2)
    assert syn2.seq == f2.client_isn and out[0] == Drop("synack_stolen")
    got = accepted(eng.handle(f2.s(78, f2.client_isn + 1, ACK, payload=b"x"), S2C, T0 + 3))
    assert got.seq == synack2.seq + 1


def test_server_segment_without_state_resets_server() -> None:
    eng, f = make_engine(), Flow()
    out = eng.handle(f.s(5000, 7000, ACK | PSH, payload=b"orphan"), S2C, T0)
    assert out[0] == Drop("server_no_state")
    rst = one(out, "rst")
    assert rst.dst == f.server and rst.seq == 7000 and rst.flags == RST


def test_malformed_is_counted_and_dropped() -> None:
    eng = make_engine()
    assert eng.handle_raw(b"\x45\x00garbage", T0) == [Drop("malformed")]
    assert eng.stats.malformed["short"] == 1


# ------------------------------------------------------------------ wrap-around


def test_sequence_and_timestamp_wraparound() -> None:
    eng, f = make_engine(), Flow(client_isn=U32 - 2, server_isn=U32 - 1, client_tsval=U32 - 1)
    synack, syn, _ = handshake(eng, f, server_ts=U32)
    assert syn.seq == U32 - 2
    got = accepted(eng.handle(f.s(0, 0, ACK, payload=b"wrap", ts=(3, 5)), S2C, T0 + 1))  # server seq wrapped
    assert got.seq == (synack.seq + 2) & U32
    assert got.options.ts == ((synack.options.ts[0] + 4) & U32, 5)
    back = accepted(eng.handle(f.c(0, (synack.seq + 6) & U32, ACK, ts=(7, got.options.ts[0])), C2S, T0 + 1))
    assert back.ack == 4 and back.options.ts == (7, 3)


# ------------------------------------------------------------------ life-cycle (engine level)


def test_keepalive_probe_is_translated_and_keeps_state() -> None:
    """A keepalive (seq = snd_nxt - 1, no data) passes translated and counts as activity."""
    eng, f = make_engine(idle_timeout=600.0), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    for t in (300, 600, 900):
        probe = accepted(eng.handle(f.c(f.client_isn, synack.seq + 1, ACK), C2S, T0 + t))
        assert probe.seq == f.client_isn and probe.ack == f.server_isn + 1
        reply = accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 1, ACK), S2C, T0 + t))
        assert reply.seq == synack.seq + 1
        eng.handle_timer(T0 + t + 1)
    assert len(eng.conns) == 1


def test_half_close_server_keeps_sending() -> None:
    """The client closes its side; the server's data after that is still translated."""
    eng, f = make_engine(), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    accepted(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, FIN | ACK), C2S, T0 + 1))
    for i in range(3):
        got = accepted(eng.handle(f.s(f.server_isn + 1 + 100 * i, f.client_isn + 2, ACK, payload=b"y" * 100), S2C, T0 + 2))
        assert got.seq == synack.seq + 1 + 100 * i
    assert next(iter(eng.conns.values())).state is State.ESTABLISHED


def test_simultaneous_close() -> None:
    eng, f = make_engine(closing_linger=2.0), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    accepted(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, FIN | ACK), C2S, T0 + 1))
    accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 1, FIN | ACK), S2C, T0 + 1))
    accepted(eng.handle(f.c(f.client_isn + 2, synack.seq + 2, ACK), C2S, T0 + 1))
    accepted(eng.handle(f.s(f.server_isn + 2, f.client_isn + 2, ACK), S2C, T0 + 1))
    assert eng.established == 0
    eng.handle_timer(T0 + 4)
    assert eng.conns == {}


def test_rst_from_client_forwarded() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    rst = accepted(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, RST | ACK), C2S, T0 + 1))
    assert rst.flags & RST and rst.ack == f.server_isn + 1
    assert eng.established == 0 and eng.stats.closed["rst"] == 1


# ------------------------------------------------------------------ clients' RSTs (RFC 5961)


def established_with_server_ack(eng: Engine, f: Flow, acked: int = 0, window: int = 500) -> P.Packet:
    """A connection whose server last acknowledged `acked` client bytes with this window
    field (scale 7: 500 is 64,000 bytes); the client's SYN-ACK."""
    synack, _, _ = handshake(eng, f)
    accepted(eng.handle(f.s(f.server_isn + 1, f.client_isn + 1 + acked, ACK, window, b"z"), S2C, T0 + 0.5))
    return synack


def test_client_rst_outside_the_servers_window_is_dropped_and_closes_nothing() -> None:
    """A blind spoofer's RST (any sequence number) must not end the proxy's half of a
    connection the server keeps: the server ignores it, so it is dropped here too."""
    eng, f = make_engine(), Flow(ts=False)
    synack = established_with_server_ack(eng, f, acked=5000, window=10)  # 1,280 bytes
    nxt = f.client_isn + 1 + 5000
    for seq in (nxt + 2000, nxt - 1, nxt + (1 << 31)):
        assert eng.handle(f.c(seq & U32, synack.seq + 2, RST | ACK), C2S, T0 + 1) == [Drop("rst_out_of_window")]
    assert eng.established == 1 and eng.stats.client_resets["out_of_window"] == 3
    eng.handle_timer(T0 + 60)  # past any linger
    got = accepted(eng.handle(f.c(nxt, synack.seq + 2, ACK, payload=b"still"), C2S, T0 + 61))
    assert got.ack == f.server_isn + 2 and eng.established == 1


def test_client_rst_in_window_not_exact_is_passed_on_and_a_live_server_keeps_it() -> None:
    """In the window but not at the number the server expects: the server answers with a
    challenge ACK (passed on, proves nothing yet); the probe after RESET_PROBE_DELAY gets a
    duplicate ACK from the live socket, which is dropped and keeps the connection."""
    eng, f = make_engine(), Flow(ts=False)
    synack = established_with_server_ack(eng, f)
    nxt = f.client_isn + 1
    rst = accepted(eng.handle(f.c(nxt + 1000, synack.seq + 2, RST | ACK), C2S, T0 + 1))
    assert rst.flags & RST and rst.ack == f.server_isn + 2
    assert eng.established == 1 and eng.stats.closed["rst"] == 0
    challenge = accepted(eng.handle(f.s(f.server_isn + 2, nxt, ACK), S2C, T0 + 1.001))
    assert challenge.ack == nxt
    assert eng.handle_timer(T0 + 1.5) == []
    probe = one(eng.handle_timer(T0 + 2), "probe")
    assert (probe.dst, probe.flags, probe.seq) == (f.server, ACK, nxt - 1)  # below the window: answered
    assert eng.handle(f.s(f.server_isn + 2, nxt, ACK), S2C, T0 + 2.001) == [Drop("probe_answered")]
    assert eng.stats.client_resets["refuted"] == 1 and eng.established == 1
    assert eng.handle_timer(T0 + 10) == [] and eng.established == 1
    got = accepted(eng.handle(f.s(f.server_isn + 2, nxt, ACK | PSH, payload=b"more"), S2C, T0 + 11))
    assert got.seq == synack.seq + 2


def test_client_rst_in_window_confirmed_by_the_servers_rst() -> None:
    eng, f = make_engine(closing_linger=2.0), Flow(ts=False)
    synack = established_with_server_ack(eng, f)
    nxt = f.client_isn + 1
    accepted(eng.handle(f.c(nxt + 10, synack.seq + 2, RST), C2S, T0 + 1))
    one(eng.handle_timer(T0 + 2), "probe")
    accepted(eng.handle(f.s(0, 0, RST), S2C, T0 + 2.001))  # no socket: the server resets the probe
    assert eng.established == 0 and eng.stats.closed["rst"] == 1 and eng.stats.client_resets["confirmed"] == 1
    eng.handle_timer(T0 + 5)
    assert eng.conns == {} and eng.limits.established == 0


def test_client_rst_in_window_and_a_silent_server_close_after_the_probes() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack = established_with_server_ack(eng, f)
    accepted(eng.handle(f.c(f.client_isn + 11, synack.seq + 2, RST), C2S, T0 + 1))
    one(eng.handle_timer(T0 + 2), "probe")
    one(eng.handle_timer(T0 + 3), "probe")
    assert eng.established == 1
    assert eng.handle_timer(T0 + 4) == []
    assert eng.conns == {} and eng.established == 0
    assert eng.stats.closed["rst"] == 1 and eng.stats.client_resets["unanswered"] == 1


def test_client_answers_a_challenge_ack_with_the_exact_rst_and_closes_at_once() -> None:
    """The client did reset, with data the server had taken but not yet acknowledged to the
    proxy: its first RST is not exact; the server's challenge ACK says where; the second is."""
    eng, f = make_engine(), Flow(ts=False)
    synack = established_with_server_ack(eng, f)
    nxt = f.client_isn + 1
    accepted(eng.handle(f.c(nxt, synack.seq + 2, ACK | PSH, payload=b"12345"), C2S, T0 + 1))
    accepted(eng.handle(f.c(nxt + 5, synack.seq + 2, RST | ACK), C2S, T0 + 1))
    assert eng.established == 1
    accepted(eng.handle(f.s(f.server_isn + 2, nxt + 5, ACK), S2C, T0 + 1.001))  # the challenge ACK
    accepted(eng.handle(f.c(nxt + 5, 0, RST), C2S, T0 + 1.002))
    assert eng.established == 0 and eng.stats.client_resets["exact"] == 1
    assert eng.handle_timer(T0 + 2) == []  # no probe for a connection already closed


def test_client_fin_outside_the_servers_window_is_dropped() -> None:
    """A spoofed FIN, then the server's own FIN (it half-closes): the connection stays, and the
    client's later data still gets through; the real FIN (and its retransmission) closes it."""
    eng, f = make_engine(closing_linger=2.0), Flow(ts=False)
    synack = established_with_server_ack(eng, f, acked=100, window=10)  # 1,280 bytes
    nxt = f.client_isn + 1 + 100
    assert eng.handle(f.c(nxt + 5000, synack.seq + 2, FIN | ACK), C2S, T0 + 1) == [Drop("fin_out_of_window")]
    accepted(eng.handle(f.s(f.server_isn + 2, nxt, FIN | ACK), S2C, T0 + 1))
    assert eng.established == 1 and eng.stats.dropped["fin_out_of_window"] == 1
    eng.handle_timer(T0 + 30)
    accepted(eng.handle(f.c(nxt, synack.seq + 3, ACK, payload=b"more"), C2S, T0 + 31))
    accepted(eng.handle(f.s(f.server_isn + 3, nxt + 4, ACK), S2C, T0 + 31))
    accepted(eng.handle(f.c(nxt + 4, synack.seq + 3, FIN | ACK), C2S, T0 + 32))
    assert eng.established == 0 and eng.stats.closed["fin"] == 1
    accepted(eng.handle(f.s(f.server_isn + 3, nxt + 5, ACK), S2C, T0 + 32))
    accepted(eng.handle(f.c(nxt + 4, synack.seq + 3, FIN | ACK), C2S, T0 + 32.5))  # a retransmission
    assert eng.stats.dropped["fin_out_of_window"] == 1


def test_pending_client_rst_outside_the_synacks_window_is_dropped() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK), C2S, T0)
    bogus = f.c(f.client_isn + 1 + 70_000, 0, RST)
    assert eng.handle(bogus, C2S, T0 + 0.001) == [Drop("rst_out_of_window")] and eng.pending == 1


def test_ten_minutes_idle_then_data() -> None:
    eng, f = make_engine(), Flow()  # default idle timeout 7440 s
    synack, _, _ = handshake(eng, f)
    for t in range(0, 601, 30):
        eng.handle_timer(T0 + t)
    got = accepted(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, payload=b"late", ts=(9999, 1)), C2S, T0 + 600))
    assert got.payload == b"late" and got.ack == f.server_isn + 1


def test_dsack_and_multiple_sack_blocks() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack, _, _ = handshake(eng, f)
    c = synack.seq
    blocks = ((c + 1, c + 11), (c + 21, c + 31), (c + 41, c + 51))
    back = accepted(eng.handle(f.c(f.client_isn + 1, c + 1, ACK, opts=TcpOptions(sack=blocks)), C2S, T0 + 1))
    s = f.server_isn
    assert back.options.sack == ((s + 1, s + 11), (s + 21, s + 31), (s + 41, s + 51))


def test_pending_client_rst_resets_server_and_frees_state() -> None:
    eng, f = make_engine(), Flow(ts=False)
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK), C2S, T0)
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, RST), C2S, T0 + 0.1)
    rst = one(out, "rst")
    assert rst.dst == f.server and rst.seq == f.client_isn + 1
    assert eng.conns == {} and eng.pending == 0


def test_held_data_is_bounded() -> None:
    eng, f = make_engine(pending_buffer_bytes=3000), Flow(ts=False)
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    seq = f.client_isn + 1
    for _ in range(4):
        eng.handle(f.c(seq, synack.seq + 1, ACK | PSH, payload=b"z" * 1000), C2S, T0)
        seq += 1000
    assert eng.stats.dropped["held_overflow"] == 1
    sa = TcpOptions(mss=1460, wscale=7)
    out = eng.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK, 65000, opts=sa), S2C, T0)
    assert [p.payload_len for p in released(out)] == [1000, 1000, 1000]


def _held_pending(eng: Engine, f: Flow, segments: int) -> list[int]:
    """A validated connection whose client sent `segments` data segments before the server
    answered; the tokens they are held under."""
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    tokens = []
    for i in range(segments):
        out = eng.handle(f.c(f.client_isn + 1 + 100 * i, synack.seq + 1, ACK | PSH, payload=b"y" * 100), C2S, T0)
        assert isinstance(out[0], Hold), out
        tokens.append(out[0].token)
    return tokens


@pytest.mark.parametrize("end", ["refused", "timeout", "client_rst"])
def test_held_data_is_dropped_when_the_handshake_ends_without_the_server(end: str) -> None:
    """Every held packet gets a verdict: dropped when the server refuses, the handshake times
    out or the client resets it, so none keeps a queue slot."""
    eng, f = make_engine(backend_timeout=3.0), Flow(ts=False)
    tokens = _held_pending(eng, f, 3)
    assert eng.held_packets == 3
    if end == "refused":
        out = eng.handle(f.s(0, f.client_isn + 1, RST | ACK, 0), S2C, T0)
    elif end == "timeout":
        out = [a for t in (1.0, 2.0, 3.0) for a in eng.handle_timer(T0 + t)]
    else:
        out = eng.handle(f.c(f.client_isn + 301, 0, RST, 0), C2S, T0)
    assert [(a.token, a.verdict) for a in out if isinstance(a, Release)] == [
        (t, Drop("held_discarded")) for t in tokens]
    assert eng.held_packets == 0 and eng.conns == {}


def test_held_packets_are_bounded_per_connection() -> None:
    """One client's tiny segments cannot take every held slot: at most MAX_HELD_PER_CONNECTION."""
    eng, f = make_engine(), Flow(ts=False)
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    verdicts = [eng.handle(f.c(f.client_isn + 1 + i, synack.seq + 1, ACK | PSH, payload=b"."), C2S, T0)[0]
                for i in range(Engine.MAX_HELD_PER_CONNECTION + 1)]
    assert all(isinstance(v, Hold) for v in verdicts[:-1]) and verdicts[-1] == Drop("held_overflow")
    assert eng.held_packets == Engine.MAX_HELD_PER_CONNECTION


def test_held_packets_are_bounded_across_connections() -> None:
    """Beyond MAX_HELD_PACKETS held in the queue, data is dropped (the client sends it again)."""
    eng = make_engine()
    eng.MAX_HELD_PACKETS = 4  # type: ignore[misc]
    _held_pending(eng, Flow(ts=False), 3)
    f = Flow(ts=False, cport=40001)
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    first = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, payload=b"a"), C2S, T0)
    second = eng.handle(f.c(f.client_isn + 2, synack.seq + 1, ACK | PSH, payload=b"b"), C2S, T0)
    assert isinstance(first[0], Hold) and second == [Drop("held_limit")]
    assert eng.stats.dropped["held_limit"] == 1 and eng.held_packets == 4


def test_profile_learns_only_what_the_syn_offered() -> None:
    """A client without timestamps/SACK/wscale must not make the proxy think the server lacks them."""
    eng = make_engine()
    handshake(eng, Flow(ts=False, sack=False, client_ws=None), server_ws=None)
    prof = eng.profile(4, Flow().server, 80)
    assert prof.ts_ok and prof.sack_ok and prof.wscale == 7
    synack = one(eng.handle(Flow(cport=40001).syn(), C2S, T0 + 1), "synack")
    assert synack.options.ts is not None and synack.options.sack_ok and synack.options.wscale == 7
    # a server that really declines timestamps is learned
    handshake(eng, Flow(cport=40002), server_ws=7, server_ts=0)
    eng2 = make_engine()
    f = Flow(cport=40003)
    out = eng2.handle(f.syn(), C2S, T0)
    sa = one(out, "synack")
    eng2.handle(f.c(f.client_isn + 1, sa.seq + 1, ACK, ts=(501, sa.options.ts[0])), C2S, T0)
    eng2.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK, 65000, opts=TcpOptions(mss=1460, wscale=7)), S2C, T0)
    assert not eng2.profile(4, f.server, 80).ts_ok and not eng2.profile(4, f.server, 80).sack_ok


def test_translation_view_says_when_the_kernel_could_take_over() -> None:
    """Conn.translation is the conntrack-shaped view (seq offset, ts offset); equal scales are offloadable."""
    same, f = make_engine(wscale=7), Flow()
    synack, _, _ = handshake(same, f, server_ws=7)
    tr = next(iter(same.conns.values())).translation
    assert tr.seq_offset == (synack.seq - f.server_isn) & U32 and tr.kernel_offloadable
    other = make_engine(wscale=12)
    handshake(other, Flow(), server_ws=7)
    assert not next(iter(other.conns.values())).translation.kernel_offloadable  # the kernel cannot rescale


@pytest.mark.parametrize("family", [4, 6])
def test_conn_key_is_one_bytes_object_that_splits_back(family: int) -> None:
    eng, f = make_engine(), Flow(family=family)
    handshake(eng, f)
    key = conn_key(family, f.client, f.server, f.cport, 80)
    assert list(eng.conns) == [key] and len(key) == (12 if family == 4 else 36)
    assert split_key(key) == (family, f.client, f.cport, f.server, 80)


# ------------------------------------------------------------------ ICMP "too big" about a server's segment


def _too_big(f: Flow, quoted: bytes) -> bytes:
    """What a router on the client's side sends the server about `quoted` (a translated segment)."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import IPv6, ICMPv6PacketTooBig

    router = "198.18.9.1" if f.family == 4 else "fd53:5059::9:1"
    server = P.addr_text(f.family, f.server)
    if f.family == 4:
        return bytes(IP(src=router, dst=server) / ICMP(type=3, code=4, nexthopmtu=1280) / quoted[:548])
    return bytes(IPv6(src=router, dst=server) / ICMPv6PacketTooBig(mtu=1280) / quoted[:1184])


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_too_big_gets_the_servers_sequence_number_back(family: int) -> None:
    """The quote carries the client's view of the server's sequence number, which the server's
    TCP would ignore; the proxy puts the server's own back and makes the ICMP checksum anew."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import IPv6

    eng, f = make_engine(), Flow(family=family)
    synack, _, _ = handshake(eng, f)
    server_seq = f.server_isn + 1
    seen = accepted(eng.handle(f.s(server_seq, f.client_isn + 1, ACK, payload=b"x" * 1400), S2C, T0 + 1))
    assert seen.seq == synack.seq + 1 != server_seq
    out = eng.handle_raw(_too_big(f, seen.raw), T0 + 1.1)
    assert len(out) == 1 and isinstance(out[0], Accept) and out[0].payload is not None
    # scapy computes the ICMP checksum itself when the field is deleted: it must agree.
    got = IP(out[0].payload) if family == 4 else IPv6(out[0].payload)
    message = got[ICMP] if family == 4 else got.payload
    want = message.chksum if family == 4 else message.cksum
    if family == 4:
        del message.chksum
    else:
        del message.cksum
    rebuilt = (IP if family == 4 else IPv6)(bytes(got))
    assert (rebuilt[ICMP].chksum if family == 4 else rebuilt.payload.cksum) == want
    quoted = P.parse_too_big(out[0].payload)
    assert quoted is not None and quoted.seq == server_seq and quoted.sport == 80
    assert eng.stats.icmp_too_big == {"translated": 1}


def test_icmp_too_big_about_a_connection_not_held_is_passed_on_and_other_ports_pass() -> None:
    eng, f = make_engine(), Flow()
    held = P.build(4, f.server, f.client, 80, f.cport, 5, 6, ACK, 500, TcpOptions(), b"x" * 1400)
    assert eng.handle_raw(_too_big(f, held), T0) == [PassOn()]  # another worker may hold it
    other = P.build(4, f.server, f.client, 22, f.cport, 5, 6, ACK, 500, TcpOptions(), b"x" * 1400)
    assert eng.handle_raw(_too_big(f, other), T0) == [Accept()]
    assert eng.stats.icmp_too_big == {"not_held": 1, "not_proxied": 1}


# ------------------------------------------------------------------ ECN (RFC 3168)


def with_ecn(pkt: P.Packet, codepoint: int) -> P.Packet:
    """The packet with its IP header's ECN field set (a client's ECT or a router's CE)."""
    buf = bytearray(pkt.raw)
    if pkt.family == 4:
        buf[1] = buf[1] & 0xFC | codepoint
        buf[10:12] = b"\0\0"
        buf[10:12] = P.ipv4_checksum(bytes(buf[:20])).to_bytes(2, "big")
    else:
        buf[1] = buf[1] & 0xCF | codepoint << 4
    return P.parse(bytes(buf))


@pytest.mark.parametrize("fast_paths", [True, False])
@pytest.mark.parametrize("flags, agreed", [(ECE | CWR, True), (ECE, False), (CWR, False), (0, False)])
def test_an_ecn_setup_syn_gets_an_ecn_setup_synack(fast_paths: bool, flags: int, agreed: bool) -> None:
    """Only a SYN with ECE and CWR asks for ECN; the SYN-ACK agrees with ECE alone (RFC 3168 6.1.1)."""
    eng, f = make_engine(), Flow()
    eng.fast_paths = fast_paths
    syn = f.c(f.client_isn, 0, SYN | flags, 64240, opts=TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(500, 0)))
    synack = one(eng.handle_raw(syn.raw, T0), "synack")
    assert synack.flags == (SYN | ACK | ECE if agreed else SYN | ACK)
    assert P.ip_ecn(synack.raw) == P.ECN_NOT_ECT


@pytest.mark.parametrize("family", [4, 6])
def test_ecn_is_asked_of_the_server_and_ecn_capable_packets_pass_as_they_are(family: int) -> None:
    eng, f = make_engine(), Flow(family=family, ecn=True)
    synack, syn, out = handshake(eng, f)
    assert synack.flags & (ECE | CWR) == ECE and syn.flags & (ECE | CWR) == ECE | CWR
    assert eng.stats.ecn == {"negotiated": 1}
    for codepoint in (1, 2, P.ECN_CE):  # ECT(1), ECT(0), CE: the server echoes the mark itself
        data = with_ecn(f.c(f.client_isn + 1, synack.seq + 1, ACK | PSH, payload=b"abc"), codepoint)
        assert P.ip_ecn(accepted(eng.handle(data, C2S, T0 + 1)).raw) == codepoint


def test_a_client_without_ecn_gets_none_from_the_server() -> None:
    eng, f = make_engine(), Flow()
    synack, syn, _ = handshake(eng, f)
    assert not synack.flags & (ECE | CWR) and not syn.flags & (ECE | CWR)
    assert eng.stats.ecn == {}


@pytest.mark.parametrize("family", [4, 6])
def test_a_server_that_refuses_ecn_gets_no_ecn_capable_packets_and_ce_becomes_a_loss(family: int) -> None:
    """The client was told ECN; the server (net.ipv4.tcp_ecn = 0) refuses it. The server would
    never echo a CE mark, so the client would never slow down for one: CE-marked packets are
    dropped (the loss the mark stands for) and ECT ones reach the server as not ECN-capable."""
    eng, f = make_engine(), Flow(family=family, ecn=True)
    synack, _, _ = handshake(eng, f, server_ecn=False)
    assert synack.flags & ECE and eng.stats.ecn == {"refused": 1}
    seq = f.client_isn + 1
    ect = with_ecn(f.c(seq, synack.seq + 1, ACK | PSH, payload=b"abc"), 2)
    out = accepted(eng.handle(ect, C2S, T0 + 1))
    assert P.ip_ecn(out.raw) == P.ECN_NOT_ECT and out.payload == b"abc"
    if family == 4:  # the IP header checksum updated too: scapy computes the same
        from scapy.layers.inet import IP

        got = IP(out.raw)
        want = got.chksum
        del got.chksum
        assert IP(bytes(got)).chksum == want
    ce = with_ecn(f.c(seq + 3, synack.seq + 1, ACK | PSH, payload=b"def"), P.ECN_CE)
    assert eng.handle(ce, C2S, T0 + 1) == [Drop("ce_unechoed")]
    assert eng.stats.dropped["ce_unechoed"] == 1
    plain = f.c(seq + 3, synack.seq + 1, ACK | PSH, payload=b"def")  # its retransmission: not ECT
    assert accepted(eng.handle(plain, C2S, T0 + 1.2)).payload == b"def"


def test_a_refusal_is_learnt_and_asked_again_a_minute_later() -> None:
    """After a refusal no SYN-ACK agrees ECN, until DECLINED_RETRY has passed: then one client is
    agreed with (the server is asked again) and its answer is learnt."""
    eng = make_engine()
    handshake(eng, Flow(ecn=True), server_ecn=False)
    assert not eng.profile(4, Flow().server, 80).ecn_ok
    later = T0 + 1
    assert not one(eng.handle(Flow(ecn=True, cport=40001).syn(), C2S, later), "synack").flags & ECE
    retry = T0 + 0.001 + Engine.DECLINED_RETRY
    assert not one(eng.handle(Flow(ecn=True, cport=40002).syn(), C2S, retry - 0.01), "synack").flags & ECE
    f = Flow(ecn=True, cport=40003)
    synack = one(eng.handle(f.syn(), C2S, retry), "synack")
    assert synack.flags & ECE  # the one client agreed with: the server is asked again
    assert not one(eng.handle(Flow(ecn=True, cport=40004).syn(), C2S, retry + 0.5), "synack").flags & ECE
    syn = one(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, ts=(501, synack.options.ts[0])), C2S, retry + 1), "syn")
    assert syn.flags & (ECE | CWR) == ECE | CWR
    sa = TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(9_000_000, syn.options.ts[0]))
    eng.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK | ECE, 65160, opts=sa), S2C, retry + 1)
    # the server takes ECN again: learnt from that handshake, every client is agreed with at once
    assert eng.profile(4, Flow().server, 80).ecn_ok and eng.stats.ecn == {"refused": 1, "negotiated": 1}
    assert one(eng.handle(Flow(ecn=True, cport=40005).syn(), C2S, retry + 2), "synack").flags & ECE


def test_a_forged_ecn_bit_does_not_validate() -> None:
    """The cookie carries the agreement and its MAC covers it: a client told no ECN cannot
    turn it on by flipping the bit (nor the other way)."""
    eng, f = make_engine(), Flow(ecn=True)
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    forged = synack.seq ^ 0x100  # the ECN bit of data9, under the whitening
    out = eng.handle(f.c(f.client_isn + 1, forged + 1, ACK), C2S, T0)
    assert out == [Drop("cookie_invalid")]


def connect_to_a_server(eng: Engine, f: Flow, now: float, sack: bool, ts: bool) -> tuple[P.Packet, P.Packet]:
    """A handshake whose server takes SACK and timestamps only if told to; (SYN-ACK, SYN)."""
    synack = one(eng.handle(f.syn(), C2S, now), "synack")
    ack_ts = (f.client_tsval + 1, synack.options.ts[0]) if synack.options.ts else None
    syn = one(eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, ts=ack_ts), C2S, now), "syn")
    sa = TcpOptions(mss=1460, wscale=7, sack_ok=sack and syn.options.sack_ok,
                    ts=(9_000_000, syn.options.ts[0]) if ts and syn.options.ts else None)
    eng.handle(f.s(f.server_isn, f.client_isn + 1, SYN | ACK, 65160, opts=sa), S2C, now)
    return synack, syn


@pytest.mark.parametrize("option", ["sack", "ts"])
def test_a_declined_option_is_offered_again_a_minute_later(option: str) -> None:
    """A server that declined SACK or timestamps (net.ipv4.tcp_sack / tcp_timestamps = 0) is
    not offered them, so it could never be seen taking them again: DECLINED_RETRY later one
    client is agreed with, and the server's answer is learnt."""
    def has(pkt: P.Packet) -> bool:
        return pkt.options.sack_ok if option == "sack" else pkt.options.ts is not None

    eng = make_engine()
    connect_to_a_server(eng, Flow(), T0, sack=option != "sack", ts=option != "ts")
    assert not has(one(eng.handle(Flow(cport=40001).syn(), C2S, T0 + 1), "synack"))
    retry = T0 + Engine.DECLINED_RETRY
    assert not has(one(eng.handle(Flow(cport=40002).syn(), C2S, retry - 0.01), "synack"))
    synack, syn = connect_to_a_server(eng, Flow(cport=40003), retry, sack=True, ts=True)  # switched back on
    assert has(synack) and has(syn)
    assert has(one(eng.handle(Flow(cport=40004).syn(), C2S, retry + 1), "synack"))


# ------------------------------------------------------------------ SYN-ACK resends


def due_resends(eng: Engine, now: float) -> list[P.Packet]:
    return [P.parse(s.data) for s in sends(eng.handle_timer(now), "synack_resend")]


def test_an_unanswered_synack_is_sent_again_after_1_and_3_s() -> None:
    """As a server's TCP would: a client whose ACK was lost answers again (where the server
    speaks first, nothing else would complete the connection)."""
    eng, f = make_engine(), Flow()
    synack = one(eng.handle(f.syn(), C2S, T0), "synack")
    assert eng.next_deadline() == T0 + 1.0
    assert due_resends(eng, T0 + 0.99) == []
    again = due_resends(eng, T0 + 1.0)
    assert [p.raw for p in again] == [synack.raw]  # the same cookie: either ACK validates
    assert eng.next_deadline() == T0 + 3.0
    assert [p.raw for p in due_resends(eng, T0 + 3.0)] == [synack.raw]
    assert due_resends(eng, T0 + 100) == [] and eng.next_deadline() is None  # two retries by default
    assert eng.stats.synack_resent == 2 and eng.stats.synack_sent == 1
    out = eng.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, ts=(501, synack.options.ts[0])), C2S, T0 + 3.1)
    one(out, "syn")  # the ACK to the resent SYN-ACK validates


def test_an_answered_synack_is_not_sent_again() -> None:
    eng, f = make_engine(), Flow()
    handshake(eng, f)
    assert due_resends(eng, T0 + 1.0) == []
    eng2, f2 = make_engine(), Flow(family=6)
    synack = one(eng2.handle(f2.syn(), C2S, T0), "synack")
    eng2.handle(f2.c(f2.client_isn + 1, synack.seq + 1, ACK, ts=(501, synack.options.ts[0])), C2S, T0 + 0.1)
    assert due_resends(eng2, T0 + 1.0) == []  # pending counts as answered


def test_synack_retries_are_configurable_and_zero_turns_them_off() -> None:
    eng, f = make_engine(synack_retries=0), Flow()
    one(eng.handle(f.syn(), C2S, T0), "synack")
    assert eng.next_deadline() is None and due_resends(eng, T0 + 100) == []
    eng = make_engine(synack_retries=4)
    one(eng.handle(f.syn(), C2S, T0), "synack")
    got = [len(due_resends(eng, T0 + t)) for t in (1.0, 3.0, 7.0, 15.0, 31.0)]
    assert got == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError):
        make_engine(synack_retries=6)


def test_a_flood_gets_no_synack_resent() -> None:
    """More SYNs in a second than a ring holds are a flood: the rings are emptied and that second
    keeps no more, so the proxy still sends one SYN-ACK per SYN, no more (and a flood costs a
    counter per SYN, not a copy)."""
    eng = make_engine()
    rate = 2 * Engine.RESEND_SLOTS  # SYNs a second, for 3 s, the timers run every 10 ms
    resent = 0
    for i in range(3 * rate):
        now = T0 + i / rate
        f = Flow(cport=1024 + i % 60000, client_isn=i)
        f.client = bytes([198, 20 + i // 65536, i >> 8 & 0xFF, i & 0xFF])
        eng.handle(f.syn(), C2S, now)
        if i % (rate // 100) == 0:
            resent += len(due_resends(eng, now))
    assert eng.stats.synack_sent == 3 * rate and resent == 0 == eng.stats.synack_resent
    assert due_resends(eng, T0 + 10) == []  # nor after it: a flood's second keeps nothing
    f = Flow()
    one(eng.handle(f.syn(), C2S, T0 + 20), "synack")  # a quiet second keeps its SYN-ACKs again
    assert len(due_resends(eng, T0 + 21)) == 1


def test_synack_resends_count_against_the_synack_rate_limit() -> None:
    from synproxy.limits import LimitsConfig

    """A spoofed SYN's resends go to its victim too: the per-source bucket counts them."""
    eng, f = make_engine(limits=LimitsConfig(synack_rate_per_source=0.1, synack_burst_per_source=1)), Flow()
    one(eng.handle(f.syn(), C2S, T0), "synack")  # takes the one token
    assert due_resends(eng, T0 + 1.0) == [] and due_resends(eng, T0 + 3.0) == []  # 0.1, 0.3 tokens
    assert eng.stats.synack_resent == 0
    roomy = make_engine(limits=LimitsConfig(synack_rate_per_source=1.0, synack_burst_per_source=1))
    one(roomy.handle(f.syn(), C2S, T0), "synack")
    assert len(due_resends(roomy, T0 + 1.0)) == 1  # a token again after 1 s


def test_a_spoofed_trickle_gets_few_resends_and_real_clients_make_room() -> None:
    """1,000 spoofed SYNs a second (below the ring's size, so all are kept) that nobody answers:
    resends are held to RESEND_FLOOR a second, not two per SYN. Validated ACKs raise the
    allowance (twice as many, the second after), so a server's own clients keep theirs."""
    eng = make_engine()
    resent_per_second = []
    for second in range(5):
        got = 0
        for i in range(1000):
            now = T0 + second + i / 1000
            n = second * 1000 + i
            f = Flow(cport=1024 + n % 60000, client_isn=n)
            f.client = bytes([198, 21, n >> 8 & 0xFF, n & 0xFF])
            eng.handle(f.syn(), C2S, now)
            if i % 10 == 0:
                got += len(due_resends(eng, now))
        resent_per_second.append(got)
    assert resent_per_second[0] == 0  # nothing due yet
    assert all(0 < got <= Engine.RESEND_FLOOR for got in resent_per_second[1:]), resent_per_second
    assert eng.stats.synack_resends_skipped > 1000
    # Each second 300 real clients answer and 200 lose their ACK: the allowance (64 + 600 a
    # second) covers every resend the 200 need.
    busy = make_engine()
    n = 0
    for second in range(4):
        for i in range(500):
            now = T0 + second + i / 500
            n += 1
            f = Flow(cport=1024 + n % 60000)
            f.client = bytes([198, 22, n >> 8 & 0xFF, n & 0xFF])
            synack = one(busy.handle(f.syn(), C2S, now), "synack")
            if i % 5 < 3:
                busy.handle(f.c(f.client_isn + 1, synack.seq + 1, ACK, ts=(501, synack.options.ts[0])), C2S, now)
            if i % 10 == 0:
                busy.handle_timer(now)
    assert busy.stats.synack_resends_skipped == 0 and busy.stats.synack_resent >= 3 * 200 - 20
