"""NLSR — Neuron-Level Safety Realignment (Yi et al., AAAI 2025, arXiv 2412.12497).

Training-free: transplant the "safety-critical neurons" of a safety reference model into the
modules of a fine-tune whose safety neurons drifted most. The paper's four steps, in this file's
order:

  prepare (once per aligned model)
  1. Safety reference (pre-amplification, ExPO): W_e = W_a + α·(W_a − W_b).
  2. Safety region: score every weight of W_e on safe responses (response tokens only) and keep,
     per matrix, the entries scored strictly above the ⌊n·sparsity⌋-th score (the official count).
     Scores: ``lowrank`` |U_r U_rᵀ W| (default), ``wanda`` |W_ij|·‖X_j‖, ``snip``
     |W_ij|·Σ_n |∂L_n/∂W_ij|; wanda and snip compare scores within each output row.
     With ``lowrank`` the official code projects the layers in order (``activations=sequential``):
     the inputs of layer l come from a model whose layers < l already hold W̃ = U_r U_rᵀ W, run
     layer by layer as SparseGPT does (``realign.layerwise``); ``one-pass`` reads every layer from
     W_e itself. The patch stores, per matrix, the region M (bit-packed), W_e[M] and W_b[M].
  apply (per fine-tune, tensor by tensor)
  3. Similarity per module c_j = cos(M⊙(W_f − W_b), M⊙(W_e − W_b)); choose the modules to
     restore (adaptive / threshold / fraction).
  4. Transplant W_f ← (1 − M)⊙W_f + M⊙W_e in the chosen modules. Nothing else changes.

Two modes. ``dense`` works on dense weights: full fine-tunes, and fresh LoRA adapters on top of
W_a (seen as W_a + s·B·A, one module at a time). ``lora`` is the official setting: the aligned
model is W_b + adapter, the fine-tune continued training that adapter; the regions are computed
on the A and B factors (their inputs are x and A·x), the transplant edits the factors, the
output is an adapter.

Where this differs from the official code, on purpose: the decompositions are exact
eigendecompositions in float64 (the official code uses a randomised SVD); the adaptive draw makes
the LEAST similar module the most likely to be restored, as the paper says (the official code
does the reverse: ``direction=official``); W_e follows the paper's formula (the official scales
each LoRA factor by 2α: ``amplify=lora-factors``).

Memory. prepare holds the reference model (on the compute device), one layer's statistics (the
smaller of one d_in² input Gram and the modules' d_out² output Grams per shared input, float32;
``wanda`` needs column norms only), the calibration set's hidden states at one layer (spilled to
disk beyond half the free memory, see ``realign.layerwise``), and the patch being built (1 bit per
weight plus two value vectors: ≈ 0.93 byte per weight in bf16). ``snip`` runs one forward +
backward pass per batch instead and holds one float32 sum per linear weight. apply streams: per
module it reads W_f, the mask and the values, and keeps nothing but c_j.

The machinery lives in shared modules: ``realign.masks`` (scores to regions, the low-rank
projection, bit-packed patches, the streaming similarity and transplant), ``realign.layerwise``
(the layer-by-layer runner and its statistic requests), ``realign.lora_factors`` (products,
gradients, regions and transplants of LoRA factors), ``realign.writer`` (full-rank adapters).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from realign import lora_factors as lora
from realign.errors import RealignError
from realign.layerwise import Layerwise, input_requests, shared_input_groups
from realign.lora_factors import PARTS, factor_cosine, factor_gradients, factor_inner  # noqa: F401 (re-exported)
from realign.masks import (
    RegionPatch,
    keep_above,
    lowrank_projection,
    projection_from_stats,
    region_similarities,
    transplant_from,
)
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param, params_dict
from realign.progress import progress
from realign.sources import Model
from realign.stats import Encoded, Stats, encode, example_gradient_sums, loss_gradients
from realign.writer import full_rank_adapter

# The patch layout (masks, values) has not changed since nlsr/1: patches prepared before the
# official region rules still apply, with the regions they were prepared with.
PATCH_FORMAT = "nlsr/1"
REMEDY = "prepare with --set mode=dense"  # for a fine-tune that does not continue the aligned adapter


@dataclass
class NLSRParams:
    # --tune: how many modules get their safety region back (the default π = 0.5 first)
    TUNE: ClassVar[dict[str, tuple]] = {"prune_rate": (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}
    alpha: float = param(0.9, "pre-amplification of the safety reference: W_e = W_a + alpha·(W_a − W_b)")
    amplify: str = param(
        "paper", "paper: W_e = W_a + alpha·(W_a − W_b); lora-factors: the official code's scaling of each LoRA "
        "factor by 2·alpha, i.e. W_e = W_b + (2·alpha)²·(W_a − W_b)", choices=("paper", "lora-factors"))
    mode: str = param(
        "auto", "dense: dense weights (full fine-tunes, fresh LoRA adapters); lora: LoRA-factor mode (aligned = "
        "base + adapter, the fine-tune continues that adapter; output: an adapter); auto: lora when --aligned is "
        "an adapter", choices=("auto", "dense", "lora"))
    score: str = param(
        "lowrank", "safety score: lowrank |U_r U_rᵀ W| (activation-aware low rank), wanda |W_ij|·‖X_j‖, snip "
        "|W_ij|·Σ_n|∂L_n/∂W_ij|", choices=("lowrank", "wanda", "snip"))
    activations: str = param(
        "sequential", "lowrank: where layer l's inputs come from. sequential (official): a model whose layers < l "
        "already hold their projections U_r U_rᵀ W, run layer by layer; one-pass: the reference model W_e itself",
        choices=("sequential", "one-pass"))
    group: str = param(
        "auto", "which scores compete for the region: matrix (the top of the whole matrix), row (the same top "
        "share of every output row); auto: row for wanda and snip, matrix for lowrank (the official rules)",
        choices=("auto", "matrix", "row"))
    snip_gradients: str = param(
        "per-example", "snip: per-example (official) |W|·Σ_n|∂L_n/∂W|, L_n the mean NLL of example n's response; "
        "pooled: |W·∂L/∂W| of the mean NLL over all response tokens", choices=("per-example", "pooled"))
    rank_ratio: float = param(0.8, "lowrank: r = floor(rank_ratio · min(d_out, d_in)) output directions kept")
    sparsity: float = param(0.8, "share of each group left out of the safety region: the region is the entries "
                            "scored strictly above the floor(n·sparsity)-th of the n scores (the official count)")
    granularity: str = param("entry", "region unit: single entries, or whole output rows (neurons, by summed score)",
                             choices=("entry", "row"))
    samples: int = param(2000, "calibration rows with a safe response used (the first N)")
    max_response_tokens: int = param(256, "safe responses are cut to this many tokens")
    batch_size: int = param(8, "calibration batch size")
    selection: str = param("adaptive", "which modules to restore: adaptive (seeded Bernoulli draw by similarity "
                           "rank), threshold (c_j < tau), fraction (the k least similar)", stage="apply",
                           choices=("adaptive", "threshold", "fraction"))
    direction: str = param("paper", "adaptive: paper = the least similar module is the most likely restored; "
                           "official = the official code's reverse order (the most similar is)", stage="apply",
                           choices=("paper", "official"))
    prune_rate: float = param(0.5, "adaptive: mean restore probability pi", stage="apply")
    epsilon: float = param(0.2, "adaptive: probabilities span pi ± epsilon over the similarity ranks", stage="apply")
    seed: int = param(42, "adaptive: seed of the Bernoulli draw", stage="apply")
    tau: float = param(0.1, "threshold: restore modules with c_j < tau", stage="apply")
    k: int | None = param(None, "fraction: number of modules restored (default: round(prune_rate × modules))",
                          stage="apply")


def _check_params(p: NLSRParams) -> None:
    checks = [
        (p.alpha >= 0, "alpha must be ≥ 0"),
        (0 < p.rank_ratio <= 1, "rank_ratio must be in (0, 1]"),
        (0 <= p.sparsity < 1, "sparsity must be in [0, 1) (the region is the top 1 − sparsity of each matrix)"),
        (p.samples >= 1, "samples must be ≥ 1"),
        (p.max_response_tokens >= 1, "max_response_tokens must be ≥ 1"),
        (p.batch_size >= 1, "batch_size must be ≥ 1"),
        (0 <= p.prune_rate <= 1, "prune_rate must be in [0, 1]"),
        (p.epsilon >= 0, "epsilon must be ≥ 0"),
        (p.k is None or p.k >= 0, "k must be ≥ 0"),
        (not (p.granularity == "row" and p.group == "row"),
         "granularity=row selects whole rows, which compete within the matrix: use group=matrix or auto"),
    ]
    for ok, msg in checks:
        if not ok:
            raise RealignError(f"nlsr: {msg}")


# ============================================================================ step 1: the safety reference
@dataclass
class Reference:
    """Step 1's decisions: mode, W_b, and how W_e is formed."""

    mode: str
    aligned: Model
    base: Model | None
    factor: float  # dense: W_e = W_a + factor·(W_a − W_b); lora: A_e = factor·A_a, B_e = factor·B_a
    formula: str
    notes: list[str]

    def dense(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_e, W_b) of one matrix in float32, from the files; W_b None without a base."""
        w_a = self.aligned.get(name).float()
        if self.base is None:
            return w_a, None
        w_b = self.base.get(name).float()
        return w_a + self.factor * (w_a - w_b), w_b


def reference(inputs: Inputs, p: NLSRParams) -> Reference:
    aligned, base, notes = inputs.aligned, inputs.base, []
    mode = p.mode if p.mode != "auto" else ("lora" if aligned.is_adapter else "dense")
    if mode == "lora":
        if not aligned.is_adapter:
            raise RealignError("nlsr mode=lora needs --aligned to be a LoRA adapter on the base model "
                               "(W_a = W_b + adapter); for a full aligned checkpoint use mode=dense")
        if base is not None and Path(base.path) != Path(aligned.base.path):  # type: ignore[union-attr]
            notes.append(f"LoRA-factor mode: W_b is the aligned adapter's base {aligned.base.ref}; "  # type: ignore[union-attr]
                         f"--base {base.ref} ignored")
        factor = math.sqrt(1 + p.alpha) if p.amplify == "paper" else 2 * p.alpha
        formula = (f"A_e = {factor:.4g}·A_a, B_e = {factor:.4g}·B_a, so W_e − W_b = {factor ** 2:.4g}·(W_a − W_b)"
                   + (" (paper: 1 + alpha)" if p.amplify == "paper" else " (official: (2·alpha)²)"))
        return Reference(mode, aligned, aligned.base, factor, formula, notes)
    if base is None and aligned.is_adapter:
        base = aligned.base
        notes.append(f"no --base given: W_b is the base of the aligned adapter ({base.ref})")  # type: ignore[union-attr]
    if base is None:
        notes.append("no base model given: W_e = W_a (nothing to amplify), and c_j compares the fine-tuned and "
                     "reference weights themselves (W_b taken as 0), so tau thresholds are not comparable")
        return Reference(mode, aligned, None, 1.0, "W_e = W_a (no base model)", notes)
    gain = p.alpha if p.amplify == "paper" else (2 * p.alpha) ** 2 - 1
    formula = (f"W_e = W_a + {gain:.4g}·(W_a − W_b)"
               + (" (paper)" if p.amplify == "paper" else " (official LoRA-factor scaling (2·alpha)² − 1)"))
    return Reference(mode, aligned, base, gain, formula, notes)


@dataclass
class _Module:
    layer: int
    role: str
    name: str  # the weight tensor
    module: str
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None  # lora mode: (A_e, B_e, s)
    rep: str = ""  # the module whose input statistic this one reads (q, k, v share one; gate, up too)


def reference_model(inputs: Inputs, ref: Reference) -> tuple[Any, Any, list[_Module]]:
    """W_e loaded as a model to run the safety data through, and the modules to score."""
    from realign.compute import load_model

    model, tokenizer = load_model(ref.aligned, device=inputs.device, dtype=inputs.dtype)
    device, arch = next(model.parameters()).device, ref.aligned.arch
    modules: list[_Module] = []
    with torch.no_grad():
        for layer, role, name in arch.linear_weights():
            mod = _Module(layer, role, name, arch.module_name(layer, role))
            if ref.mode == "lora":
                f = ref.aligned.lora_factors(name)
                if f is None:
                    continue  # modules outside the adapter keep W_b = W_a: nothing to realign
                mod.lora = (ref.factor * f[0].float(), ref.factor * f[1].float(), f[2])
                w_e = lora.merged(ref.base.get(name), *mod.lora)  # type: ignore[union-attr]
            else:
                w_e = ref.dense(name)[0]
            model.get_parameter(name).copy_(w_e.to(device))
            modules.append(mod)
    if not modules:
        raise RealignError(f"nlsr: the aligned adapter {ref.aligned.ref} has no LoRA module on a decoder linear "
                           "weight; use mode=dense")
    for layer in {m.layer for m in modules}:
        roles = {m.role: m for m in modules if m.layer == layer}
        for group in shared_input_groups(list(roles)):
            for role in group:
                roles[role].rep = roles[group[0]].module
    return model, tokenizer, modules


# ============================================================================ step 2: the safety region
def safe_responses(inputs: Inputs, p: NLSRParams, tokenizer) -> list[Encoded]:
    """The first ``samples`` harmful prompts with their safe responses, responses capped."""
    cal = inputs.require("calibration", "nlsr")
    rows = cal.require("a safe_response (a harmful prompt with a refusal)", cal.with_safe_response(),
                       "nlsr")[: p.samples]
    encoded = encode(tokenizer, [(r.prompt, r.safe_response) for r in rows], inputs.template, max_length=4096)
    # Responses are capped on their own (the official setting): prompts are never cut for them.
    encoded = [Encoded(e.input_ids[: e.prompt_len + p.max_response_tokens], e.prompt_len) for e in encoded]
    encoded = [e for e in encoded if e.response_len > 0]
    if not encoded:
        raise RealignError(f"nlsr: no calibration row of {cal.source} has a non-empty safe response")
    return encoded


def statistics(model, ref: Reference, modules: list[_Module], encoded: list[Encoded], p: NLSRParams,
               sequential: bool, passes: dict[str, Any]) -> Iterator[tuple[list[_Module], Any]]:
    """Per layer (in order): its modules and what their scores need (``passes``: what was
    computed, for the report). snip: one gradient pass first; lowrank and wanda: the layer's
    statistics from a layer-by-layer run, sequential or over the reference model as it is."""
    by_layer: dict[int, list[_Module]] = {}
    for mod in modules:
        by_layer.setdefault(mod.layer, []).append(mod)
    if p.score == "snip":
        if p.snip_gradients == "pooled":
            passes["what"] = "gradient of the mean safe-response NLL (one forward + backward pass)"
            grads = loss_gradients(model, encoded, [m.name for m in modules], batch_size=p.batch_size,
                                   desc="NLSR: gradient pass (safe responses)")
        else:  # LoRA: per example, the factor gradients s·BᵀG_n and s·G_n·Aᵀ
            passes["what"] = "Σ_n |∂L_n/∂W| over the safe responses n (one forward + backward pass per batch)"
            transform = lora.factor_gradient_transforms(model, {m.module: (m.name, m.lora) for m in modules
                                                                if m.lora is not None})
            grads = example_gradient_sums(model, encoded, [m.module for m in modules], transform=transform,
                                          batch_size=p.batch_size, desc="NLSR: per-example gradients (safe responses)")
        yield from ((by_layer[layer], grads) for layer in sorted(by_layer))
        return
    passes["what"] = {
        "lowrank": "input Gram XᵀX or output Gram SᵀS per module",
        "wanda": "input column norms ‖X_j‖ per module",
    }[p.score] if ref.mode == "dense" else "A·XᵀX·Aᵀ per module (the B factor's input Gram)" + (
        " and input column norms" if p.score == "wanda" else "")
    passes["what"] += (", layer by layer, each layer's inputs from the layers before it as projected"
                       if sequential else ", layer by layer over the reference model (one forward pass)")
    with Layerwise(model, ref.aligned.arch, encoded, batch_size=p.batch_size, edits=sequential,
                   desc="NLSR: safe responses") as run:
        for layer in run:
            if layer.index in by_layer:
                mods = by_layer[layer.index]
                # LoRA: A's output Gram (= B's input Gram) is all lowrank needs; wanda's B needs its diagonal.
                project = {m.module: m.lora[0] for m in mods} if ref.mode == "lora" else None  # type: ignore[index]
                yield mods, layer.collect(**input_requests(model, [(m.role, m.name, m.module) for m in mods],
                                                           sqnorm=p.score == "wanda", gram=p.score == "lowrank",
                                                           project=project))
        passes["notes"] = run.notes()


def wanda_score(w: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ (``sqnorm`` = Σ x_j² over the calibration tokens)."""
    return w.abs().float() * sqnorm.float().clamp_min(0).sqrt().unsqueeze(0)


def scores(mod: _Module, dense: tuple[torch.Tensor, Any] | None, stats: Any, p: NLSRParams, device: torch.device,
           halves: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{part: (score, W̃ for lowrank else None)} for one module: part "" (dense: W_e is
    ``dense[0]``) or the LoRA factors "lora_A" and "lora_B". ``halves``: G = H Hᵀ per shared
    input of the layer, computed once (gate and up share one)."""
    ws = {"": dense[0]} if dense is not None else dict(zip(PARTS, mod.lora[:2], strict=True))  # type: ignore[index]
    if p.score == "snip":
        if p.snip_gradients == "pooled":
            g = stats[mod.name].float().cpu()
            grads = {"": g} if mod.lora is None else dict(zip(PARTS, factor_gradients(g, *mod.lora), strict=True))
            return {k: ((w * grads[k]).abs(), None) for k, w in ws.items()}
        sums = dict(zip(ws, stats[mod.module], strict=True))
        return {k: (w.abs() * sums[k].cpu(), None) for k, w in ws.items()}
    st: Stats = stats
    if p.score == "wanda":
        if mod.lora is None:
            return {"": (wanda_score(ws[""], st.sqnorm[mod.rep].cpu()), None)}
        return {"lora_A": (wanda_score(ws["lora_A"], st.sqnorm[mod.rep].cpu()), None),
                "lora_B": (wanda_score(ws["lora_B"], torch.diagonal(st.proj_gram[mod.module]).cpu()), None)}
    out = {}
    for k, w in ws.items():
        r = math.floor(p.rank_ratio * min(w.shape) + 1e-9)
        if mod.lora is None:  # from the module's output Gram, or the input Gram it shares
            proj = projection_from_stats(w.to(device), r, st, mod.module, mod.rep, halves)
        else:  # A from its output Gram, B from its input Gram: both A·XᵀX·Aᵀ
            k_a = st.proj_gram[mod.module]
            proj = (lowrank_projection(w.to(device), r, out_gram=k_a) if k == "lora_A"
                    else lowrank_projection(w.to(device), r, gram=k_a))
        out[k] = (proj.abs().cpu(), proj)
    return out


def region_group(p: NLSRParams) -> str:
    """The group scores compete in: the official rule per score unless ``group`` says otherwise."""
    if p.granularity == "row":
        return "matrix"
    if p.group != "auto":
        return p.group
    return "matrix" if p.score == "lowrank" else "row"


def region_mask(score: torch.Tensor, sparsity: float, granularity: str = "entry",
                group: str = "matrix") -> torch.Tensor:
    """The safety region of one matrix: the entries scored strictly above the ⌊n·sparsity⌋-th of
    the n scores of their group (the whole matrix, or their output row: ``group="row"``), the
    official count (``realign.masks.keep_above``); with ``granularity="row"``, whole output rows
    by summed score, compared in the same way."""
    if granularity == "row":
        return keep_above(score.float().sum(1), sparsity).unsqueeze(1).expand_as(score).contiguous()
    return keep_above(score, sparsity, dim=1 if group == "row" else None)


def add_region(region: RegionPatch, ref: Reference, mod: _Module, dense: tuple[torch.Tensor, Any] | None,
               parts: dict[str, tuple[torch.Tensor, Any]], p: NLSRParams, group: str) -> None:
    """M per matrix and the values the patch stores under it: W_e[M], W_b[M] (LoRA: A_e[M_A], B_e[M_B])."""
    record: dict[str, Any] = {"layer": mod.layer, "role": mod.role, "name": mod.name, "module": mod.module}
    if dense is not None:
        w_e, w_b = dense
        dtype = ref.aligned.dtype(mod.name) if w_b is None else torch.promote_types(
            ref.aligned.dtype(mod.name), ref.base.dtype(mod.name))  # type: ignore[union-attr]
        mask = region_mask(parts[""][0], p.sparsity, p.granularity, group)
        kept = region.add(mod.name, mask, dtype, ref=w_e, base=w_b)
        region.modules.append({**record, "shape": list(w_e.shape), "kept": kept})
        return
    adapter = ref.aligned.adapter
    masks = [region_mask(parts[part][0], p.sparsity, p.granularity, group) for part in PARTS]
    dtypes = [adapter.store.dtype(t) for t in adapter.modules[mod.module]]  # type: ignore[union-attr]
    region.modules.append({**record, "scale": mod.lora[2],  # type: ignore[index]
                           **lora.add_factor_region(region, mod.module, masks, mod.lora[:2], dtypes)})  # type: ignore[index]


# ============================================================================ step 3: which modules
@dataclass
class Selection:
    restored: list[bool]
    rank: list[int]  # 1 = least similar module
    probability: list[float] | None = None  # adaptive only
    normalised_rank: list[float] | None = None  # adaptive only: n_j


def select_modules(c: list[float], selection: str = "adaptive", *, prune_rate: float = 0.5, epsilon: float = 0.2,
                   seed: int = 42, tau: float = 0.1, k: int | None = None, direction: str = "paper") -> Selection:
    """Which modules to restore, from their similarities c_j (module order = the draw order)."""
    n = len(c)
    sims = torch.tensor(c, dtype=torch.float64)
    # Most similar first; stable so equal similarities keep module order.
    order = torch.argsort(sims, descending=True, stable=True)
    pos = torch.empty(n, dtype=torch.float64)
    pos[order] = torch.arange(n, dtype=torch.float64)
    rank = [int(n - q) for q in pos.tolist()]
    if selection == "adaptive":
        # n_j = 1 for the LEAST similar module (paper); the official code reverses it.
        norm = pos / (n - 1) if n > 1 else torch.ones(n, dtype=torch.float64)
        if direction == "official":
            norm = 1 - norm
        elif direction != "paper":
            raise RealignError(f"nlsr: direction must be paper or official, not {direction!r}")
        prob = ((prune_rate - epsilon) + 2 * epsilon * norm).clamp(0, 1).float()
        draw = torch.bernoulli(prob, generator=torch.Generator().manual_seed(seed))
        return Selection([bool(x) for x in draw.tolist()], rank, prob.tolist(), norm.tolist())
    if selection == "threshold":
        return Selection([x < tau for x in c], rank)
    if selection == "fraction":
        count = round(prune_rate * n) if k is None else min(k, n)
        chosen = set(torch.argsort(sims, stable=True)[:count].tolist())
        return Selection([i in chosen for i in range(n)], rank)
    raise RealignError(f"nlsr: selection must be adaptive, threshold or fraction, not {selection!r}")


def similarities(patch: Patch, ft: Model) -> list[dict[str, Any]]:
    """c_j = cos(M⊙(W_f − W_b), M⊙(W_e − W_b)) per module, and the entries the transplant would
    change there. LoRA-factor mode: A and B masked separately, then multiplied (ΔW, up to s)."""
    mods, tensors = patch.meta["modules"], patch.tensors
    if patch.meta["mode"] == "lora":
        lora.check_continues(ft, patch.meta["lora_base"], "nlsr", REMEDY)
        sims: Any = (lora.factor_similarity(*lora.continued_factors(ft, m, REMEDY), tensors, m["module"],
                                            m.get("ref_norm2"))
                     for m in progress(mods, desc="NLSR: similarity per module", unit="module"))
        sizes = [(math.prod(m["lora_A_shape"]) + math.prod(m["lora_B_shape"]), m["lora_A_kept"] + m["lora_B_kept"])
                 for m in mods]
    else:
        sims = region_similarities(ft, {m["name"]: m["shape"] for m in mods}, tensors, patch.meta["has_base"],
                                   desc="NLSR: similarity per module")
        sizes = [(math.prod(m["shape"]), m["kept"]) for m in mods]
    return [{"module": m["module"], "layer": m["layer"], "role": m["role"], "c": c, "entries_changed": changed,
             "entries": entries, "region": kept}
            for m, (c, changed), (entries, kept) in zip(mods, sims, sizes, strict=True)]


# ============================================================================ step 4: the transplant
def transplant(patch: Patch, ft: Model, restored: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """W_f ← (1 − M)⊙W_f + M⊙W_e in the restored modules, done by the writer tensor by tensor (a
    LoRA fine-tune's adapter output stores them at full rank); LoRA-factor mode: A_f ← (1 − M_A)⊙A_f
    + M_A⊙A_e, the same for B, and the output is the adapter."""
    if patch.meta["mode"] == "lora":
        adapter = ft.adapter
        assert adapter is not None
        tensors = lora.transplanted_adapter(adapter, {m["module"] for m in restored}, patch.tensors)
        extra = sorted(set(adapter.modules) - {m["module"] for m in patch.meta["modules"]})
        if extra:
            notes.append(f"{len(extra)} LoRA modules of the fine-tune are not in the aligned adapter and were kept "
                         f"as they are (e.g. {extra[0]})")
        return {"adapter": {"config": dict(adapter.config), "tensors": tensors}, "dense": False}
    transforms = {m["name"]: transplant_from(patch.tensors, m["name"]) for m in restored}
    adapter_out = None
    if ft.is_adapter:
        adapter_out = full_rank_adapter(ft, {m["module"]: (m["name"], *m["shape"]) for m in restored}, transforms)
        if restored:
            notes.append("dense mode on a LoRA fine-tune: the default output is a full checkpoint; with --output "
                         "adapter the restored modules are stored at full rank (exact, not low-rank)")
    return {"transforms": transforms, "adapter": adapter_out, "dense": True}


# ============================================================================ the method
@register
class NLSR(Method):
    name = "nlsr"
    title = "NLSR: neuron-level safety realignment"
    paper = "Yi et al., NLSR: Neuron-Level Safety Realignment of LLMs Against Harmful Fine-Tuning, AAAI 2025"
    Params = NLSRParams
    needs = ()
    uses = ("base", "calibration")  # calibration is checked in prepare: apply never needs it
    natural_output = "full"

    def prepare(self, inputs: Inputs, params: NLSRParams) -> Patch:
        p = params
        _check_params(p)
        inputs.require("calibration", self.name)
        t0 = time.perf_counter()
        ref = reference(inputs, p)  # step 1
        model, tokenizer, modules = reference_model(inputs, ref)
        encoded = safe_responses(inputs, p, tokenizer)
        timing = {"reference_model": time.perf_counter() - t0}

        # Step 2, layer by layer: the statistics of a layer, its scores and regions, and (lowrank,
        # sequential) its projections W̃ written into the model before the next layer's inputs.
        t1, scoring = time.perf_counter(), 0.0
        sequential = p.score == "lowrank" and p.activations == "sequential"
        group, region, passes = region_group(p), RegionPatch(), {}
        for layer_modules, stats in statistics(model, ref, modules, encoded, p, sequential, passes):
            t = time.perf_counter()
            halves: dict[str, torch.Tensor] = {}
            for mod in layer_modules:
                dense = ref.dense(mod.name) if mod.lora is None else None  # (W_e, W_b)
                parts = scores(mod, dense, stats, p, model.get_parameter(mod.name).device, halves)
                add_region(region, ref, mod, dense, parts, p, group)
                if sequential:  # the official order: this layer holds W̃ before the next layer's inputs are made
                    w_new = parts[""][1] if mod.lora is None else lora.merged(
                        ref.base.get(mod.name), parts["lora_A"][1], parts["lora_B"][1], mod.lora[2])  # type: ignore
                    with torch.no_grad():
                        model.get_parameter(mod.name).copy_(w_new)
            scoring += time.perf_counter() - t
        timing.update(calibration_passes=time.perf_counter() - t1 - scoring, scoring=scoring)
        del model

        meta = {"format": PATCH_FORMAT, "mode": ref.mode, "has_base": ref.base is not None, "reference": ref.formula,
                "modules": region.modules}
        if ref.mode == "lora":  # a fine-tune continuing the aligned adapter sits on the same W_b: checked at apply
            meta["lora_base"] = lora.base_record(ref.base)
        report = {
            "mode": ref.mode,
            "reference": {"formula": ref.formula, "alpha": p.alpha, "amplify": p.amplify,
                          "base": ref.base.ref if ref.base is not None else None},
            "score": p.score, "statistic": passes["what"],
            "activations": p.activations if p.score == "lowrank" else "the reference model's",
            "region": {"sparsity": p.sparsity, "granularity": p.granularity, "group": group,
                       "count": "entries strictly above the floor(n·sparsity)-th score of their group",
                       "entries_kept": region.kept, "entries_total": region.entries,
                       "rank_ratio": p.rank_ratio if p.score == "lowrank" else None},
            "calibration": {"examples": len(encoded), "response_tokens": sum(e.response_len for e in encoded)},
            "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
            "notes": list(ref.notes) + passes.get("notes", []),
        }
        return Patch(self.name, params_dict(p), meta, region.tensors, report)

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: NLSRParams) -> Edit:
        _check_params(params)
        p = params
        if patch.meta.get("format") != PATCH_FORMAT:
            raise RealignError(f"this nlsr patch has format {patch.meta.get('format')!r}; this version reads "
                               f"{PATCH_FORMAT}: prepare it again")
        rows = similarities(patch, finetuned)  # step 3
        sel = select_modules([r["c"] for r in rows], p.selection, prune_rate=p.prune_rate, epsilon=p.epsilon,
                             seed=p.seed, tau=p.tau, k=p.k, direction=p.direction)
        restored = [mod for mod, on in zip(patch.meta["modules"], sel.restored, strict=True) if on]
        notes: list[str] = []
        edit = transplant(patch, finetuned, restored, notes)  # step 4
        return Edit(**edit, report=self._report(patch, p, rows, sel, notes))

    def _report(self, patch: Patch, p: NLSRParams, rows: list[dict[str, Any]], sel: Selection,
                notes: list[str]) -> dict[str, Any]:
        changed = sum(r["entries_changed"] for r, on in zip(rows, sel.restored, strict=True) if on)
        entries = sum(r["entries"] for r in rows)
        for i, row in enumerate(rows):
            row["rank"] = sel.rank[i]
            if sel.probability is not None:
                row["p"] = round(sel.probability[i], 6)
            row["restored"] = sel.restored[i]
            row["entries_changed"] = row["entries_changed"] if sel.restored[i] else 0
            row["fraction_changed"] = round(row["entries_changed"] / row["entries"], 6)
            row["c"] = round(row["c"], 6)
        adaptive, selection = p.selection == "adaptive", {"mode": p.selection}
        if adaptive:
            selection.update(direction=p.direction, prune_rate=p.prune_rate, epsilon=p.epsilon, seed=p.seed)
        elif p.selection == "threshold":
            selection.update(tau=p.tau)
        else:
            selection.update(k=p.k if p.k is not None else round(p.prune_rate * len(rows)))
        prep = patch.params
        return {
            "mode": patch.meta["mode"], "reference": patch.meta.get("reference"), "selection": selection,
            "modules": rows,
            "changed": {"entries": changed, "of_entries": entries,
                        "percent": round(100.0 * changed / max(entries, 1), 4)},
            "totals": {
                "mode": patch.meta["mode"], "modules_restored": f"{sum(sel.restored)}/{len(rows)}",
                "selection": p.selection, "direction": p.direction if adaptive else "-",
                "seed": p.seed if adaptive else "-",
                "alpha": prep.get("alpha"), "amplify": prep.get("amplify"), "score": prep.get("score"),
                # patches from before the option read every layer from W_e in one pass
                "activations": prep.get("activations", "one-pass") if prep.get("score") == "lowrank" else "-",
                "sparsity": prep.get("sparsity"),
            },
            "notes": notes,
        }

