"""NLSR prepare against a plain forward pass of the same model over the same data: time and peak
memory, side by side in one run (target: the default, ``lowrank`` with sequential activations,
≤ 1.5× the forward pass).

Rows, each measured in a fresh interpreter (so each has its own peak memory):
- ``forward``: a plain no-grad forward of the aligned model over exactly the batches prepare runs
  (the model's own forward, LM head included);
- ``lowrank sequential`` (the default, the official order): api.prepare end to end (loading the
  models, building W_e, the layer-by-layer passes with each layer projected before the next one's
  inputs are made, the decompositions, the masks);
- ``lowrank one-pass``, ``wanda``, ``snip`` (per-example gradients: forward + backward, no target).
Each figure is the best of --rounds alternating runs (the machine is shared); CPU s is process CPU
time of the timed part, the steadier figure, and the verdict uses it. Peak MB is the process's
peak RSS (VmHWM); "+MB" is its growth over the interpreter with its imports loaded.

    python bench/nlsr_prepare.py                      # synthetic 19.5M Llama (random weights)
    python bench/nlsr_prepare.py --world DIR          # the miniature world's aligned/base/calibration
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("REALIGN_QUIET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from realign.progress import silence_libraries  # noqa: E402
from realign.sources import load_model  # noqa: E402

VARIANTS = {
    "forward": None,
    "lowrank sequential": {"score": "lowrank", "activations": "sequential"},
    "lowrank one-pass": {"score": "lowrank", "activations": "one-pass"},
    "wanda": {"score": "wanda"},
    "snip": {"score": "snip"},
}

CHILD = """
import json, os, sys, time
sys.path.insert(0, {bench!r})
os.environ["REALIGN_QUIET"] = "1"
import torch
torch.set_num_threads({threads})
from synthetic import peak_rss_mb
from realign import api
from realign.calibration import load_calibration
from realign.compute import load_model as run_model
from realign.methods.base import Inputs
from realign.methods.nlsr import NLSR, NLSRParams
from realign.sources import load_model
from realign.stats import padded
print("BASELINE", peak_rss_mb())
sets, variant = json.loads({sets!r}), json.loads({variant!r})
# transformers initialises a model class lazily on its first load (seconds in a fresh interpreter):
# paid here, untimed, for every row
warm = run_model({aligned!r}, device="cpu")
del warm
start, cpu = time.perf_counter(), time.process_time()
if variant is None:
    with torch.no_grad():
        model, tok = run_model({aligned!r}, device="cpu")
        params = NLSRParams(**sets)
        inputs = Inputs(aligned=load_model({aligned!r}), calibration=load_calibration({cal!r}), template={template!r})
        encoded = NLSR()._encode(inputs, params, tok)  # exactly the examples prepare runs over
        start, cpu = time.perf_counter(), time.process_time()  # the forward alone, as generously as possible
        for i in range(0, len(encoded), params.batch_size):
            ids, attn = padded(encoded[i:i + params.batch_size])  # the batches prepare's passes build
            model(input_ids=ids, attention_mask=attn, use_cache=False)
    print("TOKENS", sum(len(e.input_ids) for e in encoded))
else:
    patch = api.prepare("nlsr", aligned={aligned!r}, base={base!r}, calibration={cal!r},
                        params={{**sets, **variant}}, template={template!r}, device="cpu")
    print("TIMING", json.dumps(patch.report["timing_seconds"]))
    print("NOTES", json.dumps(patch.report["notes"]))
print("TIME", time.perf_counter() - start)
print("CPU", time.process_time() - cpu)
print("PEAK", peak_rss_mb())
"""


def word_tokenizer(vocab: int, directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


def synthetic(root: Path, args) -> tuple[Path, Path, Path]:
    """base, aligned (= base moved a little) and a calibration file of random words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads // 4,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "aligned")
    for d in ("base", "aligned"):
        word_tokenizer(args.vocab, root / d)
    g = torch.Generator().manual_seed(1)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(0, args.vocab - 4, (n,), generator=g))

    with open(root / "cal.jsonl", "w") as f:
        for _ in range(args.samples):
            f.write(json.dumps({"prompt": words(16), "kind": "harmful",
                                "safe_response": words(args.response_tokens)}) + "\n")
    return root / "base", root / "aligned", root / "cal.jsonl"


def measure(code: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    out: dict[str, object] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("BASELINE", "PEAK", "TIME", "CPU"):
            out[key] = float(value)
        elif key == "TOKENS":
            out[key] = int(value)
        elif key in ("TIMING", "NOTES"):
            out[key] = json.loads(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, help="a miniature world directory (else a synthetic model)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--samples", type=int, default=384)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    args = ap.parse_args()
    silence_libraries()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if "forward" not in variants:
        variants.insert(0, "forward")
    root = Path(tempfile.mkdtemp(prefix="realign-bench-nlsr-prepare-"))
    try:
        if args.world:
            base, aligned, cal = args.world / "base", args.world / "aligned", args.world / "calibration.jsonl"
            template, sets = "auto", {"batch_size": args.batch_size}
        else:
            base, aligned, cal = synthetic(root, args)
            template = "raw"
            sets = {"samples": args.samples, "max_response_tokens": args.response_tokens,
                    "batch_size": args.batch_size}
        n_params = load_model(aligned).num_parameters()
        print(f"model: {aligned} ({n_params / 1e6:.1f}M parameters), calibration: {cal}, {args.threads} threads, "
              f"best of {args.rounds} rounds")

        def code(variant: str) -> str:
            return CHILD.format(bench=str(Path(__file__).parent), threads=args.threads, sets=json.dumps(sets),
                                variant=json.dumps(VARIANTS[variant]), aligned=str(aligned), base=str(base),
                                cal=str(cal), template=template)

        measure(code("wanda"))  # warm-up: the page cache, the input hashes prepare records (cached)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:  # alternating, so a busy spell hits every row
                runs[v].append(measure(code(v)))
        best = {v: min(r, key=lambda m: m["CPU"]) for v, r in runs.items()}
        fwd = best["forward"]
        tokens = fwd["TOKENS"]
        print(f"{'':<20}{'wall s':>8}{'CPU s':>8}{'× fwd (CPU)':>12}{'peak MB':>9}{'+MB':>7}   breakdown (wall s)")
        for v in variants:
            m = best[v]
            ratio = m["CPU"] / fwd["CPU"]
            parts = ", ".join(f"{k} {val:.2f}" for k, val in m.get("TIMING", {}).items())
            verdict = ""
            if v == "lowrank sequential":
                verdict = "  ok (≤ 1.5×)" if ratio <= 1.5 else "  MISSED (> 1.5×)"
            elif v == "snip":
                verdict = "  (forward + backward per batch: no target)"
            print(f"{v:<20}{m['TIME']:>8.2f}{m['CPU']:>8.2f}{ratio:>12.2f}{m['PEAK']:>9.0f}"
                  f"{m['PEAK'] - m['BASELINE']:>7.0f}   {parts}{verdict}")
            for note in m.get("NOTES", []):
                print(f"{'':<20}note: {note}")
        print(f"({tokens} tokens in {len(range(0, args.samples, args.batch_size))} batches. forward: the model's own "
              "forward, LM head included, the tokenised data ready; prepare rows: api.prepare end to end, loading "
              "included. Per row: the round with the least CPU time.)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
