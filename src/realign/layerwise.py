"""Calibration data through a decoder one layer at a time (SparseGPT's scheme), for methods that
need per-layer statistics of a model whose earlier layers they may already have edited.

    with Layerwise(model, arch, encoded) as run:
        for layer in run:                       # layer 0, 1, …, in order
            stats = layer.collect(gram=[...])   # all batches through this layer, hooks summing
            ...                                 # optionally write new weights into layer.module
        # the runner then computes this layer's outputs, with its weights as they are now: the
        # inputs of the next layer

The inputs of layer 0 (the embeddings, scaled as the model scales them) are captured once; after
that only the hidden states entering the current layer are kept, one tensor per batch, and each
is replaced by the layer's output when the runner moves on. The extra arguments a decoder layer
takes (attention mask, rotary position embeddings, position ids; per layer type where a family
mixes sliding-window and full attention) are the model's own: for each batch the model's forward
is run up to the layer in question with the layers before it stubbed out, which costs an
embedding lookup and the mask and rotary computations, not a layer.

Cost: every layer runs once per batch to collect its statistics, and once more after an edit to
produce the next layer's inputs (with ``edits=False`` the first run's outputs are kept and there
is no second run: exactly one forward pass, without the LM head). The last layer is never re-run.

Memory: the model, one layer's statistics, and the hidden states of the whole calibration set at
one layer (N × T × hidden in the model's dtype, e.g. 2000 × 512 × 4096 × 2 bytes = 8.4 GB for
Llama-3-8B). They stay on the compute device up to ``max_bytes`` (default: half of the memory
free on that device when the run starts, from ``torch.cuda.mem_get_info`` or MemAvailable);
the batches beyond it are written to a temporary directory (``torch.save``) and read back
memory-mapped when their turn comes, so a calibration set of any size runs, at the cost of disk
traffic. The directory is removed when the run ends (``close``, or leaving the ``with`` block).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from realign.archs import LAYER_PREFIX, Arch
from realign.progress import progress
from realign.stats import Accumulator, Encoded, Stats, padded, position_mask

# Roles that read the same input (the layer's normed hidden state): one input statistic serves them all.
SHARED_INPUT = (("q", "k", "v"), ("gate", "up"))


def shared_input_groups(roles: Sequence[str]) -> list[tuple[str, ...]]:
    """Partition a layer's roles into groups that read the same input (``SHARED_INPUT``; any other
    role alone), in the order of ``SHARED_INPUT`` and then of ``roles``."""
    out, seen = [], set()
    for group in SHARED_INPUT:
        present = tuple(r for r in group if r in roles)
        if present:
            out.append(present)
            seen.update(present)
    out.extend((r,) for r in roles if r not in seen)
    return out


def input_requests(model, modules: Sequence[tuple[str, str, str]], *, sqnorm: bool = False, gram: bool = False,
                   project: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """``Layer.collect``'s requests for one layer's linear modules, given as (role, weight name,
    module name): one statistic per shared input (``shared_input_groups``), stored under the
    group's first module. ``sqnorm``: Σ x_j²; ``gram``: the smaller of one d_in² input Gram and a
    d_out² output Gram per module of the group; ``project``: {module: P}, P·XᵀX·Pᵀ per module
    (instead of ``gram``)."""
    req: dict[str, Any] = {"gram": [], "out_gram": [], "sqnorm": [], "project": {}}
    by_role = {role: (name, module) for role, name, module in modules}
    for group in shared_input_groups(list(by_role)):
        first = by_role[group[0]][1]
        if sqnorm:
            req["sqnorm"].append(first)
        if project is not None:
            req["project"].update({by_role[r][1]: project[by_role[r][1]] for r in group})
        elif gram:
            d_in = model.get_parameter(by_role[group[0]][0]).shape[1]
            d_outs = [model.get_parameter(by_role[r][0]).shape[0] for r in group]
            if d_in * d_in <= sum(d * d for d in d_outs):
                req["gram"].append(first)
            else:
                req["out_gram"].extend(by_role[r][1] for r in group)
    return req


class _Caught(Exception):
    """Raised by a stubbed layer to stop the model's forward once its arguments are known."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("layer arguments captured")
        self.call = (args, kwargs)


def default_budget(device: torch.device) -> int:
    """Half of the memory free on ``device`` now (bytes)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


class HiddenStore:
    """Per-batch hidden states: on ``device`` while they fit in ``max_bytes``, else in files of a
    temporary directory, read back memory-mapped. A batch keeps its place (memory or disk) when
    it is replaced, so which batches spill does not change from layer to layer."""

    def __init__(self, device: torch.device, max_bytes: int):
        self.device = device
        self.max_bytes = max_bytes
        self.resident: dict[int, torch.Tensor] = {}
        self.files: dict[int, Path] = {}
        self.used = 0
        self._dir: Path | None = None
        self._version = 0

    def put(self, i: int, x: torch.Tensor) -> None:
        size = x.numel() * x.element_size()
        if i in self.resident:
            old = self.resident.pop(i)
            self.used -= old.numel() * old.element_size()
        if i not in self.files and self.used + size <= self.max_bytes:
            self.resident[i] = x.detach().to(self.device)
            self.used += size
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="realign-layerwise-"))
        self._version += 1
        path = self._dir / f"batch{i}.{self._version}.pt"  # a new name: the old file may still be mapped
        torch.save(x.detach().cpu().contiguous(), path)
        old_path = self.files.get(i)
        self.files[i] = path
        if old_path is not None:
            old_path.unlink(missing_ok=True)

    def get(self, i: int) -> torch.Tensor:
        if i in self.resident:
            return self.resident[i]
        return torch.load(self.files[i], mmap=True, weights_only=True).to(self.device)

    @property
    def spilled(self) -> int:
        return len(self.files)

    def close(self) -> None:
        self.resident.clear()
        self.files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class _Batch:
    ids: torch.Tensor
    attn: torch.Tensor
    mask: torch.Tensor  # (B, T) bool: the positions statistics read


class Layer:
    """One decoder layer during a ``Layerwise`` run."""

    def __init__(self, run: Layerwise, index: int):
        self.run = run
        self.index = index
        self.module: torch.nn.Module = run.layers[index]
        self.collected = False

    def collect(self, *, gram: Sequence[str] = (), out_gram: Sequence[str] = (), sqnorm: Sequence[str] = (),
                capture: Sequence[str] = (), project: Mapping[str, torch.Tensor] | None = None) -> Stats:
        """Run every batch through this layer, summing the statistics of ``realign.stats.collect``
        for the named linear modules (which must belong to this layer) over the selected positions."""
        return self.run._collect(self, dict(gram=gram, out_gram=out_gram, sqnorm=sqnorm, capture=capture,
                                            project=project))


class Layerwise:
    """Iterate over the decoder layers of ``model`` with the calibration data at their inputs.

    ``positions`` selects the token positions statistics sum over (``realign.stats.position_mask``).
    ``edits``: whether the caller may change a layer's weights after collecting its statistics;
    without edits each layer runs once. ``max_bytes``: hidden states kept in memory (see the
    module docstring)."""

    def __init__(self, model, arch: Arch, encoded: Sequence[Encoded], *, positions: str = "response",
                 batch_size: int = 8, edits: bool = True, max_bytes: int | None = None,
                 desc: str = "layer by layer"):
        self.model = model
        self.arch = arch
        self.device = next(model.parameters()).device
        self.layers = model.get_submodule(LAYER_PREFIX.format(layer=0).rsplit(".", 1)[0])
        self.edits = edits
        self.desc = desc
        self.batches: list[_Batch] = []
        for start in range(0, len(encoded), batch_size):
            batch = list(encoded[start:start + batch_size])
            ids, attn = padded(batch)
            self.batches.append(_Batch(ids, attn, position_mask(batch, ids.shape[1], positions)))
        self.store = HiddenStore(self.device, default_budget(self.device) if max_bytes is None else max_bytes)
        self._outputs_kept = False

    # -------------------------------------------------------------------------- the run
    def __iter__(self) -> Iterator[Layer]:
        with torch.no_grad():
            for b, batch in enumerate(self.batches):
                args, _kwargs = self._call(0, batch)
                self.store.put(b, args[0])
        for index in range(len(self.layers)):
            layer = Layer(self, index)
            self._outputs_kept = False
            yield layer
            if index + 1 < len(self.layers) and not self._outputs_kept:
                with torch.no_grad():
                    for b, batch in enumerate(progress(self.batches, desc=f"{self.desc}: layer {index} outputs",
                                                       unit="batch")):
                        self.store.put(b, self._run(layer.module, index, b, batch))

    def _collect(self, layer: Layer, requests: dict[str, Any]) -> Stats:
        stats = Stats()
        acc = Accumulator(self.model, stats, **requests)
        # Without edits, this pass's outputs are the next layer's inputs (kept once: a second
        # collect on the same layer would otherwise run on its own outputs).
        keep = not self.edits and not layer.collected and layer.index + 1 < len(self.layers)
        try:
            with torch.no_grad():
                for b, batch in enumerate(progress(self.batches, desc=f"{self.desc}: layer {layer.index}",
                                                   unit="batch")):
                    acc.batch(batch.mask)
                    out = self._run(layer.module, layer.index, b, batch)
                    if keep:
                        self.store.put(b, out)
            acc.finish()
        finally:
            acc.remove()
        layer.collected = True
        self._outputs_kept = self._outputs_kept or keep
        return stats

    def _run(self, module: torch.nn.Module, index: int, b: int, batch: _Batch) -> torch.Tensor:
        _args, kwargs = self._call(index, batch)
        out = module(self.store.get(b), **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _call(self, index: int, batch: _Batch) -> tuple[tuple, dict]:
        """The arguments the model passes to layer ``index`` for ``batch``: its forward, with the
        layers before ``index`` passing their input through and layer ``index`` stopping it."""
        def passthrough(hidden_states, *_args, **_kwargs):
            return hidden_states

        def stop(*args, **kwargs):
            raise _Caught(args, kwargs)

        stubs = [(self.layers[i], passthrough) for i in range(index)] + [(self.layers[index], stop)]
        saved = [(m, m.__dict__.get("forward")) for m, _ in stubs]  # accelerate may have wrapped forward
        for m, fn in stubs:
            m.forward = fn
        try:
            self.model(input_ids=batch.ids.to(self.device), attention_mask=batch.attn.to(self.device), use_cache=False)
        except _Caught as caught:
            args, kwargs = caught.call
            if not args:  # hidden_states given by name
                args = (kwargs.pop("hidden_states"),)
            return args, kwargs
        finally:
            for m, fn in saved:
                if fn is None:
                    del m.forward
                else:
                    m.forward = fn
        raise RuntimeError(f"decoder layer {index} was never called by the model's forward")

    # -------------------------------------------------------------------------- cleanup
    @property
    def spilled(self) -> int:
        """Batches whose hidden states are on disk."""
        return self.store.spilled

    def notes(self) -> list[str]:
        """What a report should say about the run (hidden states that went through a file)."""
        if not self.spilled:
            return []
        return [f"the hidden states of {self.spilled} of {len(self.batches)} calibration batches did not fit in "
                "half the free memory and went through a temporary file"]

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Layerwise:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
