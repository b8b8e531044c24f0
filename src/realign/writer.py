"""Output directories: written in a temporary directory next to the target and renamed at the
end, so an interrupted run never leaves anything that looks like a finished model."""

from __future__ import annotations

import datetime as dt
import glob
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from realign import __version__
from realign.outputs import check_output

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary directories that an earlier run killed mid-write (kill -9, power loss)
    left next to ``out``: ``.NAME.PID.*.partial`` whose process is gone."""
    removed = []
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        parts = tmp.name[len(out.name) + 2:].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue  # another run is writing there right now
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_output(out: str | os.PathLike, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``out`` (replacing it only with
    ``force``, and only an earlier realign output or an empty directory), on any failure it is
    removed. Leftovers of killed earlier runs are removed first."""
    out = check_output(out, inputs, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; outputs honour the user's umask like any mkdir
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src_dirs: list[Path], dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the first existing copy of each named file (config, tokenizer, generation config)."""
    copied = []
    for name in names:
        for src in src_dirs:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
                copied.append(name)
                break
    return copied


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_file_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write one file through a temporary file next to it, renamed at the end (never half-written)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def provenance(method: str, params: dict, inputs: dict, report: dict, output: str) -> dict:
    return {
        "tool": "realign",
        "version": __version__,
        "torch": torch.__version__,
        "method": method,
        "parameters": params,
        "inputs": inputs,
        "output": output,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "report": report,
    }


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/`'\"]+/)*([^\s/`'\"]+)")


def _public(text: str) -> str:
    """``text`` without local absolute paths (a card is meant to be published): a path becomes its
    last component."""
    return _ABSOLUTE_PATH.sub(r"\1", str(text))


def _public_ref(info: dict) -> str | None:
    """How a card names an input: the hub id (with @revision) when it came from the hub, else the
    local directory's name."""
    if info.get("hub_id"):
        return info["hub_id"] + (f"@{info['revision']}" if info.get("revision") else "")
    ref = info.get("ref")
    return f"local model {Path(str(ref)).name}" if ref else None


def model_card(prov: dict) -> str:
    """The output's README.md: a Hugging Face model card (metadata through huggingface_hub's
    ModelCardData: base_model when the fine-tune came from the hub, library_name, tags), the
    method and every parameter as used, what changed; no local absolute path."""
    from huggingface_hub import ModelCard, ModelCardData

    report = prov.get("report", {})
    totals = report.get("totals", {})
    inputs = {role: info for role, info in prov.get("inputs", {}).items() if isinstance(info, dict)}
    adapter = "adapter" in str(prov.get("output", ""))
    finetuned = inputs.get("finetuned", {})
    # A repaired adapter derives from the adapter's base; a repaired checkpoint from the fine-tune.
    base_model = finetuned.get("base_hub_id") if adapter else finetuned.get("hub_id")
    data = ModelCardData(base_model=base_model, library_name="peft" if adapter else "transformers",
                         tags=["realign", "safety-realignment", str(prov["method"])], pipeline_tag="text-generation")
    lines = [
        f"# Safety-realigned model ({prov['method']})",
        "",
        f"Produced by realign {prov['version']} with the `{prov['method']}` method on {prov['date']}. "
        f"It is a {prov['output']}.",
        "",
        "## Inputs",
        "",
    ]
    lines += [f"- {role}: `{_public_ref(info)}`" for role, info in inputs.items() if _public_ref(info)]
    lines += ["", "## Parameters (as used, tuned ones included)", ""]
    used = {k: v for k, v in prov.get("parameters", {}).items() if v is not None}
    lines += [f"- `{k}` = `{_public(v)}`" for k, v in used.items()] or ["- (none)"]
    if report.get("tuning"):
        chosen = report["tuning"].get("chosen") or {}
        lines.append(f"- chosen by `--tune`: {', '.join(f'{k}={v}' for k, v in chosen.items()) or 'nothing'}")
    if totals:
        lines += ["", "## What changed", ""]
        if "parameters_changed" in totals:
            lines.append(f"- parameters changed: {totals['parameters_changed']:,} of {totals['parameters_total']:,} "
                         f"({totals['percent_changed']} %)")
            if "linear_parameters_changed" in totals:
                lines.append(f"- of the decoder's linear weights: {totals['linear_parameters_changed']:,} "
                             f"({totals['percent_of_linear_weights']} %)")
            if totals.get("parameters_added"):
                lines.append(f"- parameters added: {totals['parameters_added']:,} ({totals['tensors_added']} tensors)")
        elif "adapter_parameters_changed" in totals:
            lines.append(f"- adapter parameters changed: {totals['adapter_parameters_changed']:,} of "
                         f"{totals['adapter_parameters_total']:,} ({totals['percent_changed']} %)")
    notes = report.get("notes", [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {_public(note)}" for note in notes]
    lines += ["", "Full provenance (input paths and hashes, per-module report): `realign.json`.", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_adapter(dst: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A PEFT LoRA adapter directory (adapters are small: written in one piece)."""
    write_json(dst / "adapter_config.json", config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def full_rank_adapter(ft, modules: Mapping[str, tuple[str, int, int]],
                      transforms: Mapping[str, Callable[[torch.Tensor], Any]]) -> dict[str, Any]:
    """The adapter output of a dense edit of a LoRA fine-tune ``ft`` (a ``Model`` that is an
    adapter on W_a): ``modules`` {module: (weight name, d_out, d_in)} are stored at full rank
    (A = I, B = new W − W_a, or the transpose arrangement, scale 1), exactly reproducing
    ``transforms[weight name](W_f)``; the other modules keep their factors. Tensors are produced
    on first access."""
    from realign.sources import LoraAdapter

    adapter = ft.adapter
    assert adapter is not None and ft.base is not None
    config = dict(adapter.config)
    # PEFT takes the FIRST pattern key that matches a module: the exact names go before the fine-tune's own.
    ranks = {module: min(d_out, d_in) for module, (_name, d_out, d_in) in modules.items()}
    # scale 1: B·A is the update itself
    alphas: dict[str, float] = {m: math.sqrt(k) if config.get("use_rslora") else k for m, k in ranks.items()}
    ranks.update({k: v for k, v in (config.get("rank_pattern") or {}).items() if k not in ranks})
    alphas.update({k: v for k, v in (config.get("alpha_pattern") or {}).items() if k not in alphas})
    config["rank_pattern"], config["alpha_pattern"] = ranks, alphas
    new_scale = LoraAdapter(adapter.directory, config, adapter.store)

    def factors(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        name, d_out, d_in = modules[module]
        old = ft.get(name)
        new = transforms[name](old)
        new = new[0] if isinstance(new, tuple) else new
        delta = (new.to(old.dtype).float() - ft.base.get(name).float()) / new_scale.scale(module)
        if d_in <= d_out:
            return torch.eye(d_in), delta  # A = I, B = ΔW
        return delta, torch.eye(d_out)  # A = ΔW, B = I

    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def produce(tensor: str, module: str | None, which: int) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            if module is None:
                return adapter.store.get(tensor)
            if module not in cache:
                cache[module] = factors(module)
            return cache[module][which].contiguous()
        return fn

    owner: dict[str, tuple[str, int]] = {}
    for module, (a_name, b_name) in adapter.modules.items():
        if module in modules:
            owner[a_name], owner[b_name] = (module, 0), (module, 1)
    producers = {t: produce(t, *owner.get(t, (None, 0))) for t in adapter.store.names}
    return {"config": config, "tensors": _Lazy(producers)}


class _Lazy(Mapping):
    """Tensors produced on first access and kept (adapter outputs are small and read twice)."""

    def __init__(self, producers: dict[str, Callable[[], torch.Tensor]]):
        self._producers = producers
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self._producers[key]()
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._producers)

    def __len__(self) -> int:
        return len(self._producers)
