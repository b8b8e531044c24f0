"""Shared benchmark helpers: synthetic Llama-shaped checkpoints and peak-RSS measurement.

A synthetic checkpoint has the real tensor names, shapes, dtype, sharding and config of a Llama
model with random weights, written tensor by tensor (so writing it needs little memory).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from realign.tensorio import OutTensor, dtype_name, write_sharded

SHAPES = {
    # ~1.0B parameters, Llama-3.2-1B-like
    "1b": dict(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256),
    # Llama-3-8B
    "8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    # small, for quick checks
    "tiny": dict(layers=4, hidden=256, intermediate=1024, heads=8, kv_heads=4, vocab=1024),
}


def llama_config(shape: str, dtype: str = "bfloat16") -> dict:
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["hidden"] // s["heads"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tensor_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    s = SHAPES[shape]
    h, i, hd = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (s["heads"] * hd, h)),
            (f"{p}.self_attn.k_proj.weight", (s["kv_heads"] * hd, h)),
            (f"{p}.self_attn.v_proj.weight", (s["kv_heads"] * hd, h)),
            (f"{p}.self_attn.o_proj.weight", (h, s["heads"] * hd)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return out


def write_synthetic(directory: Path, shape: str = "1b", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    max_shard_bytes: int = 2 << 30, scale: float = 0.02) -> Path:
    """Write a random Llama-shaped checkpoint (config + sharded safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def producer(shp):
        return lambda: (torch.randn(shp, generator=gen) * scale).to(dtype)

    specs = [OutTensor(n, dtype_name(dtype), shp, produce=producer(shp)) for n, shp in tensor_shapes(shape)]
    write_sharded(directory, specs, max_shard_bytes=max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(llama_config(shape, str(dtype).removeprefix("torch."))))
    return directory


def largest_tensor_bytes(shape: str, dtype: torch.dtype = torch.bfloat16) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return max(size * torch.Size(s).numel() for _, s in tensor_shapes(shape))


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    VmHWM belongs to the address space, so unlike ru_maxrss it does not inherit the parent's peak
    across fork+exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(code: str) -> tuple[float, float, float]:
    """Run python ``code`` in a fresh interpreter; returns (seconds, peak RSS MB, RSS MB after imports).

    The code must print the RSS after its imports as ``BASELINE <mb>`` (use ``peak_rss_mb()``) and
    ``PEAK <mb>`` at the end; when it prints ``TIME <s>`` (the timed work alone, without interpreter
    start-up and imports) that is the seconds returned."""
    settle()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    baseline = next(float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("BASELINE"))
    peak = next(float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK"))
    timed = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("TIME")]
    return (timed[0] if timed else seconds), peak, baseline


def settle() -> None:
    """Write back every dirty page (untimed) so the next timed writer does not pay for the last one's."""
    os.sync()


def copy_seconds(src: Path, dst: Path) -> float:
    settle()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return time.perf_counter() - start
