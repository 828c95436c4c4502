"""Benchmark (not a test): an established download with and without a SYN flood running.

    sudo .venv/bin/python bench/download_flood.py [--size 30000000] [--runs 3]

For each defence, a fresh lab (local mode): the client downloads `size` bytes from the server
quietly, then again while hping3 floods the server at full speed (`--flood --rand-source`, bounded
by count and time) from another address. It prints the download times and their ratio, which is
what a SYN flood costs connections that are already open. The sha256 of every download is checked.
Timings are noisy on shared machines: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from flood import PORT, PY, setup

from synproxy.lab import Lab
from synproxy.peers import pattern_sha256


def download(lab: Lab, size: int) -> float:
    url = f"http://{lab.addr('server')}:{PORT}/bytes/{size}"
    out = lab.run("client", [PY, "-m", "synproxy.peers", "get", url, "--timeout", "120"], timeout=180).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if res["sha256"] != pattern_sha256(size):
        raise RuntimeError(f"download corrupted: {res}")
    return float(res["total_s"])


def measure(defence: str, size: int, runs: int) -> tuple[list[float], list[float]]:
    quiet, flooded = [], []
    with Lab(mode="local", clients=2) as lab, tempfile.TemporaryDirectory() as tmp:
        lab.popen("server", [PY, "-m", "synproxy.peers", "server", "--port", str(PORT)])
        time.sleep(0.5)
        setup(lab, defence, tmp)
        for _ in range(runs):
            quiet.append(download(lab, size))
            flood = lab.popen("client2", ["timeout", "30", "hping3", "-q", "-S", "-p", str(PORT), "--rand-source",
                                          "--flood", "-c", "5000000", lab.addr("server")])
            time.sleep(1)
            try:
                flooded.append(download(lab, size))
            finally:
                flood.terminate()
                flood.wait(10)
            time.sleep(1)
    return quiet, flooded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=30_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--defences", default="kernel SYNPROXY,synproxy 1")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/download_flood.py builds network namespaces: run it as root")
    print(f"{'defence':18s} {'quiet s (median)':>17s} {'flooded s (median)':>19s} {'ratio':>6s}")
    for defence in args.defences.split(","):
        print(f"  {defence} ...", file=sys.stderr, flush=True)
        quiet, flooded = measure(defence, args.size, args.runs)
        q, f = statistics.median(quiet), statistics.median(flooded)
        print(f"{defence:18s} {q:17.2f} {f:19.2f} {f / q:6.1f}")
    print(f"\n({args.size / 1e6:.0f} MB per download, {args.runs} runs each; flood: hping3 --flood --rand-source "
          "on the same 2-core machine)")


if __name__ == "__main__":
    main()
