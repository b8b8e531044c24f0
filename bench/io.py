"""Streaming I/O benchmark: a synthetic ~1B-parameter Llama-shaped bf16 checkpoint (sharded) is
streamed through realign's reader and writer unchanged, side by side with `cp`.

Prints, measured in this run:
- wall time of the stream as a ratio to copying the files with `cp` (target ≤ 2×);
- peak RSS beyond the interpreter with imports loaded, against the largest tensor (target:
  ≤ 2 × largest tensor + 200 MB, i.e. it must not grow with the model).

Each is the best of --rounds alternating runs. Two paths are measured: `pipeline` (what
`realign apply/repair` does for untouched tensors: byte-range copies) and `decode` (every tensor
read into a torch tensor and written back).

    python bench/io.py [--shape 1b|tiny] [--dir /tmp/realign-bench-io]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import copy_seconds, dir_bytes, largest_tensor_bytes, run_measured, write_synthetic  # noqa: E402

STREAM = """
import sys
sys.path.insert(0, {bench!r})
from synthetic import peak_rss_mb
from realign.sources import load_model
from realign.tensorio import OutTensor, dtype_name, write_sharded
from pathlib import Path
print("BASELINE", peak_rss_mb())
m = load_model({src!r})
decode = {decode!r}
specs = []
for n in m.tensor_names:
    if decode:
        specs.append(OutTensor(n, dtype_name(m.dtype(n)), m.shape(n), produce=lambda n=n: m.get(n)))
    else:
        specs.append(OutTensor(n, dtype_name(m.dtype(n)), m.shape(n), copy_from=m.weights.info(n)))
out = Path({dst!r}); out.mkdir()
import time
start = time.perf_counter()
write_sharded(out, specs, max_shard_bytes=2 << 30)
print("TIME", time.perf_counter() - start)
print("PEAK", peak_rss_mb())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=["1b", "tiny"])
    ap.add_argument("--rounds", type=int, default=3, help="side-by-side repetitions (best of each is kept)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed after)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="realign-bench-io-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        src = root / "src"
        if not (src / "config.json").exists():
            print(f"writing synthetic {args.shape} checkpoint to {src} ...", flush=True)
            write_synthetic(src, args.shape)
        size = dir_bytes(src)
        largest = largest_tensor_bytes(args.shape)
        print(f"checkpoint: {size / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB")
        bench = str(Path(__file__).parent)
        rows = []
        for label, decode in (("pipeline", False), ("decode", True)):
            # Alternate the two side by side and keep each one's best of N: the machine is shared.
            cps, secs, rss = [], [], []
            for round_ in range(args.rounds):
                # Each timed run starts with no dirty pages left by the other (synthetic.settle), and the
                # order alternates: otherwise the second writer pays for the first one's writeback.
                order = ("cp", label) if round_ % 2 == 0 else (label, "cp")
                for d in order:
                    shutil.rmtree(root / d, ignore_errors=True)
                    if d == "cp":
                        cps.append(copy_seconds(src, root / "cp"))
                    else:
                        s, peak, base = run_measured(STREAM.format(bench=bench, src=str(src), dst=str(root / label),
                                                                   decode=decode))
                        secs.append(s)
                        rss.append(peak - base)
                for d in order:
                    shutil.rmtree(root / d, ignore_errors=True)
            rows.append((label, min(secs), min(cps), max(rss)))
        budget = 2 * largest / 1e6 + 200
        print(f"{'path':<10}{'realign s':>11}{'cp s':>8}{'ratio':>8}{'peak RSS MB':>13}{'RSS/ckpt':>10}"
              f"{'budget MB':>11}")
        for label, secs, cp, rss in rows:
            print(f"{label:<10}{secs:>11.2f}{cp:>8.2f}{secs / cp:>8.2f}{rss:>13.0f}{rss * 1e6 / size:>10.3f}"
                  f"{budget:>11.0f}  {'ok' if secs / cp <= 2 and rss <= budget else 'MISSED'}")
        print("(realign time: the streaming alone, in a fresh interpreter after imports; cp: the whole copy)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
