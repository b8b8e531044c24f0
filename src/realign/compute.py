"""Compute placement: load a model to run it (calibration, evaluation), on GPU when present.

A model larger than one GPU is spread over all GPUs by accelerate (``device_map="auto"``).
Weight surgery never comes here: it runs tensor by tensor on the files (see ``sources``).
"""

from __future__ import annotations

import os
import time

import torch

from realign.errors import RealignError
from realign.progress import silence_libraries
from realign.sources import Model
from realign.sources import load_model as open_model

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RealignError("--device cuda was asked for but no GPU is visible to torch: use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise RealignError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise RealignError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def _device_map(device: torch.device):
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return "auto"  # accelerate spreads a model that does not fit one GPU over all of them
    return None


def load_tokenizer(model: Model, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model.tokenizer_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 — report any tokenizer failure as one line
        msg = f"cannot load the tokenizer of {model.ref} ({type(e).__name__}: {e})".splitlines()[0]
        raise RealignError(msg) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str | os.PathLike | Model,
    adapter: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) ready to run, in eval mode. ``ref`` may be an adapter directory; an
    explicit ``adapter`` is put on top of ``ref``. Adapters are merged into the weights."""
    from transformers import AutoModelForCausalLM

    silence_libraries()
    source = ref if isinstance(ref, Model) else open_model(ref, allow_pickle=allow_pickle)
    # A model opened with the opt-in keeps it for every later load (calibration passes included).
    allow_pickle = allow_pickle or source.allow_pickle
    if adapter is not None:
        if source.is_adapter:
            raise RealignError(f"{source.ref} is already an adapter; pass its base model with --adapter")
        source = open_model(adapter, base=source.path, allow_pickle=allow_pickle)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    base = source.base if source.is_adapter else source
    assert base is not None
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if allow_pickle:
        kwargs["use_safetensors"] = None
    else:
        kwargs["use_safetensors"] = True
    device_map = _device_map(dev)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base.path), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise RealignError(f"cannot load {base.ref} ({type(e).__name__}: {e})".splitlines()[0]) from None
    if source.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.path)).merge_and_unload()
    if not device_map:
        model.to(dev)
    model.eval()
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model.realign_source = source  # the resolved reference travels with the loaded model
    return model, tokenizer


def pick_threads(load: float | None = None, cores: int | None = None) -> int:
    """Torch threads for running small models on the CPU: the cores nobody else is using now. On a
    2-core machine (``bench/threads.py``) the small world's build took about 23 s with 1 or 2
    threads when quiet, but 66.6 s with 2 (23.3 s with 1) while another process kept one core
    busy: torch's threads wait for each other, so a busy core slows every step threefold."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        load = busy_cores()
    return max(1, min(cores, cores - round(load)))


def busy_cores(seconds: float = 0.3) -> float:
    """Cores busy right now with other work, from two readings of /proc/stat (we sleep between
    them, so our own process does not count); the 1-minute load average where /proc is missing,
    which also remembers work that has just ended."""
    def ticks() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = ticks()
    if first is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(seconds)
    second = ticks()
    assert second is not None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total if total > 0 else 0.0


def use_free_cores() -> int:
    """Set torch's thread count with ``pick_threads`` (unless the user set ``REALIGN_THREADS`` or
    ``OMP_NUM_THREADS``, which win); returns the count."""
    given = os.environ.get("REALIGN_THREADS") or os.environ.get("OMP_NUM_THREADS")
    threads = int(given) if given and given.isdigit() and int(given) > 0 else pick_threads()
    torch.set_num_threads(threads)
    return threads


def model_device(model) -> torch.device:
    return next(model.parameters()).device


__all__ = ["load_model", "load_tokenizer", "resolve_device", "resolve_dtype", "model_device", "pick_threads",
           "use_free_cores"]
