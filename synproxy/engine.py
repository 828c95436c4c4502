"""The sans-IO SYN-proxy engine: packets and `now` in, actions out.

No sockets, clocks or globals: the shell feeds it parsed packets with their
direction and the current time, executes the returned actions (a verdict for
the packet, packets to send) and calls `handle_timer(now)` at `next_deadline()`.

Life of a connection:
  SYN (client)           -> SYN-ACK whose ISN is a cookie; nothing is stored. (While
                            the shell says `overloaded`: only a retransmission is answered;
                            a first attempt is shed, its key set in a fixed bitmap.)
  ACK/data (client)      -> cookie checked exactly; state PENDING; SYN to the server
                            with the client's ISN and decoded options; data held.
  SYN-ACK (server)       -> held data released by verdict (or an ACK to the server), a window
                            update to the client; state ESTABLISHED; the SYN-ACK is stolen.
  everything after       -> translated both ways: seq/ack, SACK blocks, TSval/TSecr,
                            window values rescaled between the two window scales.
  FIN both ways, RST,    -> state removed (after a short linger for retransmissions);
  idle timeout              after the idle timeout both ends get a RST.
A client's RST counts only as the server would take it (RFC 5961): out of the window the
server last announced it is dropped; in it but not at the next expected sequence number it
is passed on and the server asked (a keepalive-style probe) whether its socket is still there;
so a blind spoofer cannot end the proxy's half of a connection the server keeps.
ECN (RFC 3168) is agreed with a client that asks only while the server took it at its last
handshake; a server that refuses it after all gets no ECN-capable packets, and CE-marked ones,
whose mark it would not echo, are dropped (the loss the mark stands for).
"""

from __future__ import annotations

import heapq
import struct
from collections import Counter
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import ClassVar

from . import packet as P
from .cookie import CookieMaker, CookieMatch, CookieOptions
from .limits import Limits, LimitsConfig, RetryMemory, Shed
from .resend import ResendRing
from .packet import ACK, CWR, ECE, FIN, RST, SYN, Packet, PacketError, TcpOptions

U32 = 0xFFFFFFFF
MAX_WINDOW_FIELD = 0xFFFF

# The queue binding copies packets up to this size to userspace whole (the kernel's
# maximum copy range); a larger segment could not be rewritten, so no MSS the proxy
# announces may allow one. NetfilterQueue copies only 4016 bytes (EngineConfig.max_packet).
MAX_PACKET = 0xFFFF - 4
HEADERS_WITHOUT_OPTIONS = 40 + 20  # IPv6 header + TCP header


class Direction(Enum):
    """Which way a packet travels relative to the protected server."""

    FROM_CLIENT = "from_client"
    FROM_SERVER = "from_server"


class State(Enum):
    PENDING = "pending"  # cookie validated, backend handshake in flight
    ESTABLISHED = "established"
    CLOSING = "closing"  # both FINs or a RST seen; kept briefly for retransmissions


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Accept:
    """Let the packet pass; `payload` replaces it when the proxy rewrote it."""

    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Drop:
    """Drop the packet; `reason` is the metric label."""

    reason: str


@dataclass(slots=True)
class Send:
    """Send a packet the proxy made (raw socket, marked so the rules let it pass)."""

    family: int
    dst: bytes
    data: bytes
    to: Direction  # TO the client is FROM_SERVER's direction; kept explicit for metrics
    kind: str  # synack, synack_resend, syn, ack, window_update, rst, probe


@dataclass(frozen=True, slots=True)
class PassOn:
    """Not this engine's packet: an ICMP error about a connection it does not hold. With
    several workers another may hold it, so the shell hands it to the next worker's queue;
    the last lets it pass unchanged."""


@dataclass(frozen=True, slots=True)
class Hold:
    """Leave the packet in the kernel's queue without a verdict: a later `Release` with the same
    token gives it one. Client data that arrives before the server is connected waits so, and
    then passes by verdict like every later segment of its connection, so none of those can
    overtake it. A copy sent by raw socket could be overtaken: in local mode it reaches the
    server through the loopback device's backlog, which the kernel may process late, while a
    verdict delivers at once (the server then dropped the held copies as old: TcpExtPAWSEstab)."""

    token: int


@dataclass(frozen=True, slots=True)
class Release:
    """The verdict for the packet held as `token`, given now (it follows the current verdict)."""

    token: int
    verdict: Accept | Drop


Action = Accept | Drop | Send | PassOn | Hold | Release

# The verdicts of the flood paths, made once.
_SYN_ANSWERED = Drop("syn_answered")
_PASS_ON = PassOn()
_COOKIE_INVALID = Drop("cookie_invalid")
_SHED_DROPS = {shed: Drop(f"shed_{shed.value}") for shed in Shed}
_SHED_OVERLOAD = _SHED_DROPS[Shed.OVERLOAD]
_SYN_KIND = SYN | ACK | RST | FIN  # a pure SYN has only SYN of these
_BAD_SOURCE = Drop("bad_source")
_RST_OUT_OF_WINDOW = Drop("rst_out_of_window")
_PROBE_ANSWERED = Drop("probe_answered")
_FIN_OUT_OF_WINDOW = Drop("fin_out_of_window")
_CE_UNECHOED = Drop("ce_unechoed")
_VALIDATED = Drop("validated")
_PENDING_ACK = Drop("pending_ack")  # nothing to hold: its window and timestamp are noted
_HELD_DISCARDED = Drop("held_discarded")  # its connection ended before the server answered
_ECN_SETUP = ECE | CWR  # a SYN asking for ECN has both; an agreeing SYN-ACK ECE alone
# SYN with FIN or RST: no TCP stack sends it; scanners and firewall evasion do. Linux drops it
# in LISTEN (SYN+FIN since 3.5, RST first), and answering it would have the proxy open a
# backend connection for a packet the server itself would have ignored.
_SYN_WITH_FIN_OR_RST = Drop("bad_flags")
_LOW64 = (1 << 64) - 1
# Conn.offsets without the fields a server's packet sets (client_next, server_window).
_WITHOUT_SERVER_ACK = _LOW64 | U32 << 112
_BELOW_SERVER_NEXT = (1 << 112) - 1  # Conn.offsets without server_next
_V4_BROADCAST = b"\xff\xff\xff\xff"
_V6_MAPPED = bytes(10) + b"\xff\xff"
_V6_UNSPECIFIED, _V6_LOOPBACK = bytes(16), bytes(15) + b"\x01"


def bad_source(family: int, src: bytes, dst: bytes) -> bool:
    """A source no SYN-ACK may go to: one the kernel's routing would drop as martian (0/8,
    127/8, 224/4 and 255.255.255.255, as ip_route_input_slow; ::, ::1, ff00::/8, v4-mapped), or the destination
    itself (a LAND attack). The queue rules run before routing, so such SYNs reach the proxy;
    answered, they would send SYN-ACKs to multicast groups on the segment or back to itself."""
    if family == 4:
        first = src[0]
        return first == 0 or first == 127 or 224 <= first < 240 or src == _V4_BROADCAST or src == dst
    return (src[0] == 0xFF or src == dst
            or (src[0] == 0 and (src == _V6_UNSPECIFIED or src == _V6_LOOPBACK or src[:12] == _V6_MAPPED)))


# ---------------------------------------------------------------- config and state


@dataclass(frozen=True, slots=True)
class BackendProfile:
    """What the server says in its SYN-ACK; what the proxy mimics toward clients."""

    mss: int = 1460
    wscale: int | None = 7
    sack_ok: bool = True
    ts_ok: bool = True
    window: int = 65535
    ecn_ok: bool = True  # takes ECN when a SYN asks (Linux's default, net.ipv4.tcp_ecn = 2)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    ports: frozenset[int]
    wscale: int | None = None  # None = auto: mimic the server's latest choice
    mss: int | None = None  # None = auto
    default_profile: BackendProfile = BackendProfile()
    backend_timeout: float = 3.0  # give up on a silent server, RST the client
    syn_retry_interval: float = 1.0  # resend the SYN to a silent server this often
    idle_timeout: float = 7440.0  # established and idle: keepalive default 7200 s + probes
    closing_linger: float = 10.0  # after FIN both ways or RST
    pending_buffer_bytes: int = 65536  # client data held per connection during the backend handshake
    synack_retries: int = 2  # resends of an unanswered SYN-ACK, 1 s then 2 s, 4 s ... apart (0: none)
    max_packet: int = MAX_PACKET  # largest packet the queue hands over whole; caps every MSS announced
    ts_base: int = 0  # offset of the proxy's TSval clock (random in the daemon)
    limits: LimitsConfig = LimitsConfig()

    def __post_init__(self) -> None:
        if not self.ports:
            raise ValueError("at least one protected port is required")
        if self.wscale is not None and not 0 <= self.wscale <= 14:
            raise ValueError(f"window scale must be 0..14, got {self.wscale}")
        if self.mss is not None and not 536 <= self.mss <= 65535:
            raise ValueError(f"MSS must be 536..65535, got {self.mss}")
        if not 536 + HEADERS_WITHOUT_OPTIONS <= self.max_packet <= MAX_PACKET:
            raise ValueError(f"max_packet must be {536 + HEADERS_WITHOUT_OPTIONS}..{MAX_PACKET}, got {self.max_packet}")
        if not self.idle_timeout > 0:
            raise ValueError(f"idle timeout must be > 0, got {self.idle_timeout}")
        if not 0 <= self.synack_retries <= 5:
            raise ValueError(f"SYN-ACK retries must be 0..5, got {self.synack_retries}")

    @property
    def max_mss(self) -> int:
        """The largest MSS whose segments still fit `max_packet` (IPv6, no TCP options)."""
        return self.max_packet - HEADERS_WITHOUT_OPTIONS


# A connection's last activity is kept as a tick of idle_timeout / IDLE_TICKS seconds,
# modulo 256: a small int, which CPython shares, where a float cost 24 bytes each. The
# sweep expires a connection once IDLE_TICKS + 1 ticks have passed since (so never before
# idle_timeout, and at most 2/IDLE_TICKS of it later); it looks at every connection
# far more often than the 256 - IDLE_TICKS ticks after which the count would wrap.
IDLE_TICKS = 64
TICK_MASK = 0xFF


def rescale_window(field: int, from_shift: int, to_shift: int) -> int:
    """A window field sent in one window scale, in another: rounded down, but never to zero.

    Rounded down, a sender is never promised more than the receiver offered (a slow
    reader on a small buffer drops what exceeds it: rounding every window up cost 6.7%
    retransmissions against 0 in the test of a scale-0 server behind scale 7). But a
    window below one unit of the other scale must not become zero: a sender told "zero"
    only probes, and a receiver offering that little (Linux clamps to two segments under
    memory pressure) never gets the data that would open its window. An upload through
    a proxy advertising scale 12 to a server on scale 2 stalled that way (1 in about 10
    slow-reading uploads). Such a window becomes one unit of `to_shift`.
    """
    window = (field << from_shift) >> to_shift
    if window == 0:
        return 1 if field else 0
    return window if window < MAX_WINDOW_FIELD else MAX_WINDOW_FIELD


def seq_after(a: int, b: int) -> bool:
    """a comes after b in 32-bit sequence space."""
    return 0 < ((a - b) & U32) < 0x80000000


# A connection's key: client address, server address, client port, server port, packed
# into one bytes object (12 bytes for IPv4, 36 for IPv6). One object where a 5-tuple took
# three (tuple, client address, client port: 145 bytes against 45 for IPv4), built per
# packet by one struct call; and bytes hash with the per-process SipHash key, so peers
# cannot aim collisions at the table (ints would not).
ConnKey = bytes
ServerKey = tuple[int, bytes, int]
SynAckPlan = tuple[int, int, bool, bool, bool]  # window, MSS, SACK-permitted, timestamps, ECN
_pack_key_v4 = struct.Struct("!4s4sHH").pack
_pack_key_v6 = struct.Struct("!16s16sHH").pack
_unpack_key_v4 = struct.Struct("!4s4sHH").unpack
_unpack_key_v6 = struct.Struct("!16s16sHH").unpack


def conn_key(family: int, client: bytes, server: bytes, cport: int, sport: int) -> ConnKey:
    """The key of the connection between these two ends."""
    return (_pack_key_v4 if family == 4 else _pack_key_v6)(client, server, cport, sport)


def split_key(key: ConnKey) -> tuple[int, bytes, int, bytes, int]:
    """family, client address, client port, server address, server port of a key."""
    if len(key) == 12:
        client, server, cport, sport = _unpack_key_v4(key)
        return 4, client, cport, server, sport
    client, server, cport, sport = _unpack_key_v6(key)
    return 6, client, cport, server, sport


def _reset_server(key: ConnKey, seq: int) -> Send:
    """A RST from the client of `key` to its server at `seq` (ack none): what ends the server's
    socket when the proxy gives a connection up."""
    family, client, cport, server, sport = split_key(key)
    rst = P.build(family, client, server, cport, sport, seq & U32, 0, RST, 0)
    return Send(family, server, rst, Direction.FROM_CLIENT, "rst")


def _reset_both_ends(key: ConnKey, conn: Conn) -> list[Action]:
    """RSTs to both ends of an established connection the proxy gives up, each at the sequence
    number it last acknowledged (which each takes exactly, RFC 5961): the server's from its
    latest ACK, the client's from the client's latest ACK (ack none in both)."""
    family, client, cport, server, sport = split_key(key)
    to_client = P.build(family, server, client, sport, cport, conn.server_next, 0, RST, 0)
    return [_reset_server(key, conn.client_next), Send(family, client, to_client, Direction.FROM_SERVER, "rst")]


@dataclass(slots=True)
class Handshake:
    """What the proxy holds only while the server handshake is in flight."""

    client_isn: int
    cookie: int  # the proxy's ISN toward the client
    syn: bytes  # the SYN sent to the server, resent on timeout
    gives_up_at: float
    wscale_ok: bool  # window scaling negotiated with the client
    sack_ok: bool  # SACK-permitted offered to the server
    proxy_tsval: int  # the TSval of the proxy's SYN-ACK, as the client echoed it
    client_tsval: int
    client_window: int  # the client's latest window field (client's scale)
    ecn: bool = False  # ECN agreed with the client (so asked of the server)
    held: list[tuple[int, bytes]] = field(default_factory=list)  # (token, segment) to release
    held_bytes: int = 0
    held_next: int = 0  # first client sequence number not yet held


@dataclass(frozen=True, slots=True)
class Translation:
    """How one connection's numbers map between the two sides.

    Shaped like what conntrack can do in the kernel (CTA_SEQ_ADJ_REPLY offset,
    CTA_SYNPROXY tsoff); the kernel cannot rescale windows, so a flow is
    offloadable only when the two window scales agree. `Conn` keeps the same
    numbers more compactly; `Conn.translation` is this view.
    """

    seq_offset: int = 0  # server seq + offset = seq the client sees
    ts_offset: int = 0  # server TSval - offset = TSval the client sees
    client_send_shift: int = 0  # scale of windows the client sends
    server_recv_shift: int = 0  # scale the server applies to them
    server_send_shift: int = 0  # scale of windows the server sends
    client_recv_shift: int = 0  # scale the client applies to them (what the proxy advertised)

    @property
    def kernel_offloadable(self) -> bool:
        return (
            self.client_send_shift == self.server_recv_shift
            and self.server_send_shift == self.client_recv_shift
        )


@dataclass(frozen=True, slots=True)
class Shape:
    """What a connection negotiated, and which FINs it has seen.

    Few distinct values exist at a time (the scales a server picks, timestamps on or
    off), so the engine interns them and a connection holds one shared reference
    instead of seven fields of its own. Replaced, never changed, when a field changes.
    """

    ts: bool = False  # timestamps negotiated with the client (and, once established, the server)
    client_send_shift: int = 0  # scale of windows the client sends
    server_recv_shift: int = 0  # scale the server applies to them
    server_send_shift: int = 0  # scale of windows the server sends
    client_recv_shift: int = 0  # scale the client applies to them (what the proxy advertised)
    fin_from_client: bool = False
    fin_from_server: bool = False
    # The client was told ECN and the server refused it: the client's ECN-capable packets go
    # to the server as not ECN-capable, and CE-marked ones are dropped (the server would not
    # echo the mark, so the client would never slow down for it; a loss it does see).
    ecn_unechoed: bool = False


@dataclass(slots=True)
class Conn:
    """An established connection, kept small: there may be a million (see Translation for the numbers).

    Pending and closing connections are the subclasses: they add what only those phases
    need, and the engine replaces the object when the phase changes; so `state` is a
    class attribute, and an established connection is three references, two of them to
    shared objects.
    """

    state: ClassVar[State] = State.ESTABLISHED
    shape: Shape
    seen: int  # tick of the last packet (see IDLE_TICKS)
    # seq_offset | ts_offset << 32 (see Translation) | client_next << 64 | server_window
    # << 96 | server_next << 112: one int where five cost 160 bytes. Adding or subtracting it
    # mod 2**32 applies seq_offset as it is; only the timestamps need the shift (and the mask
    # after it). client_next and server_window are the ACK number and window field of the
    # server's latest packet: where the server takes a client's RST (see Engine._client_rst).
    # server_next is the client's latest ACK number: where the client takes the proxy's RST
    # when the connection is given up (Engine._sweep).
    offsets: int = 0

    @property
    def client_next(self) -> int:
        """The client sequence number the server last said it expects next."""
        return (self.offsets >> 64) & U32

    @property
    def server_window(self) -> int:
        """The window of the server's latest packet, in bytes (its field, in the server's scale)."""
        return (self.offsets >> 96 & 0xFFFF) << self.shape.server_send_shift

    @property
    def server_next(self) -> int:
        """The sequence number (as the client sees it) the client last said it expects next."""
        return self.offsets >> 112

    @property
    def seq_offset(self) -> int:
        return self.offsets & U32

    @property
    def ts_offset(self) -> int:
        return (self.offsets >> 32) & U32

    @property
    def translation(self) -> Translation:
        sh = self.shape
        return Translation(
            self.seq_offset, self.ts_offset, sh.client_send_shift,
            sh.server_recv_shift, sh.server_send_shift, sh.client_recv_shift,
        )


@dataclass(slots=True, kw_only=True)
class PendingConn(Conn):
    """A connection whose server handshake is in flight."""

    state: ClassVar[State] = State.PENDING
    handshake: Handshake
    deadline: float = 0.0  # the next SYN resend or the give-up (its timer heap entry)


@dataclass(slots=True, kw_only=True)
class ResetConn(Conn):
    """An established connection whose client sent a RST the server may not have taken
    (in its window, not at the sequence number it expects): still counted as established
    until the server's answer to a probe says whether its socket is gone."""

    deadline: float = 0.0  # the next probe, or the give-up (its timer heap entry)
    probes: int = 0  # probes sent so far


@dataclass(slots=True, kw_only=True)
class ClosingConn(Conn):
    """A connection after FIN both ways or a RST, kept a while to translate retransmissions."""

    state: ClassVar[State] = State.CLOSING
    deadline: float = 0.0  # the end of the linger (its timer heap entry)


@dataclass
class Stats:
    """Counters the metrics layer exports; plain ints on the hot path."""

    syn_received: int = 0
    synack_sent: int = 0
    ack_valid: int = 0
    ack_invalid: Counter[str] = field(default_factory=Counter)
    backend_handshakes: Counter[str] = field(default_factory=Counter)  # established/refused/timeout
    dropped: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    translated: int = 0
    closed: Counter[str] = field(default_factory=Counter)  # fin/rst/idle
    shed: Counter[str] = field(default_factory=Counter)  # caps and rate limits
    evicted: Counter[str] = field(default_factory=Counter)  # bounded tables
    retries_answered: int = 0  # SYNs let through under overload because they repeated a shed one
    synack_resent: int = 0  # SYN-ACKs sent again because no ACK had come
    synack_resends_skipped: int = 0  # due resends beyond the allowance (Engine.RESEND_FLOOR)
    client_resets: Counter[str] = field(default_factory=Counter)  # what became of clients' RSTs
    icmp_too_big: Counter[str] = field(default_factory=Counter)  # translated/not_held/not_proxied
    ecn: Counter[str] = field(default_factory=Counter)  # server handshakes asked for ECN: negotiated/refused


# ---------------------------------------------------------------- the engine


class Engine:
    """The SYN proxy's protocol logic. See the module docstring."""

    def __init__(self, config: EngineConfig, cookies: CookieMaker, fast_paths: bool = True) -> None:
        """`fast_paths=False` sends every packet through parse() and `handle`
        (the reference the flood fast path is tested against)."""
        self.config = config
        self.fast_paths = fast_paths
        self.cookies = cookies
        self.conns: dict[ConnKey, Conn] = {}
        self.stats = Stats()
        self.limits = Limits(config.limits)
        self._profiles: dict[ServerKey, BackendProfile] = {}
        # What a SYN-ACK from each server says, from its profile: see _synack_plan.
        self._synack_plans: dict[ServerKey, SynAckPlan] = {}
        # window scale advertised per server and cookie slot: the cookie has no room
        # for it, and the translation must know what the client was told.
        self._advertised_wscale: dict[tuple[ServerKey, int], int] = {}
        # When a server that declined an option clients offer (SACK, timestamps, ECN) is
        # offered it again: DECLINED_RETRY after, so a server whose sysctls switched it back
        # on (net.ipv4.tcp_sack, tcp_timestamps, tcp_ecn) is noticed at run time.
        self._retry_at: dict[ServerKey, float] = {}
        self._timers: list[tuple[float, ConnKey]] = []
        # Idle expiry of established connections: an incremental sweep over a
        # snapshot of the keys, so they need no timer entry each.
        self._sweep_keys: list[ConnKey] = []
        self._sweep_at = 0.0
        self._ticks_per_second = IDLE_TICKS / config.idle_timeout
        self._shapes: dict[Shape, Shape] = {}
        # An input, like `now`: the shell sets it for a batch of SYNs that found the queue
        # longer than the proxy keeps up with. Then a SYN is answered only if it repeats
        # one shed earlier (a retransmission); others are shed and remembered (RetryMemory).
        self.overloaded = False
        self.retries = RetryMemory()
        # The SYN-ACKs waiting for their first, second ... resend (see RESEND_SLOTS), and how
        # many more may be kept until _resend_second_ends.
        self._resends = [ResendRing(self.RESEND_SLOTS) for _ in range(config.synack_retries)]
        self._resend_budget = 0
        self._resend_second_ends = float("-inf")
        # Resends still allowed until _allowance_second_ends (see RESEND_FLOOR).
        self._resend_allowance = 0
        self._allowance_second_ends = float("-inf")
        self._validated_before = 0  # stats.ack_valid when the allowance was last set
        # Client packets left in the kernel's queue until their server handshake completes
        # (Hold), and the token the next one gets.
        self.held_packets = 0
        self._hold_token = 0
        # IPv6 headers are 20 bytes longer: the same link gives a 20 bytes smaller MSS.
        d = config.default_profile
        self._default_v6 = replace(d, mss=d.mss - 20)

    @property
    def pending(self) -> int:
        """Connections whose cookie validated and whose server handshake is in flight."""
        return self.limits.pending

    @property
    def established(self) -> int:
        return self.limits.established

    # ------------------------------------------------------------ entry points

    def classify(self, pkt: Packet) -> Direction | None:
        """Direction of a queued packet, from the protected ports."""
        if pkt.dport in self.config.ports:
            return Direction.FROM_CLIENT
        if pkt.sport in self.config.ports:
            return Direction.FROM_SERVER
        return None

    def handle_raw(self, data: bytes, now: float) -> list[Action]:
        """Parse, classify and handle one queued packet; bad packets are counted and dropped.

        With `fast_paths` (the default) a packet whose headers P.peek can read
        goes through `_handle_peeked`: the same actions and counts, less work.
        While `overloaded`, a SYN seen for the first time is shed before all that.
        """
        head = P.peek(data) if self.fast_paths or self.overloaded else None
        # Overloaded: a pure SYN to a protected port is shed first thing (shedding must cost
        # far less than answering) unless its addresses, ports and ISN repeat a shed one.
        if (self.overloaded and head is not None and head[7] & _SYN_KIND == SYN
                and head[4] in self.config.ports):
            if not self.retries.answer(head[1:6], now):  # (src, dst, sport, dport, seq)
                self.stats.syn_received += 1
                self.stats.shed["overload"] += 1
                return [_SHED_OVERLOAD]
            self.stats.retries_answered += 1
        if self.fast_paths:
            if head is not None:
                out = self._handle_peeked(data, head, now)
                if out is not None:
                    return out
        if head is None:
            too_big = P.parse_too_big(data)
            if too_big is not None:
                return self._too_big(data, too_big)
        try:
            pkt = P.parse(data)
        except PacketError as err:
            return self._malformed(err)
        direction = self.classify(pkt)
        if direction is None:
            self.stats.dropped["not_protected"] += 1
            return [Accept()]
        return self.handle(pkt, direction, now)

    def _handle_peeked(self, data: bytes, head: P.Peeked, now: float) -> list[Action] | None:
        """`handle_raw` for a packet P.peek read (no IP options or extension headers, unfragmented).

        The flood fast path: a SYN without payload, or an ACK, to a protected port
        on a tuple without state is answered from the peeked fields and what
        P.scan_options reads, without a Packet, at well under half the general
        path's cost, which bounds how many SYNs per second one core can answer.
        A SYN is answered by `_synack_for` on either path (only how its options
        are read differs); for ACKs `_validate` remains the reference.
        tests/test_synpath.py checks that both paths give the same bytes and counts.

        Everything else (state on the tuple, a SYN with data such as TCP Fast
        Open, malformed options, other flags, the server's packets) gets its
        Packet from P.from_peeked (parse() without reading the headers again) and
        the general handling. None for a packet to neither port: the caller parses it.
        """
        family, src, dst, sport, dport, seq, ack, flags, opt_start, opt_end = head
        ports = self.config.ports
        if dport in ports:
            key = conn_key(family, src, dst, sport, dport)
            conn = self.conns.get(key)
            if conn is None:
                kind = flags & _SYN_KIND
                if kind == SYN:
                    opts = P.scan_options(data, opt_start, opt_end) if opt_end == len(data) else None
                    if opts is not None:
                        return self._synack_for(
                            family, src, dst, sport, dport, seq, opts, flags & _ECN_SETUP == _ECN_SETUP, now
                        )
                elif (kind == ACK or kind == ACK | FIN) and P.scan_options(data, opt_start, opt_end) is not None:
                    client_isn = (seq - 1) & U32
                    match = self.cookies.check(family, src, dst, sport, dport, client_isn, (ack - 1) & U32, now)
                    if match is None:
                        self.stats.ack_invalid["cookie"] += 1
                        return [_COOKIE_INVALID]
                    return self._cookie_valid(P.from_peeked(data, head), key, None, client_isn, match, now)
            try:
                pkt = P.from_peeked(data, head)
            except PacketError as err:
                return self._malformed(err)
            return self._client_packet(pkt, key, conn, now)
        if sport in ports:
            try:
                pkt = P.from_peeked(data, head)
            except PacketError as err:
                return self._malformed(err)
            key = conn_key(family, dst, src, dport, sport)
            return self._server_packet(pkt, key, self.conns.get(key), now)
        return None

    def _too_big(self, data: bytes, tb: P.TooBig) -> list[Action]:
        """An ICMP "fragmentation needed" / "packet too big" about a server's segment: it quotes
        the sequence number the client saw, which the server's TCP takes for one it never sent
        and ignores (so the path MTU toward the client is never learnt and large segments are
        lost for good). It passes with the server's own number put back."""
        stats = self.stats.icmp_too_big
        if tb.sport not in self.config.ports:
            stats["not_proxied"] += 1
            return [Accept()]
        conn = self.conns.get(conn_key(tb.family, tb.dst, tb.src, tb.dport, tb.sport))
        if conn is None or type(conn) is PendingConn:
            stats["not_held"] += 1
            return [_PASS_ON]
        stats["translated"] += 1
        return [Accept(P.rewrite_too_big(data, tb, tb.seq - conn.offsets))]

    def _malformed(self, err: PacketError) -> list[Action]:
        self.stats.malformed[err.reason] += 1
        return [Drop("malformed")]

    def _synack_for(
        self, family: int, src: bytes, dst: bytes, sport: int, dport: int, seq: int,
        opts: P.SynOptions, ecn: bool, now: float,
    ) -> list[Action]:
        """The answer to a SYN, from its fields: rate limit, cookie, SYN-ACK, no state.
        `ecn`: the SYN asks for ECN (ECE and CWR).

        Both paths end here: the flood fast path with what P.scan_options read, and
        `_answer_syn` with a parsed Packet's options (a SYN with data, say)."""
        mss, wscale, sack_ok, tsval = opts
        stats = self.stats
        stats.syn_received += 1
        if bad_source(family, src, dst):
            stats.dropped["bad_source"] += 1
            return [_BAD_SOURCE]
        limits = self.limits
        shed = limits.check_syn(limits.source_key(family, src), now)
        if shed is not None:
            stats.shed[shed.value] += 1
            return [_SHED_DROPS[shed]]
        skey: ServerKey = (family, dst, dport)
        plan = self._synack_plans.get(skey)
        if plan is None:
            plan = self._synack_plan(skey)
        window, our_mss, our_sack, our_ts, our_ecn = plan
        if not (our_sack and our_ts and our_ecn) and (
            (sack_ok and not our_sack) or (tsval is not None and not our_ts) or (ecn and not our_ecn)
        ) and self._retry_due(skey, now):
            our_sack = our_ts = our_ecn = True  # this client's handshake asks the server again
        sack = sack_ok and our_sack
        ecn = ecn and our_ecn
        cookies = self.cookies
        cookie = cookies.make_for_syn(family, src, dst, sport, dport, seq, mss, wscale, sack, ecn, now)
        if wscale is not None:
            wscale = self._wscale_for_slot(skey, cookies.slot(now))
        synack = P.build_synack(
            family, dst, src, dport, sport, cookie, seq + 1, window, our_mss, sack, wscale,
            self._ts_clock(now) if tsval is not None and our_ts else None, tsval or 0, ecn,
        )
        stats.synack_sent += 1
        if self._resends:
            self._keep_for_resend(synack, now)
        return [_SYN_ANSWERED, Send(family, src, synack, Direction.FROM_SERVER, "synack")]

    def _retry_due(self, skey: ServerKey, now: float) -> bool:
        """Whether to agree to options a server declined last time with this client: once
        per DECLINED_RETRY (the next try is due DECLINED_RETRY after this one)."""
        retry_at = self._retry_at.get(skey)
        if retry_at is not None and now < retry_at:
            return False
        self._retry_at[skey] = now + self.DECLINED_RETRY
        return True

    def _synack_plan(self, skey: ServerKey) -> SynAckPlan:
        """What a SYN-ACK takes from the server's profile, cached until it changes
        (learn_profile). The cache is bounded: SYNs may name any server address."""
        prof = self.profile(*skey)
        plan = (min(prof.window, MAX_WINDOW_FIELD), self._advertised_mss(prof), prof.sack_ok, prof.ts_ok, prof.ecn_ok)
        if len(self._synack_plans) >= 4096:
            self.stats.evicted["synack_plans"] += len(self._synack_plans)
            self._synack_plans.clear()
        self._synack_plans[skey] = plan
        return plan

    def handle(self, pkt: Packet, direction: Direction, now: float) -> list[Action]:
        """Handle one packet; the first action is always its verdict."""
        if direction is Direction.FROM_CLIENT:
            key = conn_key(pkt.family, pkt.src, pkt.dst, pkt.sport, pkt.dport)
            return self._client_packet(pkt, key, self.conns.get(key), now)
        key = conn_key(pkt.family, pkt.dst, pkt.src, pkt.dport, pkt.sport)
        return self._server_packet(pkt, key, self.conns.get(key), now)

    def _client_packet(self, pkt: Packet, key: ConnKey, conn: Conn | None, now: float) -> list[Action]:
        """A client's packet and the state of its tuple, if any."""
        if pkt.flags & SYN and pkt.flags & (FIN | RST):
            self.stats.dropped["bad_flags"] += 1
            return [_SYN_WITH_FIN_OR_RST]
        if conn is None:
            return self._from_client_stateless(pkt, key, None, now)
        if isinstance(conn, ClosingConn | ResetConn) and pkt.flags & (SYN | ACK | RST) in (SYN, ACK):
            # Perhaps a new connection on the same tuple right after the old one.
            return self._from_client_stateless(pkt, key, conn, now)
        return self._from_client(pkt, key, conn, now)

    def _server_packet(self, pkt: Packet, key: ConnKey, conn: Conn | None, now: float) -> list[Action]:
        """A server's packet and the state of its tuple, if any."""
        if conn is None:
            return self._from_server_stateless(pkt)
        return self._from_server(pkt, key, conn, now)

    SWEEP_BATCH = 2000  # established connections looked at per sweep step
    # A client's RST the server may not have taken: the server is probed this long after it
    # (its own answer, a challenge ACK or nothing, comes within a round trip; Linux answers
    # an out-of-window segment at most every 500 ms), up to RESET_PROBES times this far apart;
    # no answer to any of them counts as the socket being gone.
    RESET_PROBE_DELAY = 1.0
    RESET_PROBES = 2
    # A server that declined SACK, timestamps or ECN is offered them again this long after, by
    # agreeing them with the next client that offers one: if it still declines, that one
    # connection goes without (harmless for SACK and timestamps, which each side then ignores;
    # for ECN see Shape.ecn_unechoed).
    DECLINED_RETRY = 60.0
    # An unanswered SYN-ACK is sent again (see synproxy/resend.py), from a ring of the last
    # RESEND_SLOTS per retry (96 bytes each, allocated once): more than RESEND_SLOTS SYNs in a
    # second are a flood, which empties the rings, so a flood gets none resent and the proxy's
    # reflection stays one SYN-ACK per SYN.
    RESEND_SLOTS = 4096
    # Resends a second: RESEND_FLOOR plus twice the ACKs validated in the second before. A server's
    # clients answer nearly every SYN-ACK, so their few lost ACKs fit; a spoofed trickle below
    # RESEND_SLOTS a second, whose SYN-ACKs nobody answers, gets no more resends than that, so it
    # cannot make the proxy reflect three SYN-ACKs per SYN.
    RESEND_FLOOR = 64
    RESEND_FIRST = 1.0  # seconds; each later resend waits twice as long as the one before

    def next_deadline(self) -> float | None:
        """When `handle_timer` should next be called (None: no timers)."""
        at = self._timers[0][0] if self._timers else None
        for ring in self._resends:
            due = ring.next_due()
            if due is not None and (at is None or due < at):
                at = due
        if self.limits.established or self._sweep_keys:
            at = self._sweep_at if at is None else min(at, self._sweep_at)
        forget = self.retries.forget_at  # the overload's memory, freed when it is too old
        if forget is not None:
            at = forget if at is None else min(at, forget)
        return at

    def handle_timer(self, now: float) -> list[Action]:
        """Run every timer due at `now`: SYN-ACK and SYN resends, give-ups, idle and linger expiry,
        and freeing the overload's memory of shed SYNs once it is too old to matter."""
        out: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, key = heapq.heappop(timers)
            conn = self.conns.get(key)
            if not isinstance(conn, PendingConn | ClosingConn | ResetConn) or conn.deadline != at:
                continue  # stale entry: the connection is gone, moved on or re-armed
            out.extend(self._expire(key, conn, now))
        if self._resends:
            self._resend_synacks(now, out)
        if now >= self._sweep_at and (self.limits.established or self._sweep_keys):
            self._sweep(now, out)
        self.retries.forget_old(now)
        return out

    def reset_all(self) -> list[Action]:
        """End every connection the proxy holds with a RST to each end, and forget it: what a
        clean stop does. The state goes with the process, so none of them could go on; unreset,
        each client would learn only when its next write timed out (about 15 minutes for
        Linux), and each server when it wrote. Ends after a FIN both ways or a RST (lingering
        for retransmissions) get none. Held segments get their drop verdicts (Release)."""
        out: list[Action] = []
        for key, conn in list(self.conns.items()):
            if type(conn) is PendingConn:
                out.append(_reset_server(key, conn.handshake.client_isn + 1))
                out.extend(self._reset_client(key, conn, "shutdown"))
                continue
            if type(conn) is not ClosingConn:  # established, or asking the server about a RST
                out.extend(_reset_both_ends(key, conn))
            self._remove(key, conn, "shutdown")
        return out

    def _keep_for_resend(self, synack: bytes, now: float) -> None:
        """Keep a SYN-ACK for its first resend, unless this second has seen more SYNs than a
        ring holds: a flood, whose SYN-ACKs would be overwritten before they are due anyway.
        Then the rings are emptied and nothing more is kept until the second ends."""
        if now >= self._resend_second_ends:
            self._resend_second_ends = now + 1.0
            self._resend_budget = self.RESEND_SLOTS
        if self._resend_budget:
            self._resend_budget -= 1
            self._resends[0].push(now + self.RESEND_FIRST, synack)
            if not self._resend_budget:
                for ring in self._resends:
                    ring.clear()

    def _resend_synacks(self, now: float, out: list[Action]) -> None:
        """Send again each due SYN-ACK whose client has not answered (no state for its tuple
        here), within the SYN-ACK rate limits, and keep it for the next retry."""
        rings = self._resends
        limits = self.limits
        if now >= self._allowance_second_ends:
            validated = self.stats.ack_valid
            self._resend_allowance = self.RESEND_FLOOR + 2 * (validated - self._validated_before)
            self._validated_before = validated
            self._allowance_second_ends = now + 1.0
        for retry, ring in enumerate(rings):
            later = rings[retry + 1] if retry + 1 < len(rings) else None
            due = ring.next_due()
            while due is not None and due <= now:
                synack = ring.pop()
                due = ring.next_due()
                family, server, client, sport, cport = P.peek(synack)[:5]  # type: ignore[index]  # built here: plain
                if conn_key(family, client, server, cport, sport) in self.conns:
                    continue  # answered (or answered and already closed again here)
                if self._resend_allowance <= 0:
                    self.stats.synack_resends_skipped += 1
                    continue  # more unanswered SYN-ACKs than the validated ACKs explain
                if limits.check_syn(limits.source_key(family, client), now) is not None:
                    continue  # the rate limits and caps count resends like first answers
                self._resend_allowance -= 1
                self.stats.synack_resent += 1
                out.append(Send(family, client, synack, Direction.FROM_SERVER, "synack_resend"))
                if later is not None:
                    later.push(now + self.RESEND_FIRST * 2 ** (retry + 1), synack)

    def _sweep(self, now: float, out: list[Action]) -> None:
        """Expire idle established connections, a batch at a time.

        Without the proxy's state the connection cannot go on, so both ends get a RST at the
        sequence number each last acknowledged, which each takes exactly (RFC 5961). The
        server would otherwise keep its socket until it writes to it: one waiting for its
        client, or opened by a forged cookie, whose client does not exist. The client would
        learn only when it writes, and then after its retransmissions time out (15 minutes
        for Linux): the proxy drops its segments, having no state for them."""
        if not self._sweep_keys:
            self._sweep_keys = list(self.conns)
        batch = self._sweep_keys[-self.SWEEP_BATCH :]
        del self._sweep_keys[-self.SWEEP_BATCH :]
        idle = self.config.idle_timeout
        tick = self._tick(now)
        for key in batch:
            conn = self.conns.get(key)
            if conn is not None and conn.state is State.ESTABLISHED and (tick - conn.seen) & TICK_MASK > IDLE_TICKS:
                self.limits.closed(self._source(key), was_pending=False)
                self.stats.closed["idle"] += 1
                del self.conns[key]
                out.extend(_reset_both_ends(key, conn))
        # A whole pass takes at most a tenth of the idle timeout (or a minute).
        passes = max(1, len(self.conns) // self.SWEEP_BATCH)
        self._sweep_at = now + (0.0 if self._sweep_keys else min(idle / 10, 60.0)) + min(1.0, 1.0 / passes)

    def _tick(self, now: float) -> int:
        """The idle tick of `now` (see IDLE_TICKS)."""
        return int(now * self._ticks_per_second) & TICK_MASK

    def _source(self, key: ConnKey) -> bytes:
        """The limits' source key of a connection: its client address's prefix."""
        if len(key) == 12:
            return self.limits.source_key(4, key[:4])
        return self.limits.source_key(6, key[:16])

    def _shape(self, shape: Shape) -> Shape:
        """The shared instance equal to `shape`."""
        got = self._shapes.get(shape)
        if got is None:
            if len(self._shapes) >= 4096:  # bounded: a few dozen in practice
                self.stats.evicted["shapes"] += len(self._shapes)
                self._shapes.clear()
            got = self._shapes[shape] = shape
        return got

    def learn_profile(self, family: int, server: bytes, port: int, profile: BackendProfile) -> None:
        """Record what a server announces (from a probe or an observed SYN-ACK)."""
        if len(self._profiles) > 4096 and (family, server, port) not in self._profiles:
            self.stats.evicted["profiles"] += len(self._profiles)
            self._profiles.clear()  # bounded; only validated handshakes ever add entries
            self._synack_plans.clear()
            self._retry_at.clear()
        self._profiles[(family, server, port)] = profile
        self._synack_plans.pop((family, server, port), None)

    def profile(self, family: int, server: bytes, port: int) -> BackendProfile:
        """What the server announced last, or the default until it has been seen."""
        prof = self._profiles.get((family, server, port))
        if prof is not None:
            return prof
        return self.config.default_profile if family == 4 else self._default_v6

    # ------------------------------------------------------------ helpers

    def _set_timer(self, key: ConnKey, conn: PendingConn | ClosingConn | ResetConn, at: float) -> None:
        conn.deadline = at
        heapq.heappush(self._timers, (at, key))

    def _ts_clock(self, now: float) -> int:
        return (int(now * 1000) + self.config.ts_base) & U32

    def _advertised_mss(self, prof: BackendProfile) -> int:
        mss = self.config.mss if self.config.mss is not None else prof.mss
        return min(mss, self.config.max_mss)

    def _wscale_for_slot(self, skey: ServerKey, slot: int) -> int:
        """The window scale the proxy tells clients of this server during a cookie slot.

        In auto mode it follows the server's latest choice, but is latched per slot
        so the ACK of any SYN-ACK can be matched to what its client was told.
        """
        if self.config.wscale is not None:
            return self.config.wscale
        table = self._advertised_wscale
        got = table.get((skey, slot))
        if got is None:
            prof_ws = self.profile(*skey).wscale
            got = 7 if prof_ws is None else prof_ws
            if len(table) > 1024:
                stale = [k for k in table if k[1] < slot - 1]
                self.stats.evicted["advertised_wscale"] += len(stale)
                for old in stale:
                    del table[old]
            table[(skey, slot)] = got
        return got

    # ------------------------------------------------------------ client side

    def _from_client_stateless(
        self, pkt: Packet, key: ConnKey, old: ClosingConn | ResetConn | None, now: float
    ) -> list[Action]:
        flags = pkt.flags
        if flags & (SYN | ACK | RST) == SYN:
            return self._answer_syn(pkt, now)
        if flags & RST or not flags & ACK or flags & SYN:
            self.stats.dropped["no_state"] += 1
            return [Drop("no_state")]
        return self._validate(pkt, key, old, now)

    def _answer_syn(self, pkt: Packet, now: float) -> list[Action]:
        """A SYN gets a SYN-ACK with a cookie ISN and no state at all (see `_synack_for`)."""
        o = pkt.options
        return self._synack_for(
            pkt.family, pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.seq,
            (o.mss, o.wscale, o.sack_ok, o.ts[0] if o.ts is not None else None),
            pkt.flags & _ECN_SETUP == _ECN_SETUP, now,
        )

    def _validate(self, pkt: Packet, key: ConnKey, old: ClosingConn | ResetConn | None, now: float) -> list[Action]:
        """An ACK (or data) without state must carry a cookie for exactly seq-1."""
        client_isn = (pkt.seq - 1) & U32
        match = self.cookies.check(
            pkt.family, pkt.src, pkt.dst, pkt.sport, pkt.dport, client_isn, (pkt.ack - 1) & U32, now
        )
        if match is None:
            if old is not None:  # a straggler of the closing connection
                return self._from_client(pkt, key, old, now)
            self.stats.ack_invalid["cookie"] += 1
            return [_COOKIE_INVALID]
        return self._cookie_valid(pkt, key, old, client_isn, match, now)

    def _cookie_valid(
        self, pkt: Packet, key: ConnKey, old: Conn | None, client_isn: int, match: CookieMatch, now: float
    ) -> list[Action]:
        c_opts, slot = match
        if old is not None:
            self._remove(key, old, "reused")
        self.stats.ack_valid += 1
        shed = self.limits.check_open(self.limits.source_key(pkt.family, pkt.src))
        if shed is not None:
            # The client believes it is connected: tell it at once that it is not.
            self.stats.shed[shed.value] += 1
            rst = P.build(pkt.family, pkt.dst, pkt.src, pkt.dport, pkt.sport, pkt.ack, 0, RST, 0)
            return [_SHED_DROPS[shed], Send(pkt.family, pkt.src, rst, Direction.FROM_SERVER, "rst")]
        return self._open_backend(pkt, key, client_isn, c_opts, slot, now)

    def _open_backend(
        self, pkt: Packet, key: ConnKey, client_isn: int, c_opts: CookieOptions, slot: int, now: float
    ) -> list[Action]:
        family, client, cport, server, sport = pkt.family, pkt.src, pkt.sport, pkt.dst, pkt.dport
        ts = pkt.options.ts
        wscale_ok = c_opts.wscale is not None  # window scaling was negotiated with the client
        client_send_shift = client_recv_shift = 0
        if c_opts.wscale is not None:
            client_send_shift = c_opts.wscale
            client_recv_shift = self._wscale_for_slot((family, server, sport), slot)
        syn_opts = TcpOptions(
            mss=min(c_opts.mss, self.config.max_mss),
            wscale=c_opts.wscale,
            sack_ok=c_opts.sack_ok,
            ts=(ts[0], 0) if ts is not None else None,
        )
        syn_window = min(pkt.window << client_send_shift, MAX_WINDOW_FIELD)
        syn_flags = SYN | _ECN_SETUP if c_opts.ecn else SYN
        syn = P.build(family, client, server, cport, sport, client_isn, 0, syn_flags, syn_window, syn_opts)
        conn = PendingConn(
            shape=self._shape(Shape(ts is not None, client_send_shift, 0, 0, client_recv_shift)),
            seen=self._tick(now),
            handshake=Handshake(
                client_isn=client_isn,
                cookie=(pkt.ack - 1) & U32,
                syn=syn,
                gives_up_at=now + self.config.backend_timeout,
                wscale_ok=wscale_ok,
                sack_ok=c_opts.sack_ok,
                proxy_tsval=ts[1] if ts is not None else 0,
                client_tsval=ts[0] if ts is not None else 0,
                client_window=pkt.window,
                ecn=c_opts.ecn,
                held_next=(client_isn + 1) & U32,
            ),
        )
        self.conns[key] = conn
        self.limits.opened(self.limits.source_key(family, client))
        self._set_timer(key, conn, min(now + self.config.syn_retry_interval, conn.handshake.gives_up_at))
        return [self._hold(conn, pkt, _VALIDATED), Send(family, server, syn, Direction.FROM_CLIENT, "syn")]

    # Held packets wait in the kernel's queue (Hold), whose traffic queue holds 8192 by default:
    # at most an eighth of it is given to them, so clients that send data at once cannot fill
    # it for established connections. Beyond, data is dropped and the client sends it again.
    MAX_HELD_PACKETS = 1024
    # And per connection, so one client sending tiny segments cannot take them all (a TCP's
    # initial window is 10 segments; 64 KiB of full-sized ones are 45).
    MAX_HELD_PER_CONNECTION = 64

    def _hold(self, conn: PendingConn, pkt: Packet, nothing_to_hold: Drop) -> Hold | Drop:
        """Keep client data that arrives before the server is connected (bounded), in the
        kernel's queue: its verdict comes when the server answers (see `Hold`)."""
        hs = conn.handshake
        if pkt.flags & ACK:
            hs.client_window = pkt.window
            if pkt.options.ts is not None:
                hs.client_tsval = pkt.options.ts[0]
        if not pkt.payload_len and not pkt.flags & FIN:
            return nothing_to_hold
        end = (pkt.seq + pkt.seg_len) & U32
        why = None
        if not seq_after(end, hs.held_next):
            why = "held_duplicate"  # nothing new: a retransmission of what is held
        elif seq_after(pkt.seq, hs.held_next):
            why = "held_gap"  # an earlier segment is missing; the client retransmits both
        elif (hs.held_bytes + pkt.payload_len > self.config.pending_buffer_bytes
              or len(hs.held) >= self.MAX_HELD_PER_CONNECTION):
            why = "held_overflow"  # the client retransmits it after the handshake
        elif self.held_packets >= self.MAX_HELD_PACKETS:
            why = "held_limit"  # likewise
        if why is not None:
            self.stats.dropped[why] += 1
            return Drop(why)
        self._hold_token = token = (self._hold_token + 1) & _LOW64
        hs.held.append((token, pkt.raw))
        self.held_packets += 1
        hs.held_bytes += pkt.payload_len
        hs.held_next = end
        return Hold(token)

    def _take_held(self, hs: Handshake) -> list[tuple[int, bytes]]:
        """What a pending connection held, no longer counted as held (its verdicts follow)."""
        held, hs.held = hs.held, []
        self.held_packets -= len(held)
        return held

    def _discard_held(self, hs: Handshake) -> list[Action]:
        """Drop verdicts for what a pending connection held: it ended before the server answered."""
        return [Release(token, _HELD_DISCARDED) for token, _ in self._take_held(hs)]

    def _from_client(self, pkt: Packet, key: ConnKey, conn: Conn, now: float) -> list[Action]:
        conn.seen = self._tick(now)
        if isinstance(conn, PendingConn):
            if pkt.flags & RST:
                # The client can send no further than the SYN-ACK's (unscaled) window.
                if (pkt.seq - conn.handshake.client_isn - 1) & U32 > MAX_WINDOW_FIELD:
                    self.stats.client_resets["out_of_window"] += 1
                    return [_RST_OUT_OF_WINDOW]
                return self._abort_pending(key, conn, "client_rst")
            if pkt.flags & SYN:
                return self._answer_syn(pkt, now) if not pkt.flags & ACK else [Drop("no_state")]
            return [self._hold(conn, pkt, _PENDING_ACK)]
        if pkt.flags & SYN:
            # A new SYN on a live tuple: answer it statelessly; its ACK replaces
            # the old state only if the old connection is closing.
            if pkt.flags & ACK:
                self.stats.dropped["unexpected_synack"] += 1
                return [Drop("unexpected_synack")]
            return self._answer_syn(pkt, now)
        if pkt.flags & (RST | FIN) and not isinstance(conn, ClosingConn):
            if pkt.flags & RST:
                verdict = self._client_rst(pkt, key, conn, now)
                if verdict is not None:
                    return [verdict]
                conn = self.conns[key]  # a ResetConn if the server must be asked
            elif self._fin_out_of_window(pkt, conn):
                self.stats.dropped["fin_out_of_window"] += 1
                return [_FIN_OUT_OF_WINDOW]
        shape, offsets = conn.shape, conn.offsets
        new_ack = None
        if pkt.flags & ACK:
            new_ack = (pkt.ack - offsets) & U32
            if seq_after(pkt.ack, offsets >> 112):  # later than the client's last ACK (server_next): keep it
                conn.offsets = offsets & _BELOW_SERVER_NEXT | pkt.ack << 112
        ts = pkt.options.ts
        window = pkt.window
        if shape.client_send_shift != shape.server_recv_shift:
            window = rescale_window(window, shape.client_send_shift, shape.server_recv_shift)
        out = P.rewrite(
            pkt,
            ack=new_ack,
            window=window,
            tsecr=(ts[1] + (offsets >> 32)) & U32 if ts is not None and shape.ts else None,
            sack_delta=-offsets & U32,
        )
        if shape.ecn_unechoed:
            codepoint = P.ip_ecn(out)
            if codepoint == P.ECN_CE:
                self.stats.dropped["ce_unechoed"] += 1
                return [_CE_UNECHOED]
            if codepoint != P.ECN_NOT_ECT:
                out = P.clear_ecn(out)
        if not pkt.flags & RST or not isinstance(conn, ResetConn):  # a RST that may not count closes nothing yet
            self._track_close(key, conn, pkt, Direction.FROM_CLIENT, now)
        self.stats.translated += 1
        return [Accept(out)]

    @staticmethod
    def _fin_out_of_window(pkt: Packet, conn: Conn) -> bool:
        """A client's FIN the server would not take: beyond its window, or older than what it
        acknowledged (unless it is the FIN it acknowledged last). Dropped, like such a RST: a
        spoofed one would otherwise end the state at the server's own FIN."""
        fin_end = (pkt.seq + pkt.payload_len + 1 - conn.client_next) & U32
        return fin_end > conn.server_window + 1

    def _client_rst(self, pkt: Packet, key: ConnKey, conn: Conn, now: float) -> Drop | None:
        """Judge a client's RST on an established connection as the server will (RFC 5961):
        at the sequence number it expects next, it closes (None: translate and close as
        ever); outside its window, the server ignores it, so it is dropped here; in the
        window but not at that number, the server answers with a challenge ACK, or takes it
        if its ACKs had not reached the proxy yet: it is passed on (None) and the connection
        becomes a ResetConn, whose probes ask the server which (`_probe_server`)."""
        offset = (pkt.seq - conn.client_next) & U32
        if offset == 0:
            self.stats.client_resets["exact"] += 1
            if isinstance(conn, ResetConn):  # e.g. the client's answer to a challenge ACK
                self._reinstate(key, conn)
            return None
        if offset > conn.server_window:
            self.stats.client_resets["out_of_window"] += 1
            return _RST_OUT_OF_WINDOW
        self.stats.client_resets["in_window"] += 1
        if not isinstance(conn, ResetConn):
            self.conns[key] = reset = ResetConn(conn.shape, conn.seen, conn.offsets)
            self._set_timer(key, reset, now + self.RESET_PROBE_DELAY)
        return None

    def _probe_server(self, key: ConnKey, conn: ResetConn, now: float) -> list[Action]:
        """Ask the server whether it still has the connection: an ACK below the window it
        announced (as a keepalive probe) gets a duplicate ACK from a live socket (which
        revives the connection in `_from_server`) and a RST where there is none."""
        if conn.probes >= self.RESET_PROBES:  # no answer: the socket is gone, or the server
            self.stats.client_resets["unanswered"] += 1
            self._remove(key, conn, "rst")
            return []
        conn.probes += 1
        family, client, cport, server, sport = split_key(key)
        window = MAX_WINDOW_FIELD >> conn.shape.server_recv_shift
        probe = P.build(family, client, server, cport, sport, (conn.client_next - 1) & U32, 0, ACK, window)
        self._set_timer(key, conn, now + self.RESET_PROBE_DELAY)
        return [Send(family, server, probe, Direction.FROM_CLIENT, "probe")]

    # ------------------------------------------------------------ server side

    def _from_server_stateless(self, pkt: Packet) -> list[Action]:
        self.stats.dropped["server_no_state"] += 1
        if pkt.flags & RST:
            return [Drop("server_no_state")]
        # An orphan on the server (the proxy lost or expired its state): reset it
        # so the server frees the socket rather than retransmitting for minutes.
        rst = P.build(pkt.family, pkt.dst, pkt.src, pkt.dport, pkt.sport, pkt.ack, 0, RST, 0)
        return [Drop("server_no_state"), Send(pkt.family, pkt.src, rst, Direction.FROM_CLIENT, "rst")]

    def _from_server(self, pkt: Packet, key: ConnKey, conn: Conn, now: float) -> list[Action]:
        conn.seen = self._tick(now)
        flags = pkt.flags
        kind = type(conn)  # one look for the phases other than established (the common case)
        if kind is PendingConn:
            hs = conn.handshake
            if flags & (SYN | ACK) == SYN | ACK and pkt.ack == (hs.client_isn + 1) & U32:
                return self._server_synack(pkt, key, conn, hs, now)
            if flags & RST and pkt.ack == (hs.client_isn + 1) & U32:
                self.stats.backend_handshakes["refused"] += 1
                return [Drop("server_refused"), *self._reset_client(key, conn, "refused")]
            return [Drop("pending_unexpected")]
        if flags & SYN:
            if flags & ACK:
                # Our ACK to the server was lost: send it again.
                return [Drop("synack_retransmit"), self._ack_to_server(key, conn, pkt)]
            return [Drop("unexpected_syn")]
        if kind is ResetConn:
            verdict = self._server_after_reset(pkt, key, conn)
            if verdict is not None:
                return [verdict]
            conn = self.conns[key]
        ts = pkt.options.ts
        window = pkt.window
        shape, offsets = conn.shape, conn.offsets
        if flags & ACK:  # where the server now takes a client's RST (see _client_rst)
            conn.offsets = offsets & _WITHOUT_SERVER_ACK | pkt.ack << 64 | window << 96
        if shape.server_send_shift != shape.client_recv_shift:
            window = rescale_window(window, shape.server_send_shift, shape.client_recv_shift)
        out = P.rewrite(
            pkt,
            seq=(pkt.seq + offsets) & U32,
            window=window,
            tsval=(ts[0] - (offsets >> 32)) & U32 if ts is not None and shape.ts else None,
        )
        self._track_close(key, conn, pkt, Direction.FROM_SERVER, now)
        self.stats.translated += 1
        return [Accept(out)]

    def _server_after_reset(self, pkt: Packet, key: ConnKey, conn: ResetConn) -> Drop | None:
        """A server's packet after a client's RST it may not have taken. Its RST says the
        socket is gone (translated and closed as ever: None). Anything else once a probe went
        out says it is there: the connection is established again, and an empty ACK, the
        probe's answer, is dropped. Before the first probe it proves nothing (it may have left
        before the RST arrived) and is passed on; so is the challenge ACK, which a client that
        did reset answers with a RST at the exact number."""
        if pkt.flags & RST or not conn.probes:
            if pkt.flags & RST:
                self.stats.client_resets["confirmed"] += 1
                self._reinstate(key, conn)  # closed by _track_close
            return None
        self.stats.client_resets["refuted"] += 1
        self._reinstate(key, conn)
        if not pkt.payload_len and not pkt.flags & (FIN | SYN):
            return _PROBE_ANSWERED
        return None

    def _reinstate(self, key: ConnKey, conn: ResetConn) -> None:
        """Make a ResetConn a plain established connection again (its timer entry goes stale)."""
        self.conns[key] = Conn(conn.shape, conn.seen, conn.offsets)

    def _server_synack(
        self, pkt: Packet, key: ConnKey, pending: PendingConn, hs: Handshake, now: float
    ) -> list[Action]:
        """The server accepted: finish its handshake and switch to translation."""
        family, client, cport, server, sport = split_key(key)
        opts = pkt.options
        shape = pending.shape
        offered_ts = shape.ts
        seq_offset, ts_offset = (hs.cookie - pkt.seq) & U32, 0
        server_recv_shift = server_send_shift = 0  # scaling off toward the server unless:
        if hs.wscale_ok and opts.wscale is not None:  # the server took the client's window scale
            server_recv_shift, server_send_shift = shape.client_send_shift, min(opts.wscale, 14)
        if offered_ts and opts.ts is not None:
            ts_offset = (opts.ts[0] - hs.proxy_tsval) & U32  # server clock - proxy clock
        # (if the server declined timestamps, there is nothing to translate)
        prev = self.profile(family, server, sport)
        server_ecn = prev.ecn_ok
        if hs.ecn:  # an ECN-setup SYN-ACK has ECE without CWR (RFC 3168 6.1.1)
            server_ecn = pkt.flags & _ECN_SETUP == ECE
            self.stats.ecn["negotiated" if server_ecn else "refused"] += 1
        if (not server_ecn and hs.ecn or hs.sack_ok and not opts.sack_ok
                or offered_ts and opts.ts is None):  # declined: offered again DECLINED_RETRY from now
            self._retry_at[(family, server, sport)] = now + self.DECLINED_RETRY
        shape = self._shape(replace(
            shape, ts=offered_ts and opts.ts is not None,
            server_recv_shift=server_recv_shift, server_send_shift=server_send_shift,
            ecn_unechoed=hs.ecn and not server_ecn,
        ))
        self.conns[key] = conn = Conn(
            shape, pending.seen,
            seq_offset | ts_offset << 32 | pkt.ack << 64 | (pkt.window >> server_send_shift) << 96
            | ((hs.cookie + 1) & U32) << 112,  # the client's ACK of the SYN-ACK
        )
        # A SYN-ACK answers only what the SYN offered: learn just those options.
        self.learn_profile(
            family, server, sport,
            BackendProfile(
                mss=opts.mss or (536 if family == 4 else 1220),
                wscale=opts.wscale if hs.wscale_ok else prev.wscale,
                sack_ok=opts.sack_ok if hs.sack_ok else prev.sack_ok,
                ts_ok=opts.ts is not None if offered_ts else prev.ts_ok,
                window=pkt.window,
                ecn_ok=server_ecn,
            ),
        )
        self.limits.promoted(self.limits.source_key(family, client))
        self.stats.backend_handshakes["established"] += 1
        if not self._sweep_keys and self._sweep_at < now:
            self._sweep_at = now + min(self.config.idle_timeout / 10, 60.0)
        out: list[Action] = [Drop("synack_stolen")]
        # Held data passes by verdict, each segment translated like every later one. The first
        # carries the ACK that completes the server's handshake, so no separate ACK goes: sent
        # by raw socket it could arrive after the data (see Hold), a stale duplicate.
        released: list[Action] = []
        for token, raw in self._take_held(hs):
            held = P.parse(raw)
            if not released and not held.flags & ACK:  # (a client's TCP always sets it)
                out.append(self._ack_to_server(key, conn, pkt, hs))
            verdict = self._from_client(held, key, conn, now)[0]
            released.append(Release(token, verdict if isinstance(verdict, Accept | Drop) else _HELD_DISCARDED))
        if not released:
            out.append(self._ack_to_server(key, conn, pkt, hs))
        out.extend(released)
        # Tell the client the server's real window, in the scale the client uses.
        window = rescale_window(pkt.window, 0, shape.client_recv_shift)  # a SYN-ACK's window is unscaled
        upd_opts = None
        if shape.ts and opts.ts is not None:
            upd_opts = TcpOptions(ts=((opts.ts[0] - ts_offset) & U32, hs.client_tsval))
        update = P.build(
            family, server, client, sport, cport,
            (hs.cookie + 1) & U32, (hs.client_isn + 1) & U32, ACK, window, upd_opts,
        )
        out.append(Send(family, client, update, Direction.FROM_SERVER, "window_update"))
        return out

    def _ack_to_server(self, key: ConnKey, conn: Conn, synack: Packet, hs: Handshake | None = None) -> Send:
        family, client, cport, server, sport = split_key(key)
        shape = conn.shape
        if hs is not None:
            window = rescale_window(hs.client_window, shape.client_send_shift, shape.server_recv_shift)
        else:  # a resent ACK after the handshake: about 64 KiB, in the server's view
            window = MAX_WINDOW_FIELD >> shape.server_recv_shift
        opts = None
        if shape.ts and synack.options.ts is not None:
            tsval = hs.client_tsval if hs is not None else synack.options.ts[1]
            opts = TcpOptions(ts=(tsval, synack.options.ts[0]))
        ack = P.build(
            family, client, server, cport, sport,
            synack.ack, (synack.seq + 1) & U32, ACK, window, opts,
        )
        return Send(family, server, ack, Direction.FROM_CLIENT, "ack")

    # ------------------------------------------------------------ closing and timers

    def _track_close(self, key: ConnKey, conn: Conn, pkt: Packet, direction: Direction, now: float) -> None:
        flags = pkt.flags
        if flags & RST:
            self._closing(key, conn, now, "rst")
            return
        if flags & FIN:
            if direction is Direction.FROM_CLIENT:
                shape = replace(conn.shape, fin_from_client=True)
            else:
                shape = replace(conn.shape, fin_from_server=True)
            conn.shape = self._shape(shape)
            if shape.fin_from_client and shape.fin_from_server:
                self._closing(key, conn, now, "fin")

    def _closing(self, key: ConnKey, conn: Conn, now: float, why: str) -> None:
        if not isinstance(conn, ClosingConn):  # established until now
            self.limits.closed(self._source(key), was_pending=False)
            self.stats.closed[why] += 1
            self.conns[key] = conn = ClosingConn(conn.shape, conn.seen, conn.offsets)
        self._set_timer(key, conn, now + self.config.closing_linger)

    def _expire(self, key: ConnKey, conn: PendingConn | ClosingConn | ResetConn, now: float) -> list[Action]:
        if isinstance(conn, ClosingConn):
            self._forget(key)  # linger over
            return []
        if isinstance(conn, ResetConn):
            return self._probe_server(key, conn, now)
        hs = conn.handshake
        family, client, cport, server, sport = split_key(key)
        if now >= hs.gives_up_at:
            self.stats.backend_handshakes["timeout"] += 1
            # Clean the server's half-open socket too, in case only its SYN-ACK was lost.
            return [_reset_server(key, hs.client_isn + 1), *self._reset_client(key, conn, "timeout")]
        self._set_timer(key, conn, min(now + self.config.syn_retry_interval, hs.gives_up_at))
        return [Send(family, server, hs.syn, Direction.FROM_CLIENT, "syn")]

    def _reset_client(self, key: ConnKey, conn: PendingConn, why: str) -> list[Action]:
        """RST the client of a pending connection and free its state."""
        family, client, cport, server, sport = split_key(key)
        hs = conn.handshake
        rst = P.build(family, server, client, sport, cport, (hs.cookie + 1) & U32, hs.held_next, RST | ACK, 0)
        self._remove(key, conn, why)
        return [Send(family, client, rst, Direction.FROM_SERVER, "rst"), *self._discard_held(hs)]

    def _abort_pending(self, key: ConnKey, conn: PendingConn, why: str) -> list[Action]:
        self.stats.backend_handshakes["aborted"] += 1  # the client gave up first
        rst = _reset_server(key, conn.handshake.client_isn + 1)
        self._remove(key, conn, why)
        return [Drop(why), rst, *self._discard_held(conn.handshake)]

    def _remove(self, key: ConnKey, conn: Conn, why: str) -> None:
        if not isinstance(conn, ClosingConn):
            pending = isinstance(conn, PendingConn)
            self.limits.closed(self._source(key), was_pending=pending)
            if not pending:
                self.stats.closed[why] += 1
        self._forget(key)

    def _forget(self, key: ConnKey) -> None:
        self.conns.pop(key, None)
