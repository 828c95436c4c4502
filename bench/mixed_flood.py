"""Benchmark (not a test): new connections while downloads and a paced SYN flood share the proxy.

    sudo .venv/bin/python bench/mixed_flood.py [--pace u100,u50]   (hping3 -i; u100 is ~7,000 SYN/s)

One worker, a fresh lab (local mode) per pacing: hping3 floods for 12 s, another client downloads
20 MB again and again, and the legitimate client connects every 20 ms (3 s timeout). It prints the
connections that needed a SYN retransmission (>= 0.9 s), connect p99, the kernel's SYN-queue drops
and the download times: whether the traffic of open connections starves new ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flood import PORT, PY

from synproxy.daemon import READY_LINE
from synproxy.lab import Lab

SYNPROXY = str(Path(sys.executable).parent / "synproxy")
METRICS = "127.0.0.1:19999"


def syn_queue_drops(lab: Lab) -> float:
    out = lab.run("server", [PY, "-c", f"import urllib.request; print(urllib.request.urlopen("
                                       f"'http://{METRICS}/metrics').read().decode())"]).stdout
    return sum(float(line.split()[-1]) for line in out.splitlines()
               if line.startswith("synproxy_nfqueue_dropped") and 'queue="syn"' in line)


def measure(pace: str) -> str:
    with Lab(mode="local", clients=3) as lab, tempfile.TemporaryDirectory() as tmp:
        lab.popen("server", [PY, "-m", "synproxy.peers", "server", "--port", str(PORT)])
        time.sleep(0.5)
        log = Path(tmp) / "proxy.log"
        lab.popen("server", [SYNPROXY, "run", "--port", str(PORT), "--key-file", f"{tmp}/cookie.key",
                             "--metrics-addr", METRICS], stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while READY_LINE not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        drops0 = syn_queue_drops(lab)
        url = f"http://{lab.addr('server')}:{PORT}"
        flood = lab.popen("client2", ["timeout", "12", "hping3", "-q", "-S", "-p", str(PORT), "--rand-source",
                                      "-i", pace, "-c", "500000", lab.addr("server")])
        downloads = lab.popen("client3", ["bash", "-c", f"end=$((SECONDS+11)); while [ $SECONDS -lt $end ]; do "
                                                        f"{PY} -m synproxy.peers get {url}/bytes/20000000 --timeout 60; done"],
                              stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        out = lab.run("client", [PY, "-m", "synproxy.peers", "loop", url + "/", "--seconds", "10", "--interval", "0.02",
                                 "--timeout", "3"], timeout=60).stdout
        flood.wait(20)
        dl_out, _ = downloads.communicate(timeout=90)
        drops = syn_queue_drops(lab) - drops0
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    lat = sorted(r["connect_ms"] for r in results if r["ok"])
    slow = sum(1 for ms in lat if ms >= 900)
    times = sorted(json.loads(line)["total_s"] for line in dl_out.splitlines() if line.startswith("{"))
    return (f"{pace:>6s} {len(lat):>4d}/{len(results):<4d} {slow:>6d} {lat[int(len(lat) * 0.99)]:>9.1f} {drops:>10,.0f} "
            f"{len(times):>5d} {times[len(times) // 2]:>9.2f} {times[-1]:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pace", default="u100,u50", help="hping3 -i values, comma separated")
    print(f"{'pace':>6s} {'connected':>9s} {'>=0.9s':>6s} {'p99 ms':>9s} {'SYN drops':>10s} {'dls':>5s} "
          f"{'median s':>9s} {'max s':>7s}")
    for pace in ap.parse_args().pace.split(","):
        print(measure(pace), flush=True)


if __name__ == "__main__":
    main()
