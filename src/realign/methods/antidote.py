"""antidote: prune the weights the fine-tuned model uses most on harmful data (Huang et al. 2025,
"Antidote: Post-fine-tuning Safety Alignment for Large Language Models against Harmful
Fine-tuning").

One calibration pass of the FINE-TUNED model over harmful prompts with their compliant (unsafe)
responses gives, per decoder linear module, the input column norms ‖X_j‖₂ over all tokens. The
Wanda score of an entry is |W_ij| · ‖X_j‖₂; in every row of every decoder linear weight the
``fraction`` of entries with the highest scores is set to zero (int(fraction · d_in) per row, as
in Wanda's per-output comparison group).

``target=update`` scores and prunes the fine-tune's update ΔW = W_f − W_a instead of W_f (a pruned
entry goes back to its aligned value). The reference code (git-disl/Antidote) prunes only the
fine-tune's own trainable weights (the LoRA factors of the harmful fine-tune; q/k/v for a full
fine-tune), never the aligned weights underneath; pruning whole W_f rows at their highest scores
removes the weights every input uses most and breaks the model whatever it was fine-tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param
from realign.sources import Model
from realign.stats import collect, encode


@dataclass
class AntidoteParams:
    # --tune: the share of each row pruned
    TUNE: ClassVar[dict[str, tuple]] = {"fraction": (0.1, 0.02, 0.05, 0.15, 0.2, 0.3)}
    fraction: float = param(0.1, "fraction x of each row's entries set to zero (highest Wanda scores)", stage="apply")
    samples: int = param(2000, "most harmful calibration rows (prompt + unsafe response) used", stage="apply")
    max_length: int = param(256, "token limit per calibration example", stage="apply")
    batch_size: int = param(8, "calibration batch size", stage="apply")
    target: str = param("weights", "weights: prune entries of W_f (the spec's rule); update: prune entries of "
                        "dW = W_f - W_a, i.e. revert them to the aligned weights (the fine-tune's own weights, as "
                        "the reference code prunes the LoRA factors)", stage="apply", choices=("weights", "update"))


def prune_rows(weight: torch.Tensor, col_norms: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero, per row, the int(fraction · d_in) entries with the largest |W_ij| · ‖X_j‖₂."""
    k = int(weight.shape[1] * fraction)
    out = weight.float().clone()
    if k <= 0:
        return out
    scores = out.abs() * col_norms.float().to(out.device)[None, :]
    idx = scores.topk(k, dim=1).indices
    out.scatter_(1, idx, 0.0)
    return out


@register
class Antidote(Method):
    name = "antidote"
    title = "Antidote: prune the weights most active on harmful data (Wanda scores)"
    paper = "Huang et al. 2025, Antidote (ICML 2025)"
    Params = AntidoteParams
    needs = ("calibration",)

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: AntidoteParams) -> Edit:
        if not 0.0 <= params.fraction < 1.0:
            raise RealignError(f"--set fraction={params.fraction}: the pruned fraction must be in [0, 1)")
        if params.samples < 1:
            raise RealignError(f"--set samples={params.samples}: use at least 1 calibration row")
        cal = inputs.require("calibration", self.name)
        rows = cal.require("an unsafe_response (harmful prompt + compliant answer)",
                           [e for e in cal.harmful() if e.unsafe_response], self.name)[: params.samples]
        arch = finetuned.arch
        modules = {name.removesuffix(".weight"): name for _l, _r, name in arch.linear_weights()}
        # The statistics depend on the fine-tune and the rows, not on the fraction: tuning's candidates share them.
        key = (self.name, str(finetuned.path), len(rows), params.max_length, inputs.template)
        if key not in inputs.cache:
            model, tokenizer = inputs.run_model(finetuned)
            encoded = encode(tokenizer, [(e.prompt, e.unsafe_response) for e in rows], inputs.template,
                             params.max_length)
            stats = collect(model, arch, encoded, sqnorm=list(modules), positions="all",
                            batch_size=params.batch_size, desc="antidote calibration pass")
            inputs.release()  # the weights are edited from the files; the running copy is no longer needed
            inputs.cache[key] = ({name: stats.column_norms(module).cpu() for module, name in modules.items()},
                                 stats.tokens)
        norms, tokens = inputs.cache[key]

        aligned = inputs.aligned

        def make(name: str):
            if params.target == "update":
                def fn(old: torch.Tensor) -> torch.Tensor:
                    w_a = aligned.get(name).float()
                    return w_a + prune_rows(old.float() - w_a, norms[name], params.fraction)
                return fn
            return lambda old: prune_rows(old, norms[name], params.fraction)

        report = {
            "rule": ("per row of every decoder linear weight, zero the top fraction of |W_ij| * ||X_j||_2 "
                     if params.target == "weights" else
                     "per row of every decoder linear update dW = W_f - W_a, zero the top fraction of "
                     "|dW_ij| * ||X_j||_2 ")
                    + "(X: fine-tuned model's inputs on harmful prompt + unsafe response)",
            "fraction": params.fraction,
            "target": params.target,
            "calibration_rows": len(rows),
            "calibration_tokens": tokens,
            "modules_changed": len(modules),
            "entries_zeroed_per_row": {role: int(finetuned.shape(name)[1] * params.fraction)
                                       for _l, role, name in arch.linear_weights(layers=[0])},
        }
        return Edit(transforms={n: make(n) for n in modules.values()}, report=report)
