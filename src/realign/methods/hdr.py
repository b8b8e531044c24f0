"""hdr: harm direction removal, the first stage of Safety Arithmetic (Hazra et al. 2024, "Safety
Arithmetic: A Framework for Test-time Safety Alignment of Language Models by Steering Parameters
and Activations").

    τ_H = W_h − W_b        W_h: a harmful model (the base fine-tuned on harmful data, ``--harmful``)
    τ̂_H = τ_H with all but its largest-magnitude ``keep`` fraction of entries set to zero
    W_out = W_f − λ τ̂_H

The top-``keep`` selection is made per weight matrix (each tensor keeps its own largest 10 %),
not over the whole model: a global threshold needs a full pass over τ_H before the first tensor
can be written, and lets tensors of large scale (embeddings) take the whole budget. Per matrix,
every tensor is edited from its own three inputs, streaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param
from realign.methods.resta import SCOPES, scoped_names
from realign.sources import Model


@dataclass
class HdrParams:
    # --tune: how much of the harm direction is removed
    TUNE: ClassVar[dict[str, tuple]] = {"lam": (3.0, 0.5, 1.0, 2.0, 4.0, 6.0)}
    lam: float = param(3.0, "λ: W_out = W_f - λ · trimmed (W_h - W_b)", stage="apply")
    keep: float = param(0.1, "fraction of τ_H entries kept per tensor (largest magnitude)", stage="apply")
    scope: str = param("all", "all: every weight tensor; linear: decoder linear weights only", stage="apply",
                       choices=SCOPES)


def top_mask(tau: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool mask of exactly ceil(keep · numel) largest-magnitude entries of ``tau`` (ties at the
    threshold broken by position). A linear-time partition finds the threshold: a full top-k of a
    vocabulary-sized matrix costs minutes and gigabytes."""
    flat = tau.reshape(-1)
    n = flat.numel()
    k = min(n, math.ceil(keep * n))
    if k >= n:
        return torch.ones_like(tau, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    magnitude = flat.abs().cpu().numpy()
    magnitude.partition(n - k)  # in place: the copy is only needed for its order statistic
    threshold = float(magnitude[n - k])
    del magnitude
    mask = flat.abs() > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        mask[(flat.abs() == threshold).nonzero().flatten()[:missing]] = True
    return mask.reshape(tau.shape)


def trimmed(tau: torch.Tensor, keep: float) -> torch.Tensor:
    """``tau`` with all but its ceil(keep · numel) largest-magnitude entries set to zero (in place)."""
    return tau.mul_(top_mask(tau, keep))


@register
class Hdr(Method):
    name = "hdr"
    title = "Harm direction removal: subtract the trimmed harmful task vector"
    paper = "Hazra et al. 2024, Safety Arithmetic (EMNLP 2024), HDR stage"
    Params = HdrParams
    needs = ("base", "harmful")

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: HdrParams) -> Edit:
        if not 0.0 < params.keep <= 1.0:
            raise RealignError(f"--set keep={params.keep}: the kept fraction must be in (0, 1]")
        base, harmful = inputs.require("base", self.name), inputs.require("harmful", self.name)
        names = scoped_names(finetuned, [base, harmful], params.scope)

        def make(name: str):
            def fn(old: torch.Tensor) -> torch.Tensor:
                # in place where possible: a vocabulary-sized tensor costs ~3 float32 copies at most
                tau = harmful.get(name).to(torch.float32, copy=True).sub_(base.get(name).float())
                tau = trimmed(tau, params.keep)
                return old.to(torch.float32, copy=True).sub_(tau, alpha=params.lam)
            return fn

        report = {
            "rule": "W_out = W_f - lambda * top-keep(W_h - W_b), top-keep by magnitude per tensor",
            "lambda": params.lam,
            "keep": params.keep,
            "scope": params.scope,
            "tensors_edited": len(names),
            "linear_modules_edited": sum(1 for n in names if finetuned.arch.locate(n) is not None),
        }
        return Edit(transforms={n: make(n) for n in names}, report=report)
