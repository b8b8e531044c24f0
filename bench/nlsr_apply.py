"""NLSR apply: streaming memory and speed, dense and LoRA-factor modes, on synthetic checkpoints.

Parts (each prints what it measured in this run):
- ``1b``: `realign apply` of a dense NLSR patch to a synthetic ~1B-parameter Llama-shaped bf16
  checkpoint (sharded), in a fresh interpreter: peak RSS beyond the interpreter with imports
  loaded, against 2 × the largest tensor set one module needs (W_f + its mask + W_e[M] + W_b[M])
  + 200 MB; wall time against `cp` of the same checkpoint (target ≤ 3×).
- ``lora8b``: a prepared patch applied to a LoRA adapter of Llama-3-8B shape (rank 128, alpha 256,
  all 7 modules), in dense mode (the output is a full checkpoint; target: minutes) and in
  LoRA-factor mode (aligned = W_b + adapter, the fine-tune continues it; output an adapter;
  target: seconds). ``--layers`` < 32 builds fewer layers; the script then says so and
  extrapolates linearly in the number of layers.

The patches are written in the real patch format by this script (masks from |W_e|, the values
under them), not by `realign prepare`: a calibration pass of a 1B/8B model on this CPU is out of
scope here (see bench/nlsr_prepare.py). Everything `apply` does is the real code path. The
provenance record hashes every input file once (cached by path, size, mtime); the caches are
filled before timing, so the figures are NLSR's streaming work.

    python bench/nlsr_apply.py [--part 1b|lora8b|all] [--layers 32] [--dir DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("REALIGN_QUIET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from synthetic import SHAPES, copy_seconds, dir_bytes, run_measured, write_synthetic  # noqa: E402

from realign.api import PATCH_FILE, PATCH_TENSORS  # noqa: E402
from realign.lora_factors import factor_inner  # noqa: E402
from realign.masks import pack_mask  # noqa: E402
from realign.methods.base import params_dict  # noqa: E402
from realign.methods.nlsr import PATCH_FORMAT, NLSRParams, region_mask  # noqa: E402
from realign.sources import load_model, weights_sha256  # noqa: E402
from realign.tensorio import OutTensor, dtype_name, parse_size, write_sharded  # noqa: E402
from realign.writer import write_adapter, write_json  # noqa: E402

ROLES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
         "down": "down_proj"}
SPARSITY = 0.8


def kept(numel: int) -> int:
    return numel - math.floor(numel * SPARSITY + 1e-9)


def write_patch(directory: Path, meta: dict, inputs: dict, specs: list[OutTensor], mode: str) -> None:
    """A patch directory in the format `realign prepare` writes (patch.json + patch*.safetensors)."""
    directory.mkdir(parents=True)
    write_sharded(directory, specs, max_shard_bytes=parse_size("2GB"), basename=PATCH_TENSORS)
    params = params_dict(NLSRParams(mode=mode))
    write_json(directory / PATCH_FILE, {"format": "realign-patch/1", "method": "nlsr", "params": params,
                                         "meta": meta, "inputs": inputs,
                                         "report": {"notes": ["benchmark patch (masks from |W_e|)"]}})


def dense_patch(aligned_dir: Path, out: Path) -> None:
    """Per linear weight: M = top 20 % of |W_e| (W_e = W_a here), W_e[M], W_b[M] (= 0.9·W_e[M])."""
    aligned = load_model(aligned_dir)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def part(name: str, key: str) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            if name not in cache:
                cache.clear()  # one module at a time
                w = aligned.get(name)
                mask = region_mask(w.float().abs(), SPARSITY)
                cache[name] = {"mask": pack_mask(mask), "ref": w[mask], "base": (0.9 * w[mask].float()).to(w.dtype)}
            return cache[name][key]
        return fn

    specs, modules = [], []
    for layer, role, name in aligned.arch.linear_weights():
        shape, dtype = aligned.shape(name), aligned.dtype(name)
        n = math.prod(shape)
        specs += [OutTensor(f"{name}.mask", "U8", ((n + 7) // 8,), produce=part(name, "mask")),
                  OutTensor(f"{name}.ref", dtype_name(dtype), (kept(n),), produce=part(name, "ref")),
                  OutTensor(f"{name}.base", dtype_name(dtype), (kept(n),), produce=part(name, "base"))]
        modules.append({"layer": layer, "role": role, "name": name, "module": name.removesuffix(".weight"),
                        "shape": list(shape), "kept": kept(n)})
    meta = {"format": PATCH_FORMAT, "mode": "dense", "has_base": True, "reference": "benchmark", "modules": modules}
    write_patch(out, meta, {"aligned": {"ref": str(aligned_dir), "path": str(aligned_dir)}}, specs, "dense")


def write_lora(directory: Path, base_dir: Path, seed: int, rank: int = 128, alpha: int = 256,
               like: Path | None = None) -> None:
    """A PEFT LoRA adapter (bf16) on ``base_dir`` with all 7 modules; ``like``: continue that adapter."""
    base = load_model(base_dir)
    g = torch.Generator().manual_seed(seed)
    prev = load_model(like, base=base_dir).adapter if like else None
    tensors = {}
    for _layer, _role, name in base.arch.linear_weights():
        module = name.removesuffix(".weight")
        d_out, d_in = base.shape(name)
        prefix = f"base_model.model.{module}"
        a = torch.randn(rank, d_in, generator=g) / math.sqrt(d_in)
        b = torch.randn(d_out, rank, generator=g) * 0.01
        if prev is not None:
            pa, pb, _ = prev.factors(module)
            a, b = pa.float() + 0.1 * a, pb.float() + 0.1 * b
        tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": list(ROLES.values()), "base_model_name_or_path": str(base_dir),
              "task_type": "CAUSAL_LM", "fan_in_fan_out": False}
    directory.mkdir(parents=True)
    write_adapter(directory, config, tensors)


def factor_patch(aligned_adapter: Path, base_dir: Path, out: Path, factor: float = math.sqrt(1.9)) -> None:
    """LoRA-factor patch: masks on A_e = c·A_a and B_e = c·B_a (top 20 % by magnitude), values under them."""
    al = load_model(aligned_adapter, base=base_dir)
    specs, modules = [], []
    for layer, role, name in al.arch.linear_weights():
        module = name.removesuffix(".weight")
        a, b, scale = al.adapter.factors(module)
        entry = {"layer": layer, "role": role, "name": name, "module": module, "scale": scale}
        masked = []
        for part, w in (("lora_A", a), ("lora_B", b)):
            w_e = (factor * w.float()).to(w.dtype)
            mask = region_mask(w_e.float().abs(), SPARSITY)
            masked.append(torch.where(mask, w_e.float(), 0.0))
            specs += [OutTensor(f"{module}.{part}.mask", "U8", ((mask.numel() + 7) // 8,),
                                produce=lambda m=mask: pack_mask(m)),
                      OutTensor(f"{module}.{part}.ref", dtype_name(w.dtype), (int(mask.sum()),),
                                produce=lambda w_e=w_e, m=mask: w_e[m])]
            entry[f"{part}_shape"], entry[f"{part}_kept"] = list(w.shape), int(mask.sum())
        entry["ref_norm2"] = factor_inner(masked[0], masked[1], masked[0], masked[1])  # as prepare stores it
        modules.append(entry)
    meta = {"format": PATCH_FORMAT, "mode": "lora", "has_base": True, "reference": "benchmark", "modules": modules,
            "lora_base": {"path": str(base_dir.resolve()), "sha256": []}}
    write_patch(out, meta, {"aligned": {"ref": str(aligned_adapter), "path": str(aligned_adapter)}}, specs, "lora")


APPLY = """
import sys, time
sys.path.insert(0, {bench!r})
from synthetic import peak_rss_mb
from realign import api
from realign.methods import available
available()  # every method module imported: the baseline holds all imports
print("BASELINE", peak_rss_mb())
start = time.perf_counter()
api.apply({patch!r}, {ft!r}, {out!r}, device="cpu")
print("TIME", time.perf_counter() - start)
print("PEAK", peak_rss_mb())
"""


STREAM = """
import sys, time
sys.path.insert(0, {bench!r})
from synthetic import peak_rss_mb
from pathlib import Path
from realign.sources import load_model
from realign.tensorio import OutTensor, dtype_name, write_sharded
print("BASELINE", peak_rss_mb())
m = load_model({src!r})
specs = [OutTensor(n, dtype_name(m.dtype(n)), m.shape(n), copy_from=m.weights.info(n)) for n in m.tensor_names]
out = Path({out!r}); out.mkdir()
start = time.perf_counter()
write_sharded(out, specs, max_shard_bytes=5 << 30)
print("TIME", time.perf_counter() - start)
print("PEAK", peak_rss_mb())
"""


def measured_stream(src: Path, out: Path) -> float:
    """Seconds of realign's plain streaming copy of ``src`` (every tensor byte-copied): the floor
    any apply stands on."""
    return run_measured(STREAM.format(bench=str(Path(__file__).parent), src=str(src), out=str(out)))[0]


def measured_apply(patch: Path, ft: Path, out: Path) -> tuple[float, float]:
    """(seconds of api.apply, peak RSS MB beyond the interpreter with imports), in a fresh process."""
    code = APPLY.format(bench=str(Path(__file__).parent), patch=str(patch), ft=str(ft), out=str(out))
    secs, peak, base = run_measured(code)
    return secs, peak - base


def part_1b(root: Path, rounds: int) -> None:
    aligned, ft = root / "aligned-1b", root / "ft-1b"
    for d, seed in ((aligned, 0), (ft, 1)):
        if not (d / "config.json").exists():
            print(f"writing synthetic 1b checkpoint {d} ...", flush=True)
            write_synthetic(d, "1b", seed=seed)
    patch = root / "patch-1b"
    if not (patch / PATCH_FILE).exists():
        shutil.rmtree(patch, ignore_errors=True)
        print("writing the dense patch ...", flush=True)
        dense_patch(aligned, patch)
    model = load_model(ft)
    for m in (model, load_model(aligned)):
        weights_sha256(m)  # provenance hashes: computed once, cached
    # The largest tensor set one module needs: W_f + its packed mask + W_e[M] + W_b[M].
    largest = max((model.shape(n) for _, _, n in model.arch.linear_weights()), key=math.prod)
    n = math.prod(largest)
    size = torch.empty((), dtype=torch.bfloat16).element_size()
    module_set = n * size + (n + 7) // 8 + 2 * kept(n) * size
    budget = 2 * module_set / 1e6 + 200
    cps, streams, secs, rss = [], [], [], []
    for _ in range(rounds):
        for d in ("cp", "out", "stream"):
            shutil.rmtree(root / d, ignore_errors=True)
        cps.append(copy_seconds(ft, root / "cp"))
        shutil.rmtree(root / "cp", ignore_errors=True)
        streams.append(measured_stream(ft, root / "stream"))
        shutil.rmtree(root / "stream", ignore_errors=True)
        s, peak = measured_apply(patch, ft, root / "out")
        secs.append(s)
        rss.append(peak)
        shutil.rmtree(root / "out", ignore_errors=True)
    s, cp, r, st = min(secs), min(cps), max(rss), min(streams)
    print(f"1B dense apply: checkpoint {dir_bytes(ft) / 1e9:.2f} GB, {len(model.arch.linear_weights())} linear "
          f"weights, largest module set {module_set / 1e6:.1f} MB (W_f {largest[0]}x{largest[1]} bf16 + mask + "
          "W_e[M] + W_b[M])")
    print(f"{'':<12}{'apply s':>9}{'cp s':>8}{'ratio':>7}{'stream s':>10}{'ratio':>7}{'peak RSS MB':>13}"
          f"{'budget MB':>11}")
    ok = s / cp <= 3 and r <= budget
    print(f"{'dense, 1B':<12}{s:>9.2f}{cp:>8.2f}{s / cp:>7.2f}{st:>10.2f}{s / st:>7.2f}{r:>13.0f}{budget:>11.0f}"
          f"  {'ok' if ok else 'MISSED'} (targets: ratio to cp ≤ 3, RSS ≤ budget)")
    paired = sorted(a / c for a, c in zip(secs, cps, strict=True))
    print(f"per round (cp, then stream, then apply, one after the other): apply / cp = "
          f"{', '.join(f'{a / c:.2f}' for a, c in zip(secs, cps, strict=True))}; "
          f"median {paired[len(paired) // 2]:.2f}; "
          f"cp s {', '.join(f'{c:.2f}' for c in cps)}; apply s {', '.join(f'{a:.2f}' for a in secs)}")
    print("(apply: api.apply in a fresh interpreter after imports, best of rounds; RSS: the most beyond the imports "
          "over rounds; cp: `cp -r` of the fine-tune; stream: realign's own byte-copy of every tensor, the floor "
          "an apply stands on; on a shared VM disk cp alone varies several-fold between rounds)")


def part_lora8b(root: Path, layers: int) -> None:
    shape = "8b" if layers == 32 else f"8b-{layers}"
    SHAPES[shape] = dict(SHAPES["8b"], layers=layers)
    w = root / f"w-{shape}"
    if not (w / "config.json").exists():
        shutil.rmtree(w, ignore_errors=True)
        print(f"writing synthetic Llama-3-8B-shaped checkpoint ({layers} layers) {w} ...", flush=True)
        t = time.perf_counter()
        write_synthetic(w, shape, seed=0)
        print(f"  written in {time.perf_counter() - t:.0f} s, {dir_bytes(w) / 1e9:.1f} GB", flush=True)
    fresh, aligned_ad, cont = root / f"fresh-{shape}", root / f"aligned-ad-{shape}", root / f"cont-{shape}"
    for d, seed, like in ((fresh, 1, None), (aligned_ad, 2, None), (cont, 3, aligned_ad)):
        if not (d / "adapter_config.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            write_lora(d, w, seed, like=like)
    dpatch, fpatch = root / f"patch-dense-{shape}", root / f"patch-factor-{shape}"
    if not (dpatch / PATCH_FILE).exists():
        shutil.rmtree(dpatch, ignore_errors=True)
        print("writing the dense patch ...", flush=True)
        t = time.perf_counter()
        dense_patch(w, dpatch)
        print(f"  written in {time.perf_counter() - t:.0f} s, {dir_bytes(dpatch) / 1e9:.2f} GB", flush=True)
    if not (fpatch / PATCH_FILE).exists():
        shutil.rmtree(fpatch, ignore_errors=True)
        factor_patch(aligned_ad, w, fpatch)
    for m in (load_model(w), load_model(fresh), load_model(cont)):
        weights_sha256(m)  # provenance hashes: computed once, cached
    ad = load_model(fresh).describe()["adapter"]
    print(f"adapters: rank {ad['r']}, alpha {ad['lora_alpha']}, {ad['modules']} modules, "
          f"{ad['parameters'] / 1e6:.0f}M parameters; {layers} layers")
    rows = []
    for label, patch, ft in (("dense (checkpoint out)", dpatch, fresh), ("LoRA-factor (adapter out)", fpatch, cont)):
        out = root / "out-8b"
        shutil.rmtree(out, ignore_errors=True)
        secs, rss = measured_apply(patch, ft, out)
        out_gb = dir_bytes(out) / 1e9
        shutil.rmtree(out, ignore_errors=True)
        rows.append((label, secs, rss, out_gb))
    scale = 32 / layers
    print(f"{'Llama-3-8B LoRA':<28}{'apply s':>9}{'peak RSS MB':>13}{'output GB':>11}"
          + ("" if layers == 32 else f"{'x32 layers s':>14}"))
    for label, secs, rss, out_gb in rows:
        extra = "" if layers == 32 else f"{secs * scale:>14.0f}"
        print(f"{label:<28}{secs:>9.1f}{rss:>13.0f}{out_gb:>11.2f}{extra}")
    if layers != 32:
        print(f"NOTE: built with {layers} of 32 layers; the last column extrapolates linearly (x{scale:g}).")
    print("(targets: dense mode in minutes, LoRA-factor mode in seconds, on this CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["1b", "lora8b", "all"])
    ap.add_argument("--layers", type=int, default=32, help="layers of the 8B-shaped model (32 = the real shape)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch directory, kept for reuse (default: a temp dir, removed)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="realign-bench-nlsr-apply-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("1b", "all"):
            part_1b(root, args.rounds)
        if args.part in ("lora8b", "all"):
            part_lora8b(root, args.layers)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
