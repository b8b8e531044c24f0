"""The Python API: prepare a patch once, apply it to fine-tunes, or repair in one go.

    from realign import api
    api.repair("nlsr", aligned="aligned/", base="base/", finetuned="ft/", calibration="cal.jsonl", out="out/")
    patch = api.prepare("nlsr", aligned="aligned/", base="base/", calibration="cal.jsonl", out="patch/")
    api.apply("patch/", finetuned="ft/", out="out/")

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from realign.calibration import Calibration, from_rows, load_calibration
from realign.errors import RealignError
from realign.methods import get_method
from realign.methods.base import Edit, Inputs, Method, Patch, build_params, params_dict
from realign.outputs import check_output, input_paths
from realign.progress import progress
from realign.prompts import check_template
from realign.sources import Model, TensorStore, check_finite, check_same_shapes, load_model, weights_sha256
from realign.tensorio import OutTensor, dtype_name, parse_size, write_sharded
from realign.tuning import HELDOUT_FILE, TuneOptions, edited_tensor, heldout_bytes, split_heldout, tune
from realign.writer import (
    TOKENIZER_FILES,
    atomic_output,
    copy_side_files,
    model_card,
    provenance,
    write_adapter,
    write_json,
)

PATCH_FILE = "patch.json"
PATCH_TENSORS = "patch"  # patch-*.safetensors


@dataclass
class Result:
    """What a repair/apply wrote, and its report."""

    out: Path
    output: str  # "checkpoint" or "adapter"
    report: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)


ModelArg = str | os.PathLike | Model | None


def _open(ref: ModelArg, allow_pickle: bool, base: ModelArg = None) -> Model | None:
    if ref is None or isinstance(ref, Model):
        return ref
    base_path = base.path if isinstance(base, Model) else base
    return load_model(ref, base=base_path, allow_pickle=allow_pickle)


def _describe_input(model: Model | None, hashes: bool = True) -> dict[str, Any] | None:
    if model is None:
        return None
    info: dict[str, Any] = {"ref": model.ref, "path": str(model.path)}
    if model.hub_id:
        info["hub_id"] = model.hub_id
        if model.revision:
            info["revision"] = model.revision
    if model.is_adapter and model.base is not None:
        info["base"] = model.base.ref
        if model.base.hub_id:
            info["base_hub_id"] = model.base.hub_id
            if model.base.revision:
                info["base_revision"] = model.base.revision
    if hashes:
        info["sha256"] = weights_sha256(model)
    return info


def _make_inputs(method: Method, aligned, base, calibration, harmful, unaligned, template, device, dtype,
                 allow_pickle, tuning: bool = False) -> tuple[Inputs, list[str]]:
    check_template(template)
    aligned_m = _open(aligned, allow_pickle)
    if aligned_m is None:
        raise RealignError("--aligned MODEL is required")
    cal = load_calibration(calibration) if isinstance(calibration, str | os.PathLike) else calibration
    cal, heldout = split_heldout(cal)  # held-out rows are for tuning only: no method prepares from them
    inputs = Inputs(
        aligned=aligned_m,
        base=_open(base, allow_pickle),
        calibration=cal,
        heldout=heldout,
        harmful=_open(harmful, allow_pickle),
        unaligned=_open(unaligned, allow_pickle),
        template=template,
        device=device,
        dtype=dtype,
    )
    notes = []
    for name in ("base", "calibration", "harmful", "unaligned"):
        given = getattr(inputs, name) is not None
        if name in method.needs and not given:
            inputs.require(name, method.name)
        if given and name not in method.needs and name not in method.uses and not (name == "calibration" and tuning):
            notes.append(f"--{name} was given but {method.name} does not use it; ignored")
    for other in (inputs.base, inputs.harmful, inputs.unaligned):
        if other is not None:
            check_same_shapes(aligned_m, other, "input")
    for model in (aligned_m, inputs.base, inputs.harmful, inputs.unaligned):
        if model is not None:
            check_finite(model)  # before any work; the provenance hashes reuse this read
    return inputs, notes


def _paths_read(inputs: Inputs, *extra: object) -> list[Path]:
    """Every local path a command reads: the models, the calibration file, and ``extra``."""
    cal = inputs.calibration.source if inputs.calibration is not None else None
    return input_paths(inputs.aligned, inputs.base, inputs.harmful, inputs.unaligned, cal, *extra)


def _inputs_record(inputs: Inputs, method: Method) -> dict[str, Any]:
    rec: dict[str, Any] = {"aligned": _describe_input(inputs.aligned)}
    for name in ("base", "harmful", "unaligned"):
        model = getattr(inputs, name)
        if model is not None and (name in method.needs or name in method.uses):
            rec[name] = _describe_input(model)
    if inputs.calibration is not None and ("calibration" in method.needs or "calibration" in method.uses):
        rec["calibration"] = inputs.calibration.describe()
        rec["calibration"]["held_out_for_tuning"] = len(inputs.heldout) if inputs.heldout is not None else 0
    rec["template"] = inputs.template
    return rec


# ----------------------------------------------------------------------------- patches
def save_patch(patch: Patch, out: str | os.PathLike, force: bool = False, inputs: list[Path] | None = None) -> Path:
    with atomic_output(out, force=force, inputs=inputs or []) as tmp:
        tensors = dict(patch.tensors)
        if tensors:
            specs = [OutTensor(n, dtype_name(t.dtype), tuple(t.shape), produce=lambda t=t: t.contiguous())
                     for n, t in tensors.items()]
            write_sharded(tmp, specs, max_shard_bytes=parse_size("2GB"), basename=PATCH_TENSORS)
        for name, data in patch.files.items():
            # Plain names only, and never one of the patch's own files.
            if Path(name).name != name or name == PATCH_FILE or name.startswith(PATCH_TENSORS):
                raise RealignError(f"internal: patch file name {name!r} is not allowed")
            (tmp / name).write_bytes(data)
        write_json(tmp / PATCH_FILE, {
            "format": "realign-patch/1",
            "method": patch.method,
            "params": patch.params,
            "meta": patch.meta,
            "inputs": patch.inputs,
            "report": patch.report,
        })
    return Path(out).resolve()


class _LazyTensors(dict):
    """Patch tensors read from disk on first access, one at a time."""

    def __init__(self, store: TensorStore | None):
        super().__init__()
        self._store = store

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._store is None or key not in self._store:
            raise KeyError(key)
        return self._store.get(key)

    def __contains__(self, key: object) -> bool:
        return self._store is not None and key in self._store

    def keys(self):  # type: ignore[override]
        return list(self._store.names) if self._store else []

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self):  # type: ignore[override]
        return ((k, self[k]) for k in self.keys())


def load_patch(path: str | os.PathLike) -> Patch:
    path = Path(path)
    if not (path / PATCH_FILE).is_file():
        raise RealignError(f"{path} is not a realign patch (no {PATCH_FILE}); make one with `realign prepare`")
    try:
        data = json.loads((path / PATCH_FILE).read_text())
    except ValueError as e:
        raise RealignError(f"{path / PATCH_FILE} is not valid JSON ({e})") from None
    has_tensors = any(path.glob(f"{PATCH_TENSORS}*.safetensors"))
    store = TensorStore(path, prefix=PATCH_TENSORS) if has_tensors else None
    files = {HELDOUT_FILE: (path / HELDOUT_FILE).read_bytes()} if (path / HELDOUT_FILE).is_file() else {}
    return Patch(data["method"], data.get("params", {}), data.get("meta", {}), _LazyTensors(store),
                 data.get("report", {}), data.get("inputs", {}), files)


# ----------------------------------------------------------------------------- the three verbs
def prepare(
    method: str,
    aligned: ModelArg,
    out: str | os.PathLike | None = None,
    base: ModelArg = None,
    calibration: str | os.PathLike | Calibration | None = None,
    harmful: ModelArg = None,
    unaligned: ModelArg = None,
    params: dict[str, Any] | None = None,
    template: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    force: bool = False,
) -> Patch:
    """Do a method's aligned-side work once; save the patch to ``out`` when given.

    ``params={"extend": PATCH}`` (``--extend``, for methods with an ``extend`` parameter) adds to an
    existing patch: the models it records are the defaults for the model inputs not given here."""
    m = get_method(method)
    if (params or {}).get("extend") is not None:
        aligned, base, harmful, unaligned, template = _extended_inputs(
            m, str(params["extend"]), aligned, base, harmful, unaligned, template)  # type: ignore[index]
    p = build_params(m.Params, params, method=method)
    inputs, notes = _make_inputs(m, aligned, base, calibration, harmful, unaligned, template, device, dtype,
                                 allow_pickle)
    read = _paths_read(inputs, (params or {}).get("extend"))
    if out is not None:
        check_output(out, read, force=force)
    start = time.perf_counter()
    patch = _prepared(m, inputs, p, notes, start)
    if out is not None:
        save_patch(patch, out, force=force, inputs=read)
    return patch


def _prepared(m: Method, inputs: Inputs, p: Any, notes: list[str], start: float) -> Patch:
    patch = m.prepare(inputs, p)
    patch.inputs = _inputs_record(inputs, m)
    patch.report.setdefault("notes", []).extend(notes)
    patch.report["prepare_seconds"] = round(time.perf_counter() - start, 3)
    if inputs.heldout is not None:  # apply --tune scores candidates on exactly the rows prepare never saw
        patch.files[HELDOUT_FILE] = heldout_bytes(inputs.heldout)
    return patch


def _extended_inputs(m: Method, extend: str, aligned: ModelArg, base: ModelArg, harmful: ModelArg,
                     unaligned: ModelArg, template: str) -> tuple[ModelArg, ModelArg, ModelArg, ModelArg, str]:
    """The model inputs (and template) of a patch being extended, where the caller gave none."""
    if "extend" not in {f.name for f in dataclasses.fields(m.Params)}:
        raise RealignError(f"{m.name} cannot extend a patch: --extend is for methods with growing patches")
    old = load_patch(extend)
    if old.method != m.name:
        raise RealignError(f"--extend {extend}: it is a {old.method} patch, not {m.name}")

    def recorded(name: str, given: ModelArg) -> ModelArg:
        rec = old.inputs.get(name)
        if given is not None or not isinstance(rec, dict):
            return given
        return rec.get("path") or rec.get("ref")

    if template == "auto":
        template = old.inputs.get("template", "auto")
    return (recorded("aligned", aligned), recorded("base", base), recorded("harmful", harmful),
            recorded("unaligned", unaligned), template)


def _reopen_inputs(patch: Patch, m: Method, overrides: dict[str, ModelArg], template: str | None, device: str,
                   dtype: str, allow_pickle: bool, calibration) -> Inputs:
    """Resolve the models a patch was prepared from again (or the user's overrides)."""
    def ref_of(name: str) -> ModelArg:
        if overrides.get(name) is not None:
            return overrides[name]
        rec = patch.inputs.get(name)
        return rec.get("path") or rec.get("ref") if isinstance(rec, dict) else None

    calib = calibration
    if calib is None and isinstance(patch.inputs.get("calibration"), dict):
        src = patch.inputs["calibration"].get("source")
        if src and Path(src).is_file():
            calib = src
    inputs, _ = _make_inputs(m, ref_of("aligned"), ref_of("base"), calib, ref_of("harmful"),
                             ref_of("unaligned"), template or patch.inputs.get("template", "auto"), device, dtype,
                             allow_pickle)
    return inputs


def apply(
    patch: str | os.PathLike | Patch,
    finetuned: ModelArg,
    out: str | os.PathLike,
    params: dict[str, Any] | None = None,
    output: str = "auto",
    finetuned_base: ModelArg = None,
    aligned: ModelArg = None,
    base: ModelArg = None,
    harmful: ModelArg = None,
    unaligned: ModelArg = None,
    calibration: str | os.PathLike | Calibration | None = None,
    template: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    allow_pickle: bool = False,
    force: bool = False,
    tune: bool | TuneOptions = False,
    log: Callable[[str], None] | None = None,
    _inputs: Inputs | None = None,
) -> Result:
    """Apply a prepared patch to one fine-tune and write the repaired model to ``out``.

    ``tune=True`` (or a ``TuneOptions``) first chooses the method's apply-stage setting for this
    fine-tune from forward passes over held-out rows (``realign.tuning``); parameters given in
    ``params`` stay as given. The chosen setting is recorded like any parameter."""
    if output not in ("auto", "checkpoint", "adapter"):
        raise RealignError(f"unknown output {output!r}: use auto, checkpoint or adapter")
    patch_obj = patch if isinstance(patch, Patch) else load_patch(patch)
    m = get_method(patch_obj.method)
    # Parameters fixed at prepare time stay; only apply-stage ones may change per fine-tune.
    merged = dict(patch_obj.params)
    fields = {f.name: f for f in dataclasses.fields(m.Params)}
    for key, value in (params or {}).items():
        fixed = key in fields and fields[key].metadata.get("stage", "prepare") != "apply"
        if fixed and isinstance(patch, str | os.PathLike):
            raise RealignError(f"{key} is fixed when the patch is prepared; run `realign prepare` again to change it")
        merged[key] = value
    p = build_params(m.Params, merged, method=m.name)
    inputs = _inputs or _reopen_inputs(
        patch_obj, m, {"aligned": aligned, "base": base, "harmful": harmful, "unaligned": unaligned}, template,
        device, dtype, allow_pickle, calibration)
    ft = _open(finetuned, allow_pickle, base=finetuned_base)
    if ft is None:
        raise RealignError("--finetuned MODEL is required")
    check_same_shapes(inputs.aligned, ft)
    check_finite(ft)
    options = tune if isinstance(tune, TuneOptions) else TuneOptions() if tune else None
    if options is not None:
        options.check()
    read = _paths_read(inputs, ft, patch if isinstance(patch, str | os.PathLike) else None,
                       options.task_data if options else None)
    check_output(out, read, force=force)
    parse_size(max_shard_size)  # a size it cannot read is an error now, not after the work
    start = time.perf_counter()
    tuning = _tune(m, patch_obj, ft, inputs, p, merged, set(params or {}), options, log)
    if tuning is not None:
        merged.update(tuning.params)
        p = build_params(m.Params, merged, method=m.name)
    edit = m.apply(patch_obj, ft, inputs, p)
    if edit.files and output != "auto":
        raise RealignError(f"{m.name} in this mode writes files for another tool, not model weights: drop --output")
    # auto: an adapter when only an adapter is possible, or when the method's natural output is one.
    want_adapter = output == "adapter" or (output == "auto" and edit.adapter is not None
                                           and (not edit.dense or m.natural_output == "adapter"))
    if output == "adapter" and edit.adapter is None:
        raise RealignError(
            f"{m.name} produces dense weights for this fine-tune, not an adapter: use --output checkpoint"
        )
    if not want_adapter and not edit.dense and not edit.files:
        raise RealignError(f"{m.name} in this mode produces an adapter only: use --output adapter")
    report = dict(patch_obj.report.get("apply_defaults", {}))
    report.update(edit.report)
    if tuning is not None:
        report["tuning"] = tuning.report
    report.setdefault("notes", [])
    report["notes"] = list(patch_obj.report.get("notes", [])) + report["notes"]
    inputs_rec = dict(patch_obj.inputs) if patch_obj.inputs else _inputs_record(inputs, m)
    inputs_rec["finetuned"] = _describe_input(ft)
    with atomic_output(out, force=force, inputs=read) as tmp:
        if edit.files:  # an export for another tool (e.g. a steering file), no weights
            for name, data in edit.files.items():
                (tmp / name).write_bytes(data)
            kind = "export"
        elif want_adapter:
            _write_adapter_output(tmp, ft, edit, report, out)
            kind = "PEFT LoRA adapter"
        else:
            _write_checkpoint(tmp, ft, edit, report, parse_size(max_shard_size))
            kind = "full Hugging Face checkpoint"
        report["seconds"] = round(time.perf_counter() - start, 3)
        prov = provenance(m.name, {**params_dict(p)}, inputs_rec, report, kind)
        write_json(tmp / "realign.json", prov)
        if "README.md" not in edit.files:
            (tmp / "README.md").write_text(model_card(prov))
    written = "export" if edit.files else "adapter" if want_adapter else "checkpoint"
    return Result(Path(out).resolve(), written, report, time.perf_counter() - start, report.get("notes", []))


def repair(
    method: str,
    aligned: ModelArg,
    finetuned: ModelArg,
    out: str | os.PathLike,
    base: ModelArg = None,
    calibration: str | os.PathLike | Calibration | None = None,
    harmful: ModelArg = None,
    unaligned: ModelArg = None,
    params: dict[str, Any] | None = None,
    output: str = "auto",
    finetuned_base: ModelArg = None,
    template: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    allow_pickle: bool = False,
    force: bool = False,
    tune: bool | TuneOptions = False,
    log: Callable[[str], None] | None = None,
) -> Result:
    """prepare + apply in one go (the patch is kept in the output's realign.json report);
    ``tune`` as in ``apply``."""
    check_output(out, input_paths(aligned, finetuned, finetuned_base, base, harmful, unaligned, calibration),
                 force=force)
    parse_size(max_shard_size)
    m = get_method(method)
    p = build_params(m.Params, params, method=method)
    inputs, notes = _make_inputs(m, aligned, base, calibration, harmful, unaligned, template, device, dtype,
                                 allow_pickle, tuning=bool(tune) or bool(m.must_tune(p)))
    ft = _open(finetuned, allow_pickle, base=finetuned_base)
    if ft is None:
        raise RealignError("--finetuned MODEL is required")
    check_same_shapes(inputs.aligned, ft)
    check_finite(ft)
    check_output(out, _paths_read(inputs, ft), force=force)
    start = time.perf_counter()
    patch = _prepared(m, inputs, p, notes, start)
    result = apply(patch, ft, out, params=params, output=output, max_shard_size=max_shard_size,
                   force=force, tune=tune, log=log, _inputs=inputs)
    result.report["prepare"] = {k: v for k, v in patch.report.items() if k != "notes"}
    return result


def _tune(m: Method, patch: Patch, ft: Model, inputs: Inputs, p: Any, merged: dict[str, Any], given: set[str],
          options: TuneOptions | None, log: Callable[[str], None] | None):
    """Run the tuning loop when asked, or when the method left parameters for it to choose."""
    must = m.must_tune(p)
    if options is None and not must:
        return None
    space = m.tune_space(patch, ft, p)
    # what the user fixed stays fixed; without --tune only the parameters left open are searched
    space = {k: v for k, v in space.items() if k not in given and (options is not None or k in must)}
    if not space:
        return None
    if options is None:
        options = TuneOptions(fallback="default")
    heldout = inputs.heldout
    if HELDOUT_FILE in patch.files:
        heldout = from_rows((json.loads(line) for line in patch.files[HELDOUT_FILE].decode().splitlines()
                             if line.strip()), source="patch held-out rows")
    if heldout is None:
        raise RealignError(f"tuning {m.name} needs held-out calibration rows: give --calibration FILE with enough rows "
                           "(harmful rows with safe_response, benign rows with response)")

    def build(setting: dict[str, Any]) -> Any:
        return build_params(m.Params, {**merged, **setting}, method=m.name)

    return tune(m, patch, ft, inputs, p, space, heldout, options, build, log)


# ----------------------------------------------------------------------------- writing
def _linear_numel(model: Model) -> int:
    return sum(math.prod(model.shape(n)) for _, _, n in model.arch.linear_weights())


def _write_checkpoint(tmp: Path, ft: Model, edit: Edit, report: dict, max_shard_bytes: int) -> None:
    counts = {"tensors_changed": 0, "parameters_changed": 0, "parameters_added": 0}
    per_tensor: dict[str, int] = {}
    store = ft.weights
    specs: list[OutTensor] = []
    adapter_touched = ft.adapter_tensors  # read through the adapter, never copied from the base's files
    for name in ft.tensor_names:
        dtype, shape = ft.dtype(name), ft.shape(name)
        if name in edit.transforms:
            def produce(name=name, fn=edit.transforms[name]) -> torch.Tensor:
                # the same function tuning applies in memory: what was scored is what is written
                new, changed = edited_tensor(ft, name, fn)
                if changed:
                    counts["tensors_changed"] += 1
                    counts["parameters_changed"] += changed
                    per_tensor[name] = changed
                return new
            specs.append(OutTensor(name, dtype_name(dtype), tuple(shape), produce=produce))
        elif name in adapter_touched or store.info(name) is None:
            specs.append(OutTensor(name, dtype_name(dtype), tuple(shape), produce=lambda name=name: ft.get(name)))
        else:
            specs.append(OutTensor(name, dtype_name(dtype), tuple(shape), copy_from=store.info(name)))
    for name, added in edit.added.items():
        def produce_added(fn=added.produce, name=name) -> torch.Tensor:
            new = fn()
            if new.is_floating_point() and not bool(torch.isfinite(new).all()):
                raise RealignError(f"{name} would hold NaN or infinite values; nothing was written")
            # Zeros added only for the config's sake (e.g. q/k/v biases next to a baked o_proj bias) edit nothing.
            counts["parameters_added"] += int(torch.count_nonzero(new))
            return new
        specs.append(OutTensor(name, dtype_name(added.dtype), tuple(added.shape), produce=produce_added))
    bar = progress(range(len(specs)), desc="writing tensors", total=len(specs), unit="tensor")
    write_sharded(tmp, specs, max_shard_bytes=max_shard_bytes, on_tensor=lambda _t: next(bar, None))
    config = json.loads((ft.config_dir / "config.json").read_text())
    config.update(ft.config_updates)  # what an adapter's dense view changes (e.g. an untied output layer)
    config.update(edit.config_updates)
    write_json(tmp / "config.json", _without_remote_code(config, report))
    copy_side_files([ft.tokenizer_dir, ft.config_dir], tmp, TOKENIZER_FILES + ("generation_config.json",))
    tok_config = tmp / "tokenizer_config.json"
    if tok_config.is_file():
        data = json.loads(tok_config.read_text())
        if isinstance(data, dict) and REMOTE_CODE_KEYS & set(data):
            write_json(tok_config, _without_remote_code(data, report))
    total = ft.num_parameters()
    added = counts["parameters_added"]
    linear = {name for _l, _r, name in ft.arch.linear_weights()}
    linear_changed = sum(n for name, n in per_tensor.items() if name in linear)
    report["totals"] = {
        **report.get("totals", {}),
        "tensors_changed": counts["tensors_changed"],
        "parameters_changed": counts["parameters_changed"],
        "parameters_total": total,
        "percent_changed": round(100.0 * counts["parameters_changed"] / max(total, 1), 4),
        # only the changes IN the linear weights (a revert also changes embeddings and norms)
        "linear_parameters_changed": linear_changed,
        "percent_of_linear_weights": round(100.0 * linear_changed / max(_linear_numel(ft), 1), 4),
        "tensors_added": len(edit.added),
        "parameters_added": added,
        # Changed and added together (e.g. baked biases), of all parameters: the demo's "edited" column.
        "percent_edited": round(100.0 * (counts["parameters_changed"] + added) / max(total, 1), 4),
    }
    report["changed_per_tensor"] = per_tensor


REMOTE_CODE_KEYS = {"auto_map", "trust_remote_code"}


def _without_remote_code(config: dict, report: dict) -> dict:
    """realign only writes families transformers builds itself: an output never asks its loader to
    run code from the hub (an input's ``auto_map`` would)."""
    dropped = sorted(REMOTE_CODE_KEYS & set(config))
    if dropped:
        report.setdefault("notes", []).append(f"dropped {', '.join(dropped)} from the output's config: the output "
                                              "loads with transformers' own classes, no remote code")
    return {k: v for k, v in config.items() if k not in REMOTE_CODE_KEYS}


def portable_base(base: Model, out: str | os.PathLike) -> tuple[str, str | None]:
    """How an adapter written to ``out`` names its base: the hub id (and revision) when the base came
    from the hub, else the base's path relative to ``out`` (so the two can move together; realign
    resolves it against the adapter directory). The absolute path goes to realign.json only."""
    if base.hub_id:
        return base.hub_id, base.revision
    target = Path(base.path).resolve()
    return os.path.relpath(target, Path(out).resolve()), None


def _write_adapter_output(tmp: Path, ft: Model, edit: Edit, report: dict, out: str | os.PathLike) -> None:
    assert edit.adapter is not None
    config = dict(edit.adapter["config"])
    if ft.base is not None:
        config["base_model_name_or_path"], config["revision"] = portable_base(ft.base, out)
        report["base_model"] = {"written": config["base_model_name_or_path"], "revision": config["revision"],
                                "path": str(Path(ft.base.path).resolve())}
    write_adapter(tmp, config, edit.adapter["tensors"])
    copy_side_files([ft.path] if ft.is_adapter else [], tmp, TOKENIZER_FILES)
    changed = 0
    if ft.adapter is not None:
        for name, t in edit.adapter["tensors"].items():
            if name in ft.adapter.store:
                old = ft.adapter.store.get(name)
                # A factor whose rank changed is new as a whole.
                changed += int(torch.count_nonzero(old.to(t.dtype) != t)) if old.shape == t.shape else t.numel()
    total = sum(t.numel() for t in edit.adapter["tensors"].values())
    report["totals"] = {
        **report.get("totals", {}),
        "adapter_parameters_changed": changed,
        "adapter_parameters_total": total,
        "percent_changed": round(100.0 * changed / max(total, 1), 4),
    }
