"""NLSR prepare: time of `prepare` (reference model + ONE calibration pass + scoring + masks) as a
ratio to a plain no-grad forward pass of the same model over the same data (target ≤ 1.5×).

Both sides see the same tokens in the same batches; prepare is timed end to end (loading the
models, building W_e, the pass with its hooks, the per-matrix decompositions, the masks). Each
figure is the best of --rounds alternating runs (the machine is shared).

    python bench/nlsr_prepare.py                      # synthetic Llama-shaped model (random weights)
    python bench/nlsr_prepare.py --world DIR          # the miniature world's aligned/base/calibration
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("REALIGN_QUIET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from realign import api  # noqa: E402
from realign.calibration import load_calibration  # noqa: E402
from realign.compute import load_model as run_model  # noqa: E402
from realign.methods.base import Inputs  # noqa: E402
from realign.methods.nlsr import NLSR, NLSRParams  # noqa: E402
from realign.sources import load_model  # noqa: E402
from realign.stats import padded  # noqa: E402


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


@torch.no_grad()
def forward_seconds(aligned: Path, cal: Path, params: NLSRParams, template: str) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens) of a plain no-grad forward over the examples prepare runs over."""
    model, tok = run_model(str(aligned), device="cpu")
    inputs = Inputs(aligned=load_model(aligned), calibration=load_calibration(cal), template=template)
    encoded = NLSR()._encode(inputs, params, tok)  # exactly the examples prepare runs over
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(encoded), params.batch_size):
        ids, attn = padded(encoded[i:i + params.batch_size])  # the batches prepare's pass builds
        model(input_ids=ids, attention_mask=attn, use_cache=False)
    return time.perf_counter() - start, time.process_time() - cpu, sum(len(e.input_ids) for e in encoded)


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
    ap.add_argument("--scores", default="lowrank,wanda,snip")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="realign-bench-nlsr-prepare-"))
    try:
        if args.world:
            base, aligned, cal = args.world / "base", args.world / "aligned", args.world / "calibration.jsonl"
            template = "auto"
            sets = {"batch_size": args.batch_size}
        else:
            base, aligned, cal = synthetic(root, args)
            template = "raw"
            sets = {"samples": args.samples, "max_response_tokens": args.response_tokens,
                    "batch_size": args.batch_size}
        params = NLSRParams(**sets)
        n_params = load_model(aligned).num_parameters()
        print(f"model: {aligned} ({n_params / 1e6:.1f}M parameters), calibration: {cal}")
        # Warm-up: kernels, the input hashes prepare records (cached), the page cache.
        api.prepare("nlsr", aligned=aligned, base=base, calibration=cal, params={**sets, "score": "wanda"},
                    template=template, device="cpu")
        rows = []
        for score in args.scores.split(","):
            fwd, prep = [], []
            for _ in range(args.rounds):
                f_wall, f_cpu, tokens = forward_seconds(aligned, cal, params, template)
                fwd.append((f_wall, f_cpu))
                start, cpu = time.perf_counter(), time.process_time()
                patch = api.prepare("nlsr", aligned=aligned, base=base, calibration=cal,
                                    params={**sets, "score": score}, template=template, device="cpu")
                prep.append((time.perf_counter() - start, time.process_time() - cpu, patch.report["timing_seconds"]))
            best = min(prep, key=lambda x: x[1])
            rows.append((score, min(f[0] for f in fwd), min(f[1] for f in fwd), min(p[0] for p in prep), best[1],
                         best[2], tokens))
        print(f"{'score':<9}{'tokens':>8}{'forward s':>11}{'prepare s':>11}{'ratio':>7}{'fwd CPU s':>11}"
              f"{'prep CPU s':>12}{'ratio':>7}   prepare breakdown (wall s)")
        for score, fw, fc, pw, pc, timing, tokens in rows:
            verdict = "ok" if pc / fc <= 1.5 else ("(forward+backward: no target)" if score == "snip" else "MISSED")
            parts = ", ".join(f"{k} {v:.2f}" for k, v in timing.items())
            print(f"{score:<9}{tokens:>8}{fw:>11.2f}{pw:>11.2f}{pw / fw:>7.2f}{fc:>11.2f}{pc:>12.2f}{pc / fc:>7.2f}"
                  f"   {parts}  {verdict}")
        print("(forward: a plain no-grad forward of the aligned model over the same batches; prepare: api.prepare "
              "end to end; best of rounds. CPU s = process CPU time, the steadier figure on a shared machine; "
              "the verdict uses it)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
