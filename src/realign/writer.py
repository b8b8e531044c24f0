"""Output directories: written in a temporary directory next to the target and renamed at the
end, so an interrupted run never leaves anything that looks like a finished model."""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


def model_card(prov: dict) -> str:
    report = prov.get("report", {})
    totals = report.get("totals", {})
    lines = [
        "---",
        "tags: [realign, safety-realignment]",
        "---",
        f"# Safety-realigned model ({prov['method']})",
        "",
        f"This checkpoint was produced by realign {prov['version']} with the `{prov['method']}` method "
        f"on {prov['date']}. It is a {prov['output']}.",
        "",
        "## Inputs",
    ]
    for role, info in prov["inputs"].items():
        if isinstance(info, dict) and info.get("ref"):
            lines.append(f"- {role}: `{info['ref']}`")
    lines += ["", "## Parameters", ""]
    lines += [f"- `{k}` = `{v}`" for k, v in prov["parameters"].items()] or ["- (none)"]
    if totals:
        lines += ["", "## What changed", ""]
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in totals.items()]
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "Full provenance (input hashes, per-module report): `realign.json`.", ""]
    return "\n".join(lines)


def write_adapter(dst: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A PEFT LoRA adapter directory (adapters are small: written in one piece)."""
    write_json(dst / "adapter_config.json", config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"),
              metadata={"format": "pt"})
