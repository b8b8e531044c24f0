"""Safe Delta — keep the fine-tune's update where it costs little safety, compensate the rest
(Lu et al., "Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on Diverse Datasets",
ICML 2025, arXiv 2505.12038; official code ColinLu50/SafeDelta, adapted from SparseGPT).

Start from the aligned weights. In every linear module of the decoder layers, put back the
entries of the fine-tune's update ΔW = W_f − W_a whose estimated safety cost is small, within a
budget, and correct the remaining aligned weights so that the module's output on safety data
moves as little as possible (the Optimal-Brain-Surgeon update SparseGPT prunes with).

prepare (once per aligned model): one calibration pass of the ALIGNED model over harmful prompts
with their refusals (``safe_response``), prompt and response tokens, gives each module input's
Gram matrix H = (2/N) Σ x xᵀ (N examples; q/k/v share an input, as do gate/up). Then
H += damp · mean(diag H) · I (dead inputs, diag 0, get 1 first) and the patch keeps the upper
Cholesky factor U of H⁻¹ per module input (float32). The factor and the Gram have the same size
(d_in² floats); the factor is stored because it costs O(d_in³) to compute and a provider applies
one patch to many fine-tunes; ``damp`` is therefore a prepare-stage parameter.

apply (per fine-tune, module by module, streaming): W = W_a (float32), d_m = U[m, m]. Columns in
blocks of ``block``; for block [i1, i2):
  - loss of taking W_f's value of entry (r, m): (W_f − W)²[r, m] / d_m², W the current,
    already compensated weight; weight t_m = 1 / d_m²;
  - entries in the order t ascending (ties: by column, then row), the ``drop`` share with the
    largest t left out; the entries kept are the longest prefix of that order whose running loss
    stays ≤ mean(t) · (s / 2) · (d_out / 4096) — the official code's block (2048 = 4096 / 2) and
    size normalisations, kept as they are so ``s`` means what it means there;
  - in sub-blocks of 4 columns: q = w with the kept entries replaced by W_f's; err = (w − q) / d;
    the block's later columns −= err · U[cols, later]; after the block, all later columns
    −= Err · U[block, i2:].
The output module is the final W, cast to the checkpoint's dtype. Embeddings, norms and the LM
head keep the fine-tune's values (the official code edits the decoder layers' linear modules only).

Differences from the official code, all deliberate:
  - tie order: the official sorts entries with an unstable GPU argsort, so which of the entries
    with equal t (all of one column's) enter first is arbitrary; here it is column, then row;
  - a block with fewer than 1 / drop entries: the official slice ``[0:-int(0.15 n)]`` is empty
    when int(0.15 n) = 0, so nothing is kept; here nothing is dropped;
  - the running loss is summed in float64 (the official: float32 cumsum over up to 2048 · d_out
    entries) and H is factored in float64, then stored in float32;
  - inside a block the sub-blocks' updates are applied lazily, 128 columns at a time (GPTQ's
    scheme): the same arithmetic as the official column order, with fewer, larger products.

Memory. prepare runs the calibration data through the aligned model layer by layer (one forward
pass in all, realign.layerwise), so it holds the model, one layer's Grams and the hidden states
at one layer; apply holds one module's W_f, W and U in float32 plus block-sized temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from realign.archs import Arch
from realign.compute import resolve_device
from realign.errors import RealignError
from realign.layerwise import Layerwise
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param, params_dict
from realign.sources import Model
from realign.stats import encode

PATCH_FORMAT = "safedelta/1"
SUB_BLOCK = 4  # the official code's sub-block width
LAZY = 128  # columns whose updates are batched inside a block (exact: the updates are additive)
SIZE_NORM = 4096  # the budget scales with d_out / 4096 (official)
BLOCK_NORM = 2  # and with s / 2 (official: 2 = 4096 / its block of 2048)


@dataclass
class SafeDeltaParams:
    # --tune: the budget (larger keeps more of the fine-tune). The budget is absolute: Σ ΔW² t over the
    # kept entries against mean(t) · s, so the s that keeps a given share scales with the fine-tune's
    # squared update size (official 0.11 on a Llama-2-7B; ~100–1000 on the miniature world's stronger
    # updates). Hence decades, refined geometrically.
    TUNE: ClassVar[dict[str, tuple]] = {"s": (0.1, 0.01, 1.0, 10.0, 100.0, 1000.0, 10000.0)}
    s: float = param(0.1, "budget: safety loss allowed per block, mean(t) * (s/2) * (d_out/4096) (official 0.11 "
                     "for 100 harmful examples)", stage="apply")
    drop: float = param(0.15, "share of each block's entries with the largest t = 1/d^2 never kept", stage="apply")
    block: int = param(2048, "columns per block (official 2048)", stage="apply")
    damp: float = param(0.01, "H += damp * mean(diag H) * I before inverting")
    samples: int = param(128, "most harmful calibration rows (prompt + safe response) in the Gram matrices")
    max_length: int = param(256, "token limit per calibration example")
    batch_size: int = param(8, "calibration batch size")


def check_params(p: SafeDeltaParams) -> None:
    if not (p.s >= 0.0):
        raise RealignError(f"--set s={p.s}: the budget must be ≥ 0")
    if not 0.0 <= p.drop < 1.0:
        raise RealignError(f"--set drop={p.drop}: the dropped share must be in [0, 1)")
    if p.block < 1:
        raise RealignError(f"--set block={p.block}: use at least 1 column per block")
    if not p.damp > 0.0:
        raise RealignError(f"--set damp={p.damp}: the dampening must be > 0")
    if p.samples < 1:
        raise RealignError(f"--set samples={p.samples}: use at least 1 calibration row")


# ---------------------------------------------------------------------------------------- the algebra
def inverse_factor(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, int]:
    """(U, dead inputs): U the upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹, with the
    dead inputs' diagonal (0) set to 1 first, as SparseGPT does. Factored in float64."""
    h = gram.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    lower = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True).float(), int(dead.sum())


def budget(t: torch.Tensor, s: float, d_out: int) -> float:
    """The running-loss limit of one block: mean(t) · (s / 2) · (d_out / 4096)."""
    return float(t.double().mean()) * (s / BLOCK_NORM) * (d_out / SIZE_NORM)


def kept_entries(loss: torch.Tensor, t: torch.Tensor, limit: float, drop: float) -> torch.Tensor:
    """The entries of one block to take from the fine-tune: the longest prefix of the order
    (t ascending, then column, then row), without its last ⌊drop · n⌋ entries, whose running sum
    of ``loss`` stays ≤ ``limit``. ``loss``: (d_out, count); ``t``: (count,), one value per column.

    t is constant down a column, so the prefix is whole columns plus the head of one column: the
    sums run over columns, and no index of the block's size is ever sorted."""
    d_out, count = loss.shape
    numel = d_out * count
    candidates = numel - math.floor(drop * numel)
    columns = torch.sort(t, stable=True).indices
    running = torch.cumsum(loss.sum(0, dtype=torch.float64)[columns], 0)
    full = int(torch.searchsorted(running, torch.tensor([limit], dtype=running.dtype, device=running.device),
                                  right=True))
    taken = full * d_out
    if full < count:  # the head of the next column, entry by entry
        before = float(running[full - 1]) if full else 0.0
        partial = before + torch.cumsum(loss[:, columns[full]].double(), 0)
        taken += int((partial <= limit).sum())
    taken = min(taken, candidates)
    mask = torch.zeros(count, d_out, dtype=torch.bool, device=loss.device)
    mask.view(-1)[:taken] = True  # row j of this (column-major) view is column ``columns[j]``
    out = torch.zeros(d_out, count, dtype=torch.bool, device=loss.device)
    out[:, columns] = mask.T
    return out


@dataclass
class ModuleResult:
    weight: torch.Tensor  # float32
    kept: int  # entries taken from the fine-tune (changed entries only)
    changed: int  # entries where W_f differs from W_a
    loss_used: float  # Σ loss of the kept entries over Σ of the blocks' limits
    loss_limit: float


def safe_delta(w_a: torch.Tensor, w_f: torch.Tensor, u: torch.Tensor, s: float, drop: float = 0.15,
               block: int = 2048) -> ModuleResult:
    """One module's Safe Delta: the aligned weight with the cheap part of the fine-tune's update put
    back and the rest compensated (float32 arithmetic whatever the dtypes; inputs are not modified).
    W_f is read a block at a time, so beyond U only W and block-sized temporaries are held."""
    w = w_a.to(device=u.device, dtype=torch.float32, copy=True)
    u = u.to(torch.float32)
    d_out, d_in = w.shape
    diag = torch.diagonal(u)
    changed = kept = 0
    used = limit_total = 0.0
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        f = w_f[:, i1:i2].to(device=w.device, dtype=torch.float32)
        changed += int((f != w_a[:, i1:i2].to(device=w.device, dtype=torch.float32)).sum())
        d = diag[i1:i2]
        t = 1.0 / d.double() ** 2
        w1 = w[:, i1:i2]  # a view: the block is compensated in place
        loss = (f - w1).square_().div_(d * d)
        limit = budget(t, s, d_out)
        mask = kept_entries(loss, t, limit, drop)
        kept += int((mask & (f != w1)).sum())
        used += float(loss[mask].sum(dtype=torch.float64))
        limit_total += limit
        del loss
        err = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, LAZY):
            j2 = min(j1 + LAZY, i2 - i1)
            for k1 in range(j1, j2, SUB_BLOCK):
                k2 = min(k1 + SUB_BLOCK, j2)
                cols = w1[:, k1:k2]
                q = torch.where(mask[:, k1:k2], f[:, k1:k2], cols)
                e = (cols - q) / d[k1:k2]
                cols.copy_(q)
                err[:, k1:k2] = e
                w1[:, k2:j2].addmm_(e, u1[k1:k2, k2:j2], alpha=-1.0)
            w1[:, j2:].addmm_(err[:, j1:j2], u1[j1:j2, j2:], alpha=-1.0)
        w[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1.0)  # in place: no (d_out × rest) temporary
    return ModuleResult(w, kept, changed, used, limit_total)


# ---------------------------------------------------------------------------------------- the method
def factor_key(module: str) -> str:
    return f"{module}.hinv_factor"


def input_modules(arch: Arch) -> dict[str, str]:
    """Each decoder linear weight -> the module whose input it reads (q/k/v share one, gate/up one)."""
    from realign.methods.fgsn import input_groups

    rep = input_groups(arch)
    return {name: arch.module_name(layer, rep[role]) for layer, role, name in arch.linear_weights()}


@register
class SafeDelta(Method):
    name = "safedelta"
    title = "Safe Delta: keep the cheap part of the fine-tune's update, OBS-compensate the rest"
    paper = "Lu et al. 2025, Safe Delta (ICML 2025), arXiv 2505.12038"
    Params = SafeDeltaParams
    uses = ("calibration",)  # prepare requires it; apply reads only the patch

    def prepare(self, inputs: Inputs, params: SafeDeltaParams) -> Patch:
        check_params(params)
        cal = inputs.require("calibration", self.name)
        rows = cal.require("a safe_response (harmful prompt + refusal)",
                           [e for e in cal.harmful() if e.safe_response], self.name)[: params.samples]
        aligned, arch = inputs.aligned, inputs.aligned.arch
        by_layer: dict[int, list[str]] = {}
        for layer, role, _name in arch.linear_weights():
            source = input_modules(arch)[arch.weight_name(layer, role)]
            by_layer.setdefault(layer, [])
            if source not in by_layer[layer]:
                by_layer[layer].append(source)
        sources = [s for layer in sorted(by_layer) for s in by_layer[layer]]
        model, tokenizer = inputs.run_model(aligned)
        encoded = encode(tokenizer, [(e.prompt, e.safe_response) for e in rows], inputs.template, params.max_length)
        tensors, dead, tokens = {}, {}, 0
        # Layer by layer, as the official code runs it (an unedited model: one forward pass in all),
        # so only one layer's Gram matrices are ever held, not the whole model's.
        with Layerwise(model, arch, encoded, positions="all", batch_size=params.batch_size, edits=False,
                       desc="safedelta statistics") as run:
            for layer in run:
                stats = layer.collect(gram=by_layer.get(layer.index, []))
                tokens = stats.tokens or tokens
                for source in by_layer.get(layer.index, []):
                    gram = stats.gram.pop(source) * (2.0 / len(encoded))
                    factor, dead[source] = inverse_factor(gram, params.damp)
                    tensors[factor_key(source)] = factor.cpu()
        inputs.release()
        meta = {"format": PATCH_FORMAT, "inputs": sources, "dead_inputs": {k: v for k, v in dead.items() if v}}
        report = {
            "statistics": "H = (2/N) sum x x^T over the aligned model's inputs on harmful prompts + refusals "
                          "(prompt and response tokens), dampened; the patch keeps the upper Cholesky factor "
                          "of H^-1 per module input",
            "calibration_rows": len(rows),
            "calibration_tokens": tokens,
            "module_inputs": len(sources),
            "dead_inputs": sum(dead.values()),
            "damp": params.damp,
        }
        return Patch(self.name, params_dict(params), meta=meta, tensors=tensors, report=report)

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: SafeDeltaParams) -> Edit:
        check_params(params)
        if patch.meta.get("format") != PATCH_FORMAT:
            raise RealignError(f"this safedelta patch has format {patch.meta.get('format')!r}; expected "
                               f"{PATCH_FORMAT}: prepare it again with this version")
        aligned = inputs.aligned
        device = resolve_device(inputs.device)
        sources = input_modules(finetuned.arch)
        missing = sorted({s for s in sources.values() if factor_key(s) not in patch.tensors})
        if missing:
            raise RealignError(f"the safedelta patch has no statistics for {missing[0]}: prepare it from this "
                               "fine-tune's aligned model")
        modules: list[dict[str, Any]] = []
        totals = {"modules": 0, "modules_unchanged": 0, "entries_changed_by_finetune": 0, "entries_kept": 0}
        held: dict[str, torch.Tensor] = {}  # the current module input's factor (q, k, v read the same one)

        def make(name: str, source: str):
            def fn(old: torch.Tensor) -> torch.Tensor:
                w_a = aligned.get(name)
                if torch.equal(old, w_a.to(old.dtype)):  # nothing to put back (e.g. a module LoRA left alone)
                    totals["modules_unchanged"] += 1
                    return old
                if source not in held:
                    held.clear()
                    held[source] = patch.tensors[factor_key(source)].to(device)
                res = safe_delta(w_a, old, held[source], params.s, params.drop, params.block)
                totals["modules"] += 1
                totals["entries_changed_by_finetune"] += res.changed
                totals["entries_kept"] += res.kept
                modules.append({"name": name, "kept_share_of_update": round(res.kept / max(1, res.changed), 6),
                                "budget_used": round(res.loss_used / res.loss_limit, 6) if res.loss_limit else 0.0})
                return res.weight.to(device="cpu", dtype=old.dtype)
            return fn

        report = {
            "rule": "W_out = W_a with the entries of dW whose loss (W_f - W)^2 / d^2 fits the budget "
                    "mean(t)(s/2)(d_out/4096) per block taken from W_f, the rest OBS-compensated on the aligned "
                    "model's safety Gram matrices",
            "s": params.s, "drop": params.drop, "block": params.block,
            "totals": totals,  # filled as the modules are written
            "modules": modules,
        }
        transforms = {name: make(name, source) for name, source in sources.items()}
        return Edit(transforms=transforms, report=report)
