"""resta: add a safety vector back to the fine-tune (Bhardwaj et al. 2024, "Language Models are
Homer Simpson! Safety Re-Alignment of Fine-tuned Language Models through Task Arithmetic").

    v = W_a − W_u          W_u: an unaligned model (``--unaligned``: the aligned model after a harmful
                           fine-tune), else the base model W_b
    W_out = W_f + β v

with an optional DARE step first (Yu et al. 2024): each entry of the fine-tune's update
ΔW = W_f − W_a is dropped with probability d and the survivors are rescaled by 1/(1−d), so
W_out = W_a + DARE(ΔW) + β v. The drop mask is seeded per tensor (seed, tensor name), so a run
is reproducible whatever order tensors are written in.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param
from realign.sources import Model

SCOPES = ("all", "linear")


@dataclass
class RestaParams:
    # --tune: how much of the safety vector is added back
    TUNE: ClassVar[dict[str, tuple]] = {"beta": (0.5, 0.25, 0.75, 1.0, 1.5, 2.0, 3.0)}
    beta: float = param(0.5, "β: W_out = W_f + β (W_a - W_u)", stage="apply")
    dare: float = param(0.0, "DARE drop rate d on dW = W_f - W_a before adding the vector (0 = off)", stage="apply")
    seed: int = param(0, "seed of the DARE drop masks", stage="apply")
    scope: str = param("all", "all: every weight tensor; linear: decoder linear weights only", stage="apply",
                       choices=SCOPES)


def scoped_names(finetuned: Model, models: list[Model], scope: str) -> list[str]:
    """The floating-point tensors of the fine-tune that every model in ``models`` has with the same
    shape, restricted to the decoder linear weights when ``scope`` is ``linear``."""
    arch = finetuned.arch
    names = []
    for name in finetuned.tensor_names:
        if scope == "linear" and arch.locate(name) is None:
            continue
        if not finetuned.dtype(name).is_floating_point:
            continue
        if all(name in m and m.shape(name) == finetuned.shape(name) for m in models):
            names.append(name)
    return names


def dare(delta: torch.Tensor, rate: float, seed: int, name: str) -> torch.Tensor:
    """Drop each entry with probability ``rate`` and rescale the rest by 1/(1 − rate), in place."""
    if rate <= 0.0:
        return delta
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    keep = torch.rand(delta.shape, generator=g) >= rate
    return delta.mul_(keep).div_(1.0 - rate)  # in place on the caller's copy


@register
class Resta(Method):
    name = "resta"
    title = "RESTA: add the safety vector W_a - W_u back (optional DARE)"
    paper = "Bhardwaj et al. 2024, Language Models are Homer Simpson! (ACL 2024)"
    Params = RestaParams
    uses = ("base", "unaligned")

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: RestaParams) -> Edit:
        if not 0.0 <= params.dare < 1.0:
            raise RealignError(f"--set dare={params.dare}: the DARE drop rate must be in [0, 1)")
        aligned = inputs.aligned
        unaligned = inputs.unaligned if inputs.unaligned is not None else inputs.base
        if unaligned is None:
            raise RealignError("resta needs --unaligned MODEL (the aligned model after a harmful fine-tune) "
                               "or --base MODEL (used as the unaligned model)")
        names = scoped_names(finetuned, [aligned, unaligned], params.scope)

        def make(name: str):
            def fn(old: torch.Tensor) -> torch.Tensor:
                # in place where possible (never on ``old``: the writer compares against it)
                out = old.to(torch.float32, copy=True)
                w_a = aligned.get(name).to(torch.float32, copy=True)
                if params.dare > 0.0:
                    out = dare(out.sub_(w_a), params.dare, params.seed, name).add_(w_a)
                v = w_a.sub_(unaligned.get(name).float())
                return out.add_(v, alpha=params.beta)
            return fn

        report = {
            "rule": "W_out = W_f + beta (W_a - W_u)" + (", after DARE on W_f - W_a" if params.dare > 0 else ""),
            "unaligned_model": "unaligned" if inputs.unaligned is not None else "base",
            "beta": params.beta,
            "dare": params.dare,
            "scope": params.scope,
            "tensors_edited": len(names),
            "linear_modules_edited": sum(1 for n in names if finetuned.arch.locate(n) is not None),
        }
        return Edit(transforms={n: make(n) for n in names}, report=report)
