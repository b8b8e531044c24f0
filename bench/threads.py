"""Torch threads for the world build: 1 thread against all cores, on a quiet machine and with another
process keeping one core busy (the case of a shared machine). Each build runs in its own process.

    python bench/threads.py [--size small]

Prints the build time of each of the four runs and the slowdown that the busy core causes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

BUILD = """
import os, sys, time, torch
os.environ["REALIGN_QUIET"] = "1"
torch.set_num_threads(int(sys.argv[1]))
from realign.world.build import build_world
start = time.perf_counter()
build_world(sys.argv[2], size=sys.argv[3], force=True)
print(time.perf_counter() - start)
"""


def build(threads: int, size: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", BUILD, str(threads), os.path.join(tmp, "w"), size],
                             capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    results = {}
    for load in ("quiet", "one core busy"):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "quiet" else None
        try:
            time.sleep(0.5 if hog else 0)
            for threads in (1, cores):
                results[(load, threads)] = build(threads, args.size)
                print(f"{load:<14} threads={threads}: {results[(load, threads)]:.1f} s", flush=True)
        finally:
            if hog:
                hog.kill()
    for threads in (1, cores):
        ratio = results[("one core busy", threads)] / results[("quiet", threads)]
        print(f"threads={threads}: a busy core makes the build {ratio:.2f}× as long")


if __name__ == "__main__":
    main()
