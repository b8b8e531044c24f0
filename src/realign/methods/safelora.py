"""safelora: project the fine-tune's updates of the modules that drift from the alignment onto the
alignment subspace (Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
Fine-tuning Large Language Models"; IBM/SafeLoRA).

Per decoder linear module, with V = W_a − W_b (the alignment update) and C = V Vᵀ / ‖V‖_F:

    cos = cos(vec(C ΔW), vec(ΔW)),  ΔW = W_f − W_a
    mode topk (the official default): project the k = 10 lowest-cosine modules
    mode threshold: project every module with round(cos, 5) ≤ τ (the official test), or cos < τ
    projected: ΔW ← C ΔW      (a LoRA fine-tune: B ← C B, since C (s B A) = s (C B) A)

Tuning (``--tune``) searches k in the default mode (1, 2, 5, 10, 20, 40, … up to every module) and
τ in threshold mode.

C is d_out × d_out and never stored: C X is evaluated as V (Vᵀ X) / ‖V‖_F, or as (V Vᵀ) X / ‖V‖_F
when that is cheaper (d_out < d_in and X has many columns — then the d_out² intermediate is
smaller than the weight itself). For a LoRA fine-tune on the aligned model the output is an
adapter (the fine-tune's adapter with the projected B factors); ``--output checkpoint`` gives the
same model merged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param
from realign.progress import progress
from realign.sources import Model


@dataclass
class SafeLoraParams:
    mode: str = param("topk", "topk (official default): project the k lowest-cosine modules; threshold: the modules "
                      "whose cosine passes threshold_rule against tau", stage="apply", choices=("topk", "threshold"))
    k: int = param(10, "number of modules projected in mode=topk", stage="apply")
    tau: float = param(0.5, "cosine threshold of mode=threshold", stage="apply")
    threshold_rule: str = param("official", "mode=threshold: official = project when cos rounded to 5 decimals is "
                                "≤ tau; strict = when cos < tau (unrounded)", stage="apply",
                                choices=("official", "strict"))


TAU_GRID = (0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0)  # --tune in mode=threshold


def k_grid(modules: int) -> list[int]:
    """--tune in mode=topk: 1, 2, 5, then 10, 20, 40, … below the number of modules, and all of them."""
    values = [1, 2, 5] + [10 * 2 ** i for i in range(32) if 10 * 2 ** i < modules]
    return sorted({v for v in values if v < modules} | {modules})


def passes(cos: float, tau: float, rule: str) -> bool:
    """The threshold test: the official code projects when round(cos, 5) ≤ tau."""
    return round(cos, 5) <= tau if rule == "official" else cos < tau


def project(v: torch.Tensor, x: torch.Tensor, v_norm: float) -> torch.Tensor:
    """C x with C = V Vᵀ / ‖V‖_F (float32), choosing the cheaper association."""
    d_out, d_in = v.shape
    n = x.shape[1]
    if d_out * d_out * (d_in + n) < 2 * d_out * d_in * n:
        return ((v @ v.T) @ x) / v_norm
    return (v @ (v.T @ x)) / v_norm


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float((a * b).sum()) / (na * nb)


def _factor_cosine(p: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """cos(vec(P A), vec(B A)) from r × r products only (no d_out × d_in matrix)."""
    g = a @ a.T
    dot = float(((p.T @ b) * g).sum())
    np_, nb = float(((p.T @ p) * g).sum()), float(((b.T @ b) * g).sum())
    if np_ <= 0.0 or nb <= 0.0:
        return float("nan")
    return dot / math.sqrt(np_ * nb)


def _same_model(a: Model, b: Model) -> bool:
    return Path(a.path).resolve() == Path(b.path).resolve()


def adapter_config_for_output(ft: Model) -> dict[str, Any]:
    """The fine-tune's adapter config, with a local base made absolute so the output loads anywhere."""
    assert ft.adapter is not None and ft.base is not None
    cfg = copy.deepcopy(ft.adapter.config)
    if Path(ft.base.path).exists():
        cfg["base_model_name_or_path"] = str(Path(ft.base.path).resolve())
    return cfg


@register
class SafeLora(Method):
    name = "safelora"
    title = "Safe LoRA: project drifting updates onto the alignment subspace"
    paper = "Hsu et al. 2024, Safe LoRA (NeurIPS 2024)"
    Params = SafeLoraParams
    needs = ("base",)
    natural_output = "adapter"

    def tune_space(self, patch: Patch, finetuned: Model, params: SafeLoraParams) -> dict[str, list[Any]]:
        if params.mode == "threshold":
            return {"tau": list(TAU_GRID)}
        modules = (len(finetuned.adapter.modules) if finetuned.adapter is not None
                   else len(finetuned.arch.linear_weights()))
        return {"k": k_grid(modules)}

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: SafeLoraParams) -> Edit:
        aligned, base = inputs.aligned, inputs.require("base", self.name)
        arch = aligned.arch
        # Factor mode only when the adapter sits on the aligned model itself: then ΔW = s·B·A exactly.
        factor_mode = finetuned.is_adapter and finetuned.base is not None and _same_model(finetuned.base, aligned)
        notes = []
        if finetuned.is_adapter and not factor_mode:
            notes.append("the adapter's base is not the aligned model: projected dense updates, no adapter output")

        cosines: dict[str, float] = {}
        projected_b: dict[str, torch.Tensor] = {}  # module -> C·B (factor mode; adapters are small)
        skipped_no_alignment = []
        for _layer, _role, name in progress(arch.linear_weights(), desc="safelora cosines",
                                            total=len(arch.linear_weights()), unit="module"):
            module = name.removesuffix(".weight")
            factors = finetuned.lora_factors(name) if factor_mode else None
            if factor_mode and factors is None:
                continue  # the adapter does not touch this module: ΔW = 0
            v = aligned.get(name).float() - base.get(name).float()
            v_norm = float(v.norm())
            if v_norm == 0.0:
                skipped_no_alignment.append(module)
                continue
            if factors is not None:
                a, b = factors[0].float(), factors[1].float()
                p = project(v, b, v_norm)
                cos = _factor_cosine(p, b, a)
                # rounded to B's dtype once, so the adapter and the dense output are the same model
                projected_b[module] = p.to(factors[1].dtype)
            else:
                delta = finetuned.get(name).float() - aligned.get(name).float()
                cos = _cosine(project(v, delta, v_norm), delta)
            if not math.isnan(cos):
                cosines[module] = cos

        if params.k < 0:
            raise RealignError(f"--set k={params.k}: use a number of modules ≥ 0")
        if params.mode == "topk":
            chosen = sorted(cosines, key=lambda m: cosines[m])[: params.k]
        else:
            chosen = [m for m, c in cosines.items() if passes(c, params.tau, params.threshold_rule)]
        chosen_set = set(chosen)

        transforms = {}
        for module in chosen:
            name = f"{module}.weight"
            if factor_mode:
                def fn(_old: torch.Tensor, name: str = name, module: str = module) -> torch.Tensor:
                    a, _b, s = finetuned.lora_factors(name)  # type: ignore[misc]
                    return aligned.get(name).float() + s * (projected_b[module].float() @ a.float())
            else:
                def fn(old: torch.Tensor, name: str = name) -> torch.Tensor:
                    w_a = aligned.get(name).float()
                    v = w_a - base.get(name).float()
                    return w_a + project(v, old.float() - w_a, float(v.norm()))
            transforms[name] = fn

        adapter = None
        if factor_mode:
            assert finetuned.adapter is not None
            store = finetuned.adapter.store
            tensors = {n: store.get(n) for n in store.names}
            for module, (_a_name, b_name) in finetuned.adapter.modules.items():
                if module in chosen_set:
                    tensors[b_name] = projected_b[module]
            adapter = {"config": adapter_config_for_output(finetuned), "tensors": tensors}

        values = list(cosines.values())
        report: dict[str, Any] = {
            "rule": "per module: if cos(vec(C dW), vec(dW)) is low, dW <- C dW with C = V V^T / ||V||_F, V = W_a - W_b"
                    + (" (LoRA: B <- C B)" if factor_mode else ""),
            "mode": params.mode,
            **({"threshold": params.tau, "threshold_rule": params.threshold_rule} if params.mode == "threshold"
               else {"k": params.k}),
            "edits": "lora_factors" if factor_mode else "dense",
            "modules_considered": len(cosines),
            "modules_changed": len(chosen),
            "projected_modules": chosen,
            "cosine": {m: round(c, 6) for m, c in cosines.items()},
            "cosine_min": round(min(values), 6) if values else None,
            "cosine_mean": round(sum(values) / len(values), 6) if values else None,
            "notes": notes + ([f"{len(skipped_no_alignment)} modules have W_a == W_b (no alignment subspace); "
                               "left as fine-tuned"] if skipped_no_alignment else []),
        }
        return Edit(transforms=transforms, adapter=adapter, report=report)
