"""Rebuild the learned refusal model shipped with realign from the labelled set.

    python scripts/train_refusal_model.py [--data FILE.jsonl] [--out FILE.safetensors]

Reads every part of the labelled set but the held-out ones (``realign.eval.refusal_model.HELD_OUT_SPLITS``),
calibrates the words' log-odds per prompt kind on their leave-one-part-out values, refits on all those rows
and writes ``src/realign/eval/data/refusal_model.safetensors``. Deterministic: the same rows give the same
weights and constants.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from realign.errors import RealignError
from realign.eval.refusal_model import build, read_labelled
from realign.outputs import check_output, input_paths

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "src/realign/eval/data/judge_labelled.jsonl"
DEFAULT_OUT = ROOT / "src/realign/eval/data/refusal_model.safetensors"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every run
    try:
        check_output(args.out, input_paths(args.data), kind="file")  # never write over the labelled data
        rows = read_labelled(args.data)
        model = build(rows)
        model.save(args.out)
    except (OSError, RealignError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    calibrations = ", ".join(f"{kind} {scale:.4f}x{offset:+.4f}" for kind, (scale, offset) in
                             sorted(model.calibrations.items()))
    print(f"{args.out}: trained on {model.trained_on} rows; calibration per prompt kind (scale x offset): "
          f"{calibrations}; rules weight {model.rules_weight:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
