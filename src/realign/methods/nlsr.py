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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from realign.errors import RealignError
from realign.layerwise import Layerwise
from realign.masks import (
    gather,
    keep_above,
    masked,
    masked_similarity,
    pack_mask,
    scattered,
    transplant,
    transplant_packed,
    unpack_mask,
)
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param, params_dict
from realign.progress import progress
from realign.sources import Model, weights_sha256
from realign.stats import Encoded, Stats, encode, example_gradient_sums, loss_gradients
from realign.writer import full_rank_adapter

# The patch layout (masks, values) has not changed since nlsr/1: patches prepared before the
# official region rules still apply, with the regions they were prepared with.
PATCH_FORMAT = "nlsr/1"
# Roles that read the same input (the layer's normed hidden state): one statistic serves them all.
SHARED_INPUT = (("q", "k", "v"), ("gate", "up"))


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


def region_group(p: NLSRParams) -> str:
    """The group scores compete in: the official rule per score unless ``group`` says otherwise."""
    if p.granularity == "row":
        return "matrix"
    if p.group != "auto":
        return p.group
    return "matrix" if p.score == "lowrank" else "row"


# ============================================================================ step 2: scores and region
def lowrank_projection(w: torch.Tensor, r: int, *, gram: torch.Tensor | None = None,
                       out_gram: torch.Tensor | None = None, half: torch.Tensor | None = None) -> torch.Tensor:
    """W̃ = U_r U_rᵀ W, with U_r the top-r eigenvectors of W G Wᵀ (G = XᵀX), i.e. the top-r right
    singular vectors of S = X Wᵀ — from the input Gram G, or from SᵀS (``out_gram``) directly.

    Exact, in float64 (the boundary at r sits among small eigenvalues; the official code uses a
    randomised SVD instead), in the smaller of the two spaces: eigh of W G Wᵀ (d_out × d_out) when
    d_out ≤ d_in; else, with G = H Hᵀ (``half``, shareable by modules that read the same input) and
    M = W H, eigh of MᵀM (d_in × d_in), since U_r U_rᵀ W = M V_r Λ_r⁻¹ V_rᵀ Mᵀ W. Directions the
    data never reaches (zero eigenvalues) are not kept."""
    w64 = w.double()
    d_out, d_in = w.shape
    r = max(0, min(r, d_out, d_in))
    if r == 0:
        return torch.zeros_like(w, dtype=torch.float32)
    if out_gram is not None:
        u = _top_eigvecs(out_gram.double(), r)
    elif gram is None and half is None:
        raise ValueError("lowrank_projection needs gram, half or out_gram")
    elif d_out <= d_in and gram is not None:
        u = _top_eigvecs(w64 @ gram.double() @ w64.T, r)
    else:
        h = (half if half is not None else gram_half(gram)).double()  # type: ignore[arg-type]
        k = h.T @ (w64.T @ w64)  # Mᵀ W
        lam, v = torch.linalg.eigh(_sym(k @ h))  # MᵀM
        lam, v = lam[-r:], v[:, -r:]
        keep = lam > max(float(lam.max()), 0.0) * 1e-12
        if not bool(keep.any()):
            return torch.zeros_like(w, dtype=torch.float32)
        lam, v = lam[keep], v[:, keep]
        return (w64 @ (h @ ((v / lam) @ (v.T @ k)))).float()
    return (u @ (u.T @ w64)).float()


def gram_half(gram: torch.Tensor) -> torch.Tensor:
    """H with G = H Hᵀ (float64), from one eigendecomposition of the input Gram G."""
    lam, v = torch.linalg.eigh(_sym(gram.double()))
    return v * lam.clamp_min(0).sqrt()


def _sym(k: torch.Tensor) -> torch.Tensor:
    return (k + k.T) / 2  # running sums drift from exact symmetry; eigh reads one triangle


def _top_eigvecs(k: torch.Tensor, r: int) -> torch.Tensor:
    _, v = torch.linalg.eigh(_sym(k))  # ascending eigenvalues
    return v[:, k.shape[0] - r:]


def wanda_score(w: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ (``sqnorm`` = Σ x_j² over the calibration tokens)."""
    return w.abs().float() * sqnorm.float().clamp_min(0).sqrt().unsqueeze(0)


def factor_gradients(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂A, ∂L/∂B) from G = ∂L/∂W when W = W_b + s·B·A (chain rule; no second pass needed)."""
    g = g.float()
    return scale * (b.float().T @ g), scale * (g @ a.float().T)


def region_mask(score: torch.Tensor, sparsity: float, granularity: str = "entry",
                group: str = "matrix") -> torch.Tensor:
    """The safety region of one matrix: the entries scored strictly above the ⌊n·sparsity⌋-th of
    the n scores of their group (the whole matrix, or their output row: ``group="row"``), the
    official count (``realign.masks.keep_above``); with ``granularity="row"``, whole output rows
    by summed score, compared in the same way."""
    if granularity == "row":
        return keep_above(score.float().sum(1), sparsity).unsqueeze(1).expand_as(score).contiguous()
    return keep_above(score, sparsity, dim=1 if group == "row" else None)


# ============================================================================ step 3: which modules
def factor_inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    """⟨B1A1, B2A2⟩_F = tr(A1ᵀB1ᵀB2A2) = Σ (B1ᵀB2) ⊙ (A1A2ᵀ): r × r matrices only, never d_out × d_in."""
    return float(((b1.T @ b2).double() * (a1 @ a2.T).double()).sum())


def factor_cosine(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                  norm2_sq: float | None = None) -> float:
    """cos(vec(B1·A1), vec(B2·A2)) without forming the products (``norm2_sq``: ‖B2A2‖², when known)."""
    a1, b1, a2, b2 = a1.float(), b1.float(), a2.float(), b2.float()
    n1 = factor_inner(a1, b1, a1, b1)
    n2 = factor_inner(a2, b2, a2, b2) if norm2_sq is None else norm2_sq
    if n1 <= 0 or n2 <= 0:
        return 0.0
    return factor_inner(a1, b1, a2, b2) / math.sqrt(n1 * n2)


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


# ============================================================================ the method
@dataclass
class _Setup:
    """Step 1's decisions: mode, W_b, and how W_e is formed."""

    mode: str
    aligned: Model
    base: Model | None
    factor: float  # lora mode: each factor of the aligned adapter is multiplied by this
    formula: str
    notes: list[str]


@dataclass
class _Module:
    layer: int
    role: str
    name: str  # the weight tensor
    module: str
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None  # lora mode: (A_e, B_e, s)
    rep: str = ""  # the module whose input statistic this one reads (q, k, v share one; gate, up too)


@dataclass
class _Region:
    """The patch being built: masks and values per matrix."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: list[dict[str, Any]] = field(default_factory=list)
    kept: int = 0
    entries: int = 0


@register
class NLSR(Method):
    name = "nlsr"
    title = "NLSR: neuron-level safety realignment"
    paper = "Yi et al., NLSR: Neuron-Level Safety Realignment of LLMs Against Harmful Fine-Tuning, AAAI 2025"
    Params = NLSRParams
    needs = ()
    uses = ("base", "calibration")  # calibration is checked in prepare: apply never needs it
    natural_output = "full"

    # ------------------------------------------------------------------------ step 1: the reference
    def _setup(self, inputs: Inputs, p: NLSRParams) -> _Setup:
        aligned, base, notes = inputs.aligned, inputs.base, []
        mode = p.mode if p.mode != "auto" else ("lora" if aligned.is_adapter else "dense")
        if mode == "lora":
            if not aligned.is_adapter:
                raise RealignError("nlsr mode=lora needs --aligned to be a LoRA adapter on the base model "
                                   "(W_a = W_b + adapter); for a full aligned checkpoint use mode=dense")
            if base is not None and Path(base.path) != Path(aligned.base.path):  # type: ignore[union-attr]
                notes.append(f"LoRA-factor mode: W_b is the aligned adapter's base {aligned.base.ref}; "  # type: ignore[union-attr]
                             f"--base {base.ref} ignored")
            base = aligned.base
            factor = math.sqrt(1 + p.alpha) if p.amplify == "paper" else 2 * p.alpha
            formula = (f"A_e = {factor:.4g}·A_a, B_e = {factor:.4g}·B_a, so W_e − W_b = {factor ** 2:.4g}·(W_a − W_b)"
                       + (" (paper: 1 + alpha)" if p.amplify == "paper" else " (official: (2·alpha)²)"))
            return _Setup(mode, aligned, base, factor, formula, notes)
        if base is None and aligned.is_adapter:
            base = aligned.base
            notes.append(f"no --base given: W_b is the base of the aligned adapter ({base.ref})")  # type: ignore[union-attr]
        if base is None:
            notes.append("no base model given: W_e = W_a (nothing to amplify), and c_j compares the fine-tuned and "
                         "reference weights themselves (W_b taken as 0), so tau thresholds are not comparable")
            return _Setup(mode, aligned, None, 1.0, "W_e = W_a (no base model)", notes)
        gain = p.alpha if p.amplify == "paper" else (2 * p.alpha) ** 2 - 1
        formula = (f"W_e = W_a + {gain:.4g}·(W_a − W_b)"
                   + (" (paper)" if p.amplify == "paper" else " (official LoRA-factor scaling (2·alpha)² − 1)"))
        return _Setup(mode, aligned, base, gain, formula, notes)

    def _dense_reference(self, s: _Setup, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_e, W_b) of one matrix in float32, from the files; W_b None without a base."""
        w_a = s.aligned.get(name).float()
        if s.base is None:
            return w_a, None
        w_b = s.base.get(name).float()
        return w_a + s.factor * (w_a - w_b), w_b

    def _reference_model(self, inputs: Inputs, s: _Setup) -> tuple[Any, Any, list[_Module]]:
        """W_e loaded as a model to run the safety data through, and the modules to score."""
        from realign.compute import load_model

        model, tokenizer = load_model(s.aligned, device=inputs.device, dtype=inputs.dtype)
        device = next(model.parameters()).device
        arch = s.aligned.arch
        modules: list[_Module] = []
        with torch.no_grad():
            for layer, role, name in arch.linear_weights():
                mod = _Module(layer, role, name, arch.module_name(layer, role))
                if s.mode == "lora":
                    f = s.aligned.lora_factors(name)
                    if f is None:
                        continue  # modules outside the adapter keep W_b = W_a: nothing to realign
                    mod.lora = (s.factor * f[0].float(), s.factor * f[1].float(), f[2])
                    w_e = _merged(s, mod.lora[0], mod.lora[1], mod)
                else:
                    w_e = self._dense_reference(s, name)[0]
                model.get_parameter(name).copy_(w_e.to(device))
                modules.append(mod)
        if not modules:
            raise RealignError(f"nlsr: the aligned adapter {s.aligned.ref} has no LoRA module on a decoder linear "
                               "weight; use mode=dense")
        for layer in {m.layer for m in modules}:
            roles = {m.role: m for m in modules if m.layer == layer}
            for group in _groups(list(roles)):
                for role in group:
                    roles[role].rep = roles[group[0]].module
        return model, tokenizer, modules

    def _encode(self, inputs: Inputs, p: NLSRParams, tokenizer) -> list[Encoded]:
        cal = inputs.require("calibration", self.name)
        rows = cal.require("a safe_response (a harmful prompt with a refusal)", cal.with_safe_response(),
                           self.name)[: p.samples]
        encoded = encode(tokenizer, [(r.prompt, r.safe_response) for r in rows], inputs.template, max_length=4096)
        # Responses are capped on their own (the official setting): prompts are never cut for them.
        encoded = [Encoded(e.input_ids[: e.prompt_len + p.max_response_tokens], e.prompt_len) for e in encoded]
        encoded = [e for e in encoded if e.response_len > 0]
        if not encoded:
            raise RealignError(f"nlsr: no calibration row of {cal.source} has a non-empty safe response")
        return encoded

    # ------------------------------------------------------------------------ step 2: the safety region
    def prepare(self, inputs: Inputs, params: NLSRParams) -> Patch:
        _check_params(params)
        p = params
        inputs.require("calibration", self.name)
        t0 = time.perf_counter()
        s = self._setup(inputs, p)  # step 1
        model, tokenizer, modules = self._reference_model(inputs, s)
        encoded = self._encode(inputs, p, tokenizer)
        timing = {"reference_model": time.perf_counter() - t0}

        # Step 2, layer by layer: the statistics of a layer, its scores and regions, and (lowrank,
        # sequential) its projections W̃ written into the model before the next layer's inputs.
        t1, scoring = time.perf_counter(), 0.0
        sequential = p.score == "lowrank" and p.activations == "sequential"
        group = region_group(p)
        region = _Region()
        passes: dict[str, Any] = {}
        for layer_modules, stats in self._statistics(model, s, modules, encoded, p, sequential, passes):
            t = time.perf_counter()
            halves: dict[str, torch.Tensor] = {}  # G = H Hᵀ per shared input of this layer
            for mod in layer_modules:
                dense = self._dense_reference(s, mod.name) if mod.lora is None else None  # (W_e, W_b)
                parts = self._scores(mod, dense, stats, p, model, halves)
                self._add_region(region, s, mod, dense, parts, p, group)
                if sequential:  # the official order: this layer holds W̃ before the next layer's inputs are made
                    w_new = (_merged(s, parts["lora_A"][1], parts["lora_B"][1], mod) if s.mode == "lora"
                             else parts[""][1])
                    with torch.no_grad():
                        model.get_parameter(mod.name).copy_(w_new)
            scoring += time.perf_counter() - t
        timing["calibration_passes"] = time.perf_counter() - t1 - scoring
        timing["scoring"] = scoring
        del model

        meta = {"format": PATCH_FORMAT, "mode": s.mode, "has_base": s.base is not None, "reference": s.formula,
                "modules": region.modules}
        if s.mode == "lora":
            # A fine-tune continuing the aligned adapter sits on the same W_b: checked at apply.
            meta["lora_base"] = {"path": str(s.base.path), "sha256": sorted(weights_sha256(s.base).values())}  # type: ignore[union-attr]
        report = {
            "mode": s.mode,
            "reference": {"formula": s.formula, "alpha": p.alpha, "amplify": p.amplify,
                          "base": s.base.ref if s.base is not None else None},
            "score": p.score,
            "statistic": passes["what"],
            "activations": p.activations if p.score == "lowrank" else "the reference model's",
            "region": {"sparsity": p.sparsity, "granularity": p.granularity, "group": group,
                       "count": "entries strictly above the floor(n·sparsity)-th score of their group",
                       "entries_kept": region.kept, "entries_total": region.entries,
                       "rank_ratio": p.rank_ratio if p.score == "lowrank" else None},
            "calibration": {"examples": len(encoded), "response_tokens": sum(e.response_len for e in encoded)},
            "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
            "notes": list(s.notes) + passes.get("notes", []),
        }
        return Patch(self.name, params_dict(p), meta, region.tensors, report)

    def _statistics(self, model, s: _Setup, modules: list[_Module], encoded: list[Encoded], p: NLSRParams,
                    sequential: bool, passes: dict[str, Any]) -> Iterator[tuple[list[_Module], Any]]:
        """Per layer (in order): its modules and what their scores need. snip: one gradient pass
        first; lowrank and wanda: the layer's statistics from a layer-by-layer run."""
        by_layer: dict[int, list[_Module]] = {}
        for mod in modules:
            by_layer.setdefault(mod.layer, []).append(mod)
        if p.score == "snip":
            passes["what"] = self._snip_what(p)
            grads = self._gradients(model, modules, encoded, p)
            for layer in sorted(by_layer):
                yield by_layer[layer], grads
            return
        passes["what"] = {
            "lowrank": "input Gram XᵀX or output Gram SᵀS per module",
            "wanda": "input column norms ‖X_j‖ per module",
        }[p.score] if s.mode == "dense" else "A·XᵀX·Aᵀ per module (the B factor's input Gram)" + (
            " and input column norms" if p.score == "wanda" else "")
        passes["what"] += (", layer by layer, each layer's inputs from the layers before it as projected"
                           if sequential else ", layer by layer over the reference model (one forward pass)")
        with Layerwise(model, s.aligned.arch, encoded, batch_size=p.batch_size, edits=sequential,
                       desc="NLSR: safe responses") as run:
            for layer in run:
                if layer.index not in by_layer:
                    continue
                yield by_layer[layer.index], layer.collect(**self._requests(model, s, by_layer[layer.index], p))
            if run.spilled:
                passes["notes"] = [f"the hidden states of {run.spilled} of {len(run.batches)} calibration batches "
                                   "did not fit in half the free memory and went through a temporary file"]

    def _requests(self, model, s: _Setup, mods: list[_Module], p: NLSRParams) -> dict[str, Any]:
        """The statistics one layer's scores need, sharing one per input where modules share it."""
        req: dict[str, Any] = {"gram": [], "out_gram": [], "sqnorm": [], "project": {}}
        roles = {m.role: m for m in mods}
        for group in _groups(list(roles)):
            rep = roles[group[0]].rep
            if p.score == "wanda":
                req["sqnorm"].append(rep)
            if s.mode == "lora":
                # A's output Gram (= B's input Gram) is all lowrank needs; wanda's B needs its diagonal.
                req["project"].update({roles[r].module: roles[r].lora[0] for r in group})  # type: ignore[index]
            elif p.score == "lowrank":
                d_in = model.get_parameter(roles[group[0]].name).shape[1]
                d_outs = [model.get_parameter(roles[r].name).shape[0] for r in group]
                # Keep the smaller statistic: one d_in² input Gram, or a d_out² output Gram per module.
                if d_in * d_in <= sum(d * d for d in d_outs):
                    req["gram"].append(rep)
                else:
                    req["out_gram"].extend(roles[r].module for r in group)
        return req

    def _snip_what(self, p: NLSRParams) -> str:
        if p.snip_gradients == "pooled":
            return "gradient of the mean safe-response NLL (one forward + backward pass)"
        return "Σ_n |∂L_n/∂W| over the safe responses n (one forward + backward pass per batch)"

    def _gradients(self, model, modules: list[_Module], encoded: list[Encoded], p: NLSRParams) -> dict[str, Any]:
        if p.snip_gradients == "pooled":
            return loss_gradients(model, encoded, [m.name for m in modules], batch_size=p.batch_size,
                                  desc="NLSR: gradient pass (safe responses)")
        transform: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        for m in modules:
            if m.lora is not None:  # per example, the factor gradients s·BᵀG_n and s·G_n·Aᵀ
                a, b, scale = m.lora
                dev = model.get_parameter(m.name).device
                a, b = a.to(dev), b.to(dev)
                transform[m.module] = lambda g, a=a, b=b, scale=scale: factor_gradients(g, a, b, scale)
        return example_gradient_sums(model, encoded, [m.module for m in modules], transform=transform,
                                     batch_size=p.batch_size, desc="NLSR: per-example gradients (safe responses)")

    def _scores(self, mod: _Module, dense: tuple[torch.Tensor, torch.Tensor | None] | None, stats: Any,
                p: NLSRParams, model, halves: dict[str, torch.Tensor]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{part: (score, W̃ for lowrank else None)} for one module: part "" (dense: W_e is
        ``dense[0]``) or the LoRA factors "lora_A" and "lora_B"."""
        device = model.get_parameter(mod.name).device
        ws = {"": dense[0]} if dense is not None else {"lora_A": mod.lora[0], "lora_B": mod.lora[1]}  # type: ignore[index]
        if p.score == "snip":
            if p.snip_gradients == "pooled":
                g = stats[mod.name].float().cpu()
                grads = {"": g} if mod.lora is None else dict(zip(
                    ("lora_A", "lora_B"), factor_gradients(g, mod.lora[0], mod.lora[1], mod.lora[2]), strict=True))
                return {k: ((w * grads[k]).abs(), None) for k, w in ws.items()}
            sums = dict(zip(ws, stats[mod.module], strict=True))
            return {k: (w.abs() * sums[k].cpu(), None) for k, w in ws.items()}
        st: Stats = stats
        rep = mod.rep
        if p.score == "wanda":
            if mod.lora is None:
                return {"": (wanda_score(ws[""], st.sqnorm[rep].cpu()), None)}
            k_a = st.proj_gram[mod.module]
            return {"lora_A": (wanda_score(ws["lora_A"], st.sqnorm[rep].cpu()), None),
                    "lora_B": (wanda_score(ws["lora_B"], torch.diagonal(k_a).cpu()), None)}
        out = {}
        for k, w in ws.items():
            r = math.floor(p.rank_ratio * min(w.shape) + 1e-9)
            if mod.lora is not None:  # A from its output Gram, B from its input Gram: both A·XᵀX·Aᵀ
                k_a = st.proj_gram[mod.module]
                proj = (lowrank_projection(w.to(device), r, out_gram=k_a) if k == "lora_A"
                        else lowrank_projection(w.to(device), r, gram=k_a))
            elif mod.module in st.out_gram:
                proj = lowrank_projection(w.to(device), r, out_gram=st.out_gram[mod.module])
            elif w.shape[0] <= w.shape[1]:
                proj = lowrank_projection(w.to(device), r, gram=st.gram[rep])
            else:  # one eigendecomposition per shared input (gate and up share one)
                if rep not in halves:
                    halves[rep] = gram_half(st.gram[rep])
                proj = lowrank_projection(w.to(device), r, half=halves[rep])
            out[k] = (proj.abs().cpu(), proj)
        return out

    def _add_region(self, region: _Region, s: _Setup, mod: _Module, dense: tuple[torch.Tensor, torch.Tensor | None]
                    | None, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]], p: NLSRParams,
                    group: str) -> None:
        """M per matrix, and the values the patch stores under it."""
        if dense is not None:
            w_e, w_b = dense
            mask = region_mask(parts[""][0], p.sparsity, p.granularity, group)
            dtype = s.aligned.dtype(mod.name) if w_b is None else torch.promote_types(
                s.aligned.dtype(mod.name), s.base.dtype(mod.name))  # type: ignore[union-attr]
            region.tensors[f"{mod.name}.mask"] = pack_mask(mask)
            region.tensors[f"{mod.name}.ref"] = gather(w_e, mask).to(dtype)
            if w_b is not None:
                region.tensors[f"{mod.name}.base"] = gather(w_b, mask).to(dtype)
            kept = int(mask.sum())
            region.modules.append({"layer": mod.layer, "role": mod.role, "name": mod.name, "module": mod.module,
                                   "shape": list(w_e.shape), "kept": kept})
            region.kept += kept
            region.entries += mask.numel()
            return
        entry: dict[str, Any] = {"layer": mod.layer, "role": mod.role, "name": mod.name, "module": mod.module,
                                 "scale": mod.lora[2]}
        stored = []
        adapter = s.aligned.adapter
        for part, w in (("lora_A", mod.lora[0]), ("lora_B", mod.lora[1])):
            mask = region_mask(parts[part][0], p.sparsity, p.granularity, group)
            dtype = adapter.store.dtype(adapter.modules[mod.module][part == "lora_B"])  # type: ignore[union-attr]
            region.tensors[f"{mod.module}.{part}.mask"] = pack_mask(mask)
            region.tensors[f"{mod.module}.{part}.ref"] = gather(w, mask).to(dtype)
            # what apply compares with: the stored values, as they will be read back
            stored.append(scattered(mask, region.tensors[f"{mod.module}.{part}.ref"]))
            entry[f"{part}_shape"] = list(w.shape)
            entry[f"{part}_kept"] = int(mask.sum())
            region.kept += int(mask.sum())
            region.entries += mask.numel()
        entry["ref_norm2"] = factor_inner(stored[0], stored[1], stored[0], stored[1])
        region.modules.append(entry)

    # ------------------------------------------------------------------------ steps 3 and 4: apply
    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: NLSRParams) -> Edit:
        _check_params(params)
        meta = patch.meta
        if meta.get("format") != PATCH_FORMAT:
            raise RealignError(f"this nlsr patch has format {meta.get('format')!r}; this version reads "
                               f"{PATCH_FORMAT}: prepare it again")
        if meta["mode"] == "lora":
            return self._apply_factors(patch, finetuned, params)
        return self._apply_dense(patch, finetuned, params)

    def _selection(self, c: list[float], p: NLSRParams) -> Selection:
        return select_modules(c, p.selection, prune_rate=p.prune_rate, epsilon=p.epsilon, seed=p.seed, tau=p.tau,
                              k=p.k, direction=p.direction)

    def _apply_dense(self, patch: Patch, ft: Model, p: NLSRParams) -> Edit:
        tensors = patch.tensors
        rows: list[dict[str, Any]] = []
        modules = patch.meta["modules"]
        has_base = patch.meta["has_base"]
        for mod in modules:
            name, shape = mod["name"], tuple(mod["shape"])
            if name not in ft or tuple(ft.shape(name)) != shape:
                got = list(ft.shape(name)) if name in ft else "missing"
                raise RealignError(f"the patch does not fit fine-tune {ft.ref}: {name} is {got}, the patch was "
                                   f"prepared for {list(shape)}")

        def read(mod: dict[str, Any]) -> tuple[torch.Tensor, ...]:
            name = mod["name"]
            return (ft.get(name), tensors[f"{name}.mask"], tensors[f"{name}.ref"],
                    tensors[f"{name}.base"] if has_base else None)

        # Step 3: c_j per module. The next module's tensors are read while this one is scored.
        from realign.tensorio import prefetched

        for mod, arrays in progress(prefetched(modules, read), desc="NLSR: similarity per module",
                                    total=len(modules), unit="module"):
            c, changed = masked_similarity(*arrays)
            del arrays
            rows.append({"module": mod["module"], "layer": mod["layer"], "role": mod["role"], "c": c,
                         "entries_changed": changed, "entries": math.prod(mod["shape"]), "region": mod["kept"]})
        sel = self._selection([r["c"] for r in rows], p)
        # Step 4: the transplant, done by the writer tensor by tensor.
        transforms: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, int]]] = {}
        for mod, restored in zip(modules, sel.restored, strict=True):
            if restored:
                transforms[mod["name"]] = self._transplant_fn(tensors, mod["name"])
        changed = sum(r["entries_changed"] for r, on in zip(rows, sel.restored, strict=True) if on)
        entries = sum(r["entries"] for r in rows)
        notes: list[str] = []
        adapter = None
        if ft.is_adapter:
            adapter = full_rank_adapter(ft, {m["module"]: (m["name"], *m["shape"]) for m, on in
                                             zip(modules, sel.restored, strict=True) if on}, transforms)
            if any(sel.restored):
                notes.append("dense mode on a LoRA fine-tune: the default output is a full checkpoint; with --output "
                             "adapter the restored modules are stored at full rank (exact, not low-rank)")
        report = self._report(patch, p, rows, sel, changed, entries, notes)
        return Edit(transforms=transforms, adapter=adapter, report=report, dense=True)

    @staticmethod
    def _transplant_fn(tensors, name: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
        # The mask and values are re-read when the writer reaches this tensor: memory stays one module.
        # The writer hands over a fresh copy of W_f: transplanted in place, with the changes counted.
        def fn(old: torch.Tensor) -> tuple[torch.Tensor, int]:
            return transplant_packed(old, tensors[f"{name}.mask"], tensors[f"{name}.ref"], in_place=True)
        return fn

    def _apply_factors(self, patch: Patch, ft: Model, p: NLSRParams) -> Edit:
        if not ft.is_adapter:
            raise RealignError("this nlsr patch was prepared in LoRA-factor mode (aligned = base + adapter): it "
                               "applies to LoRA adapters that continue the aligned adapter; for other fine-tunes "
                               "prepare with --set mode=dense")
        adapter = ft.adapter
        assert adapter is not None and ft.base is not None
        recorded = patch.meta["lora_base"]
        if str(ft.base.path) != recorded["path"] and sorted(weights_sha256(ft.base).values()) != recorded["sha256"]:
            raise RealignError(f"fine-tune {ft.ref} is an adapter on {ft.base.ref}, the aligned adapter is on "
                               f"{recorded['path']}: LoRA-factor mode needs the fine-tune to continue the aligned "
                               "adapter on the same base (else prepare with --set mode=dense)")
        tensors = patch.tensors
        modules = patch.meta["modules"]
        notes: list[str] = []
        rows: list[dict[str, Any]] = []
        for mod in progress(modules, desc="NLSR: similarity per module", total=len(modules), unit="module"):
            module = mod["module"]
            got = ft.lora_factors(mod["name"])
            if got is None:
                raise RealignError(f"fine-tune {ft.ref} has no LoRA factors for {module}: LoRA-factor mode needs "
                                   "the fine-tune to continue the aligned adapter (else prepare with --set mode=dense)")
            a_f, b_f, scale = got
            if list(a_f.shape) != mod["lora_A_shape"] or list(b_f.shape) != mod["lora_B_shape"]:
                raise RealignError(f"fine-tune {ft.ref}: {module} has LoRA factors {list(b_f.shape)}·{list(a_f.shape)}"
                                   f", the aligned adapter {mod['lora_B_shape']}·{mod['lora_A_shape']}: it does not "
                                   "continue the aligned adapter (prepare with --set mode=dense)")
            if not math.isclose(scale, mod["scale"], rel_tol=1e-6):
                raise RealignError(f"fine-tune {ft.ref}: {module} has LoRA scale {scale:g}, the aligned adapter "
                                   f"{mod['scale']:g}: factor values cannot be transplanted between them "
                                   "(prepare with --set mode=dense)")
            m_a = unpack_mask(tensors[f"{module}.lora_A.mask"], tuple(a_f.shape))
            m_b = unpack_mask(tensors[f"{module}.lora_B.mask"], tuple(b_f.shape))
            e_a, e_b = tensors[f"{module}.lora_A.ref"], tensors[f"{module}.lora_B.ref"]
            changed = (int(torch.count_nonzero(e_a.to(a_f.dtype) != gather(a_f, m_a)))
                       + int(torch.count_nonzero(e_b.to(b_f.dtype) != gather(b_f, m_b))))
            # Step 3: mask A and B separately, multiply, then compare (the product is the update ΔW, up to s).
            c = factor_cosine(masked(a_f, m_a), masked(b_f, m_b), scattered(m_a, e_a), scattered(m_b, e_b),
                              mod.get("ref_norm2"))
            rows.append({"module": module, "layer": mod["layer"], "role": mod["role"], "c": c,
                         "entries_changed": changed, "entries": a_f.numel() + b_f.numel(),
                         "region": mod["lora_A_kept"] + mod["lora_B_kept"]})
        sel = self._selection([r["c"] for r in rows], p)
        # Step 4: the factors of the restored modules (read again: nothing per module was kept).
        out: dict[str, torch.Tensor] = {}
        restored = {mod["module"] for mod, on in zip(modules, sel.restored, strict=True) if on}
        for module in restored:
            a_f, b_f, _ = adapter.factors(module)  # type: ignore[misc]
            a_name, b_name = adapter.modules[module]
            m_a = unpack_mask(tensors[f"{module}.lora_A.mask"], tuple(a_f.shape))
            m_b = unpack_mask(tensors[f"{module}.lora_B.mask"], tuple(b_f.shape))
            out[a_name] = transplant(a_f, m_a, tensors[f"{module}.lora_A.ref"])
            out[b_name] = transplant(b_f, m_b, tensors[f"{module}.lora_B.ref"])
        for t in adapter.store.names:
            if t not in out:
                out[t] = adapter.store.get(t)
        extra = sorted(set(adapter.modules) - {m["module"] for m in modules})
        if extra:
            notes.append(f"{len(extra)} LoRA modules of the fine-tune are not in the aligned adapter and were kept "
                         f"as they are (e.g. {extra[0]})")
        changed = sum(r["entries_changed"] for r, on in zip(rows, sel.restored, strict=True) if on)
        entries = sum(r["entries"] for r in rows)
        report = self._report(patch, p, rows, sel, changed, entries, notes)
        return Edit(adapter={"config": dict(adapter.config), "tensors": out}, report=report, dense=False)

    def _report(self, patch: Patch, p: NLSRParams, rows: list[dict[str, Any]], sel: Selection, changed: int,
                entries: int, notes: list[str]) -> dict[str, Any]:
        for i, row in enumerate(rows):
            row["rank"] = sel.rank[i]
            if sel.probability is not None:
                row["p"] = round(sel.probability[i], 6)
            row["restored"] = sel.restored[i]
            if not sel.restored[i]:
                row["entries_changed"] = 0
            row["fraction_changed"] = round(row["entries_changed"] / row["entries"], 6)
            row["c"] = round(row["c"], 6)
        restored = sum(sel.restored)
        selection = {"mode": p.selection}
        if p.selection == "adaptive":
            selection.update(direction=p.direction, prune_rate=p.prune_rate, epsilon=p.epsilon, seed=p.seed)
        elif p.selection == "threshold":
            selection.update(tau=p.tau)
        else:
            selection.update(k=p.k if p.k is not None else round(p.prune_rate * len(rows)))
        prep = patch.params
        return {
            "mode": patch.meta["mode"],
            "reference": patch.meta.get("reference"),
            "selection": selection,
            "modules": rows,
            "changed": {"entries": changed, "of_entries": entries,
                        "percent": round(100.0 * changed / max(entries, 1), 4)},
            "totals": {
                "mode": patch.meta["mode"],
                "modules_restored": f"{restored}/{len(rows)}",
                "selection": p.selection,
                "direction": p.direction if p.selection == "adaptive" else "-",
                "seed": p.seed if p.selection == "adaptive" else "-",
                "alpha": prep.get("alpha"),
                "amplify": prep.get("amplify"),
                "score": prep.get("score"),
                # patches from before the option read every layer from W_e in one pass
                "activations": prep.get("activations", "one-pass") if prep.get("score") == "lowrank" else "-",
                "sparsity": prep.get("sparsity"),
            },
            "notes": notes,
        }


def _merged(s: _Setup, a: torch.Tensor, b: torch.Tensor, mod: _Module) -> torch.Tensor:
    """W_b + s·B·A of a module in LoRA-factor mode (float32)."""
    return s.base.get(mod.name).float() + mod.lora[2] * (b.float().cpu() @ a.float().cpu())  # type: ignore[union-attr,index]


def _groups(roles: list[str]) -> list[tuple[str, ...]]:
    """Partition a layer's roles into groups that read the same input."""
    out, seen = [], set()
    for group in SHARED_INPUT:
        present = tuple(r for r in group if r in roles)
        if present:
            out.append(present)
            seen.update(present)
    out.extend((r,) for r in roles if r not in seen)
    return out
