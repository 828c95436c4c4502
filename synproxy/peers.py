"""Real client and server programs for the lab (end-to-end tests, demo, benchmark).

    python -m synproxy.peers server --port 8080 [--rcvbuf N] [--slow-read S]
    python -m synproxy.peers get URL [--expect-sha256 H]
    python -m synproxy.peers upload URL --size N
    python -m synproxy.peers many URL --count N [--concurrency C] [--timeout S]
    python -m synproxy.peers loop URL --seconds S [--interval I] [--timeout T]
    python -m synproxy.peers sink --port 9000
    python -m synproxy.peers synflood HOST PORT --prefix 198.18.77.0/24 --count N [--rate R] [--ack]
    python -m synproxy.peers chunks HOST PORT --chunks 3,5 [--gap S]

The server is an ordinary kernel-TCP HTTP server (the "legacy" one the proxy
protects): GET /bytes/N streams N deterministic bytes, POST /upload answers
with the sha256 and length of what it read, GET /whoami answers with the
client address the server sees. The sink server reads each connection to its
end and answers with exactly what arrived, for the byte-exact corner cases.
Clients print one JSON line with results.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import socket
import statistics
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHUNK = 65536


def stream_blocks(size: int):  # type: ignore[no-untyped-def]
    """`size` deterministic bytes (a hash chain) in pieces, so both ends can check content."""
    block = b"synproxy"
    buf = bytearray()
    sent = 0
    while sent < size:
        while len(buf) < CHUNK:
            block = hashlib.sha256(block).digest()
            buf += block * 64
        piece = bytes(buf[: min(CHUNK, size - sent)])
        del buf[: len(piece)]
        sent += len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for piece in stream_blocks(size):
        h.update(piece)
    return h.hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    slow_read = 0.0

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/whoami":
            body = json.dumps({"client": self.client_address[0], "port": self.client_address[1],
                               "tcp": tcp_info(self.connection)}).encode()
            self._reply(body)
        elif self.path.startswith("/bytes/"):
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            for piece in stream_blocks(size):
                self.wfile.write(piece)
        else:
            self._reply(b"synproxy lab server\n")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        got = 0
        while got < length:
            piece = self.rfile.read(min(CHUNK, length - got))
            if not piece:
                break
            h.update(piece)
            got += len(piece)
            if self.slow_read:
                time.sleep(self.slow_read)
        self._reply(json.dumps({"sha256": h.hexdigest(), "bytes": got}).encode())

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024
    rcvbuf = 0

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:  # set before listen so the window scale follows it
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        super().server_bind()


def serve(port: int, rcvbuf: int = 0, slow_read: float = 0.0) -> None:
    Handler.slow_read = slow_read
    DualStackServer.rcvbuf = rcvbuf
    srv = DualStackServer(("::", port), Handler)
    print(json.dumps({"listening": port}), flush=True)
    srv.serve_forever()


def tcp_info(sock: socket.socket) -> dict[str, object]:
    """What the kernel negotiated for a connection (struct tcp_info, linux/tcp.h)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    options, wscale = raw[5], raw[6]
    snd_mss, rcv_mss = struct.unpack_from("=II", raw, 16)
    return {
        "timestamps": bool(options & 1), "sack": bool(options & 2), "wscale_ok": bool(options & 4),
        "ecn": bool(options & 8), "ecn_seen": bool(options & 16),
        "snd_wscale": wscale & 0x0F, "rcv_wscale": wscale >> 4, "snd_mss": snd_mss, "rcv_mss": rcv_mss,
        "retransmits_total": struct.unpack_from("=I", raw, 100)[0],
    }


def sink(port: int) -> None:
    """Read each connection until the client's FIN; answer with what arrived.
    A connection whose data starts with b"RST!" is aborted with a RST instead."""
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(128)
    print(json.dumps({"listening": port}), flush=True)

    def handle(conn: socket.socket, addr: tuple[str, int]) -> None:
        data = bytearray()
        with conn:
            conn.settimeout(60)
            while True:
                piece = conn.recv(CHUNK)
                if not piece:
                    break
                data += piece
                if data.startswith(b"RST!"):  # asked to abort: close with a RST
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
            reply = {"client": addr[0], "bytes": len(data), "data": data[:65536].hex(), "tcp": tcp_info(conn)}
            conn.sendall(json.dumps(reply).encode())

    while True:
        conn, addr = srv.accept()
        threading.Thread(target=handle, args=(conn, addr), daemon=True).start()


# ---------------------------------------------------------------- clients


def chunks(host: str, port: int, sizes: list[int], gap: float, timeout: float) -> dict[str, object]:
    """Connect, send chunks of b'a', b'b', ... one segment each (TCP_NODELAY), close, read the reply."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    start = time.perf_counter()
    with socket.socket(fam, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, port))
        sent = b""
        for i, size in enumerate(sizes):
            piece = bytes([ord("a") + i % 26]) * size
            sock.sendall(piece)
            sent += piece
            if gap:
                time.sleep(gap)
        mine = tcp_info(sock)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            piece = sock.recv(CHUNK)
            if not piece:
                break
            reply += piece
    answer = json.loads(reply)
    got = bytes.fromhex(answer["data"])
    return {"sent": sent.decode(), "received": got.decode(errors="replace"), "ok": got == sent,
            "seconds": time.perf_counter() - start, "client_as_seen": answer["client"],
            "client_tcp": mine, "server_tcp": answer["tcp"]}


def _conn(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    return conn, parts.path or "/"


def get(url: str, timeout: float = 30.0, where: dict[str, object] | None = None) -> dict[str, object]:
    """One GET; returns status, size, sha256 and timings. `where` gets the step under way
    and the local port, for a caller that reports a failure."""
    where = {} if where is None else where
    start = time.perf_counter()
    conn, path = _conn(url, timeout)
    where["step"] = "connect"
    conn.connect()
    connected = time.perf_counter()
    where.update(step="response", port=conn.sock.getsockname()[1])
    conn.request("GET", path)
    resp = conn.getresponse()
    h = hashlib.sha256()
    size = 0
    head = b""
    while True:
        piece = resp.read(CHUNK)
        if not piece:
            break
        h.update(piece)
        size += len(piece)
        if len(head) < 4096:
            head += piece[: 4096 - len(head)]
    conn.close()
    end = time.perf_counter()
    return {
        "status": resp.status, "bytes": size, "sha256": h.hexdigest(),
        "connect_s": connected - start, "total_s": end - start,
        "body": head.decode(errors="replace") if size <= 4096 else None,
    }


def upload(url: str, size: int, timeout: float = 60.0) -> dict[str, object]:
    """POST `size` pattern bytes; the server answers with what it received."""
    start = time.perf_counter()
    conn, path = _conn(url, timeout)
    conn.putrequest("POST", path)
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    for piece in stream_blocks(size):
        conn.send(piece)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    return {
        "status": resp.status, "sent_sha256": pattern_sha256(size), "server": answer,
        "ok": answer.get("sha256") == pattern_sha256(size) and answer.get("bytes") == size,
        "total_s": time.perf_counter() - start,
    }


def many(url: str, count: int, concurrency: int, timeout: float) -> dict[str, object]:
    """`count` GETs, `concurrency` at a time; success counts and connect latencies."""
    def one(_: int) -> float | None:
        try:
            res = get(url, timeout)
            return float(res["connect_s"]) if res["status"] == 200 else None  # type: ignore[arg-type]
        except OSError:
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(count)))
    lat = sorted(r for r in results if r is not None)
    return {
        "count": count, "ok": len(lat), "failed": count - len(lat), "seconds": time.perf_counter() - start,
        "connect_p50_ms": statistics.median(lat) * 1000 if lat else None,
        "connect_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None,
    }


def loop(url: str, seconds: float, interval: float, timeout: float) -> None:
    """Start a GET every `interval` for `seconds` (each in its own thread, so a slow one
    never delays the next); print one JSON line per finished attempt, as it finishes."""
    lock = threading.Lock()

    def attempt(started: float) -> None:
        where: dict[str, object] = {}
        try:
            res = get(url, timeout, where)
            line = {"ok": res["status"] == 200, "connect_ms": float(res["connect_s"]) * 1000}  # type: ignore[arg-type]
        except OSError as e:  # which step failed, and the port to look for in a capture
            line = {"ok": False, "connect_ms": None, "error": f"{where.get('step', 'connect')}: {e}",
                    "port": where.get("port")}
        with lock:
            print(json.dumps({"t": started, **line}), flush=True)

    threads = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        t = threading.Thread(target=attempt, args=(time.monotonic() - start,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(interval)
    for t in threads:
        t.join(timeout + 1)


def synflood(host: str, port: int, prefix: str, count: int, rate: float, ack: bool) -> dict[str, object]:
    """Send `count` spoofed SYNs (or bare ACKs) from random addresses of `prefix`, at most `rate`/s.

    Bounded in count by construction and in time by the caller; used by the tests and the
    benchmark to flood from one subnet, which hping3 cannot.
    """
    import ipaddress
    import random

    from . import packet as P

    net = ipaddress.ip_network(prefix, strict=False)
    dst = P.addr_bytes(host)
    family = 6 if net.version == 6 else 4
    sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rnd = random.Random(7)
    flags = P.ACK if ack else P.SYN
    opts = P.TcpOptions(mss=1460, wscale=7, sack_ok=True, ts=(1, 0)) if not ack else None
    start = time.perf_counter()
    sent = 0
    addr = (host, 0) if family == 4 else (host, 0, 0, 0)
    for i in range(count):
        src = (int(net.network_address) + rnd.randrange(1, max(2, net.num_addresses - 1))).to_bytes(
            16 if family == 6 else 4, "big")
        pkt = P.build(family, src, dst, rnd.randrange(1024, 65535), port, rnd.getrandbits(32),
                      rnd.getrandbits(32) if ack else 0, flags, 64240, opts)
        try:
            sock.sendto(pkt, addr)
            sent += 1
        except OSError:
            pass
        if rate and i % 64 == 0:
            ahead = sent / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    return {"sent": sent, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synproxy.peers", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF before listen (shapes the window scale)")
    s.add_argument("--slow-read", type=float, default=0.0, help="sleep this long after each 64 KiB read")
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--timeout", type=float, default=30.0)
    u = sub.add_parser("upload")
    u.add_argument("url")
    u.add_argument("--size", type=int, required=True)
    u.add_argument("--timeout", type=float, default=60.0)
    m = sub.add_parser("many")
    m.add_argument("url")
    m.add_argument("--count", type=int, required=True)
    m.add_argument("--concurrency", type=int, default=1)
    m.add_argument("--timeout", type=float, default=5.0)
    fl = sub.add_parser("synflood")
    fl.add_argument("host")
    fl.add_argument("port", type=int)
    fl.add_argument("--prefix", required=True, help="spoof sources from this network")
    fl.add_argument("--count", type=int, required=True)
    fl.add_argument("--rate", type=float, default=0.0, help="packets per second (0: as fast as possible)")
    fl.add_argument("--ack", action="store_true", help="bare ACKs with random numbers instead of SYNs")
    lp = sub.add_parser("loop")
    lp.add_argument("url")
    lp.add_argument("--seconds", type=float, required=True)
    lp.add_argument("--interval", type=float, default=0.2)
    lp.add_argument("--timeout", type=float, default=3.0)
    k = sub.add_parser("sink")
    k.add_argument("--port", type=int, required=True)
    c = sub.add_parser("chunks")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--chunks", default="3,5", help="sizes of the segments, comma separated")
    c.add_argument("--gap", type=float, default=0.0, help="seconds between chunks")
    c.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    if args.cmd == "server":
        serve(args.port, args.rcvbuf, args.slow_read)
        return 0
    if args.cmd == "synflood":
        print(json.dumps(synflood(args.host, args.port, args.prefix, args.count, args.rate, args.ack)), flush=True)
        return 0
    if args.cmd == "loop":
        loop(args.url, args.seconds, args.interval, args.timeout)
        return 0
    if args.cmd == "sink":
        sink(args.port)
        return 0
    if args.cmd == "chunks":
        sizes = [int(x) for x in args.chunks.split(",")]
        print(json.dumps(chunks(args.host, args.port, sizes, args.gap, args.timeout)), flush=True)
        return 0
    if args.cmd == "get":
        res = get(args.url, args.timeout)
    elif args.cmd == "upload":
        res = upload(args.url, args.size, args.timeout)
    else:
        res = many(args.url, args.count, args.concurrency, args.timeout)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

