"""What every repair method is: declared parameters, ``prepare`` (aligned-side work, done once)
and ``apply`` (per fine-tune, tensor by tensor). Methods do no file I/O of their own and print
nothing: they read weights through ``Model`` objects and return a ``Patch`` or an ``Edit``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from realign.calibration import Calibration
from realign.errors import RealignError
from realign.sources import Model

INPUTS = ("base", "calibration", "harmful", "unaligned")


def param(default: Any, help: str, stage: str = "prepare", choices: tuple[str, ...] | None = None) -> Any:
    """A method parameter with its default, a one-line help, and the stage that fixes it:
    ``prepare`` (stored in the patch) or ``apply`` (may be changed per fine-tune)."""
    meta = {"help": help, "stage": stage, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _convert(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(text, inner[0], key)
    if origin is list:
        return [_convert(part.strip(), args[0] if args else str, key) for part in text.split(",") if part.strip()]
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise RealignError(f"--set {key}={text}: expected true or false")
    if annotation in (int, float):
        try:
            value = annotation(text)
        except (ValueError, OverflowError):
            raise RealignError(f"--set {key}={text}: expected {annotation.__name__}") from None
        if not math.isfinite(value):
            raise RealignError(f"--set {key}={text}: use a finite number")
        return value
    return text


def build_params(params_cls: type, values: Mapping[str, Any] | None = None, stage: str | None = None,
                 method: str = "") -> Any:
    """Instantiate a method's parameter dataclass from strings (``--set``) or values, checking names,
    types, choices and (when ``stage`` is given) that only that stage's parameters are changed."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    kwargs = {}
    for key, raw in (values or {}).items():
        if key not in fields:
            raise RealignError(f"{method} has no parameter {key!r}; it has: {', '.join(fields)}")
        f = fields[key]
        value = _convert(raw, hints[key], key) if isinstance(raw, str) else raw
        if isinstance(value, float) and not math.isfinite(value):
            raise RealignError(f"{method}: {key}={value} is not a finite number")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise RealignError(f"--set {key}={value}: {method} accepts {key} in {', '.join(map(str, choices))}")
        kwargs[key] = value
    return params_cls(**kwargs)


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params) if params is not None else {}


def param_help(params_cls: type) -> list[tuple[str, Any, str, str]]:
    """(name, default, stage, help) for each parameter, for --help listings and docs."""
    out = []
    for f in dataclasses.fields(params_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, default, f.metadata.get("stage", "prepare"), f.metadata.get("help", "")))
    return out


@dataclass
class Inputs:
    """Everything a method may read besides the fine-tune. Unused inputs are ignored (and reported)."""

    aligned: Model
    base: Model | None = None
    calibration: Calibration | None = None
    harmful: Model | None = None  # a harmful model (base fine-tuned on harmful data), for HDR
    unaligned: Model | None = None  # an unaligned model (aligned + harmful fine-tune), for RESTA
    template: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    heldout: Calibration | None = None  # calibration rows no method sees: the tuning's validation rows
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)
    _pinned: str | None = field(default=None, repr=False)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # per-fine-tune statistics reused by candidates

    def run_model(self, model: Model):
        """(torch model, tokenizer) for running ``model``; loaded once per Inputs."""
        from realign.compute import load_model

        key = str(model.path)
        if key not in self._loaded:
            self._loaded.clear()  # keep at most one model resident
            self._loaded[key] = load_model(model, device=self.device, dtype=self.dtype)
        return self._loaded[key]

    def release(self) -> None:
        """Drop the loaded model (e.g. before the writer streams a large checkpoint), unless tuning
        holds it (``pin``): then the same copy serves every candidate."""
        if self._pinned is None or self._pinned not in self._loaded:
            self._loaded.clear()

    def pin(self, model: Model) -> None:
        self._pinned = str(model.path)

    def unpin(self) -> None:
        self._pinned = None

    def require(self, name: str, method: str) -> Any:
        value = getattr(self, name)
        if value is None:
            flag = {"calibration": "--calibration FILE"}.get(name, f"--{name} MODEL")
            raise RealignError(f"{method} needs {flag}")
        return value


@dataclass
class Patch:
    """The aligned-side result of ``prepare``: reusable for every fine-tune of the aligned model."""

    method: str
    params: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able method data
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)  # lazy when loaded from disk
    report: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)  # references + hashes, filled by the pipeline
    files: dict[str, bytes] = field(default_factory=dict)  # extra files saved next to the patch (e.g. a figure)


@dataclass
class Added:
    """A tensor the output gains (e.g. a bias), declared up front so the writer can plan shards."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


@dataclass
class Edit:
    """The per-fine-tune result of ``apply``: how each changed tensor is computed from the
    fine-tuned value, tensors to add, config changes, or an adapter when that is the output."""

    # name -> fn(old) giving the new tensor. ``old`` is a fresh CPU tensor the transform owns: it may
    # write into it, and then returns (new tensor, entries changed), since the writer can no longer
    # compare new with old; a transform that returns a tensor alone must leave ``old`` unchanged.
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, int]]] = field(
        default_factory=dict)
    added: dict[str, Added] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None  # {"config": adapter_config, "tensors": {name: tensor}}
    report: dict[str, Any] = field(default_factory=dict)
    dense: bool = True  # False when only the adapter output is possible
    files: dict[str, bytes] = field(default_factory=dict)  # an export for another tool instead of weights
    # what an export adds to module outputs at run time ({module: vector}): how tuning scores it in memory
    additions: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set the class attributes and implement ``apply`` (and ``prepare``
    when they have aligned-side work worth doing once)."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    Params: ClassVar[type]
    needs: ClassVar[tuple[str, ...]] = ()  # inputs that must be given (from INPUTS)
    uses: ClassVar[tuple[str, ...]] = ()  # inputs read when given
    natural_output: ClassVar[str] = "full"  # "adapter" when the method edits LoRA factors

    def prepare(self, inputs: Inputs, params: Any) -> Patch:
        return Patch(self.name, params_dict(params))

    def tune_space(self, patch: Patch, finetuned: Model, params: Any) -> dict[str, list[Any]]:
        """The apply-stage parameters ``--tune`` searches and their values: ``Params.TUNE`` unless a
        method's values depend on the model."""
        return {k: list(v) for k, v in getattr(self.Params, "TUNE", {}).items()}

    @classmethod
    def tunable(cls) -> bool:
        """Whether ``--tune`` has anything to search for this method."""
        return bool(getattr(cls.Params, "TUNE", None)) or cls.tune_space is not Method.tune_space

    def must_tune(self, params: Any) -> list[str]:
        """Parameters left for tuning to choose (e.g. a layer given as none); tuned even without
        ``--tune``."""
        return []

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: Any) -> Edit:
        raise NotImplementedError
