"""NLSR — Neuron-Level Safety Realignment (Yi et al., AAAI 2025, arXiv 2412.12497).

Training-free: transplant the "safety-critical neurons" of a safety reference model into the
modules of a fine-tune whose safety neurons drifted most.

prepare (once per aligned model):
  1. reference model (pre-amplification, ExPO)   W_e = W_a + α·(W_a − W_b)
  2. score every weight of W_e on safe responses (ONE calibration pass of W_e, response tokens
     only) — ``lowrank`` |U_r U_rᵀ W| (default), ``wanda`` |W|·‖X_j‖, or ``snip`` |W·∂L/∂W| — and
     keep the top (1 − sparsity) of each matrix: the safety region M.
  The patch stores, per matrix, M (bit-packed), W_e[M] and W_b[M] (1-D, row-major order), so
  applying it needs only the patch and the fine-tune's weights.
apply (per fine-tune, tensor by tensor):
  3. c_j = cos(M⊙(W_f − W_b), M⊙(W_e − W_b)) per module; choose modules (adaptive / threshold /
     fraction); 4. transplant W_f ← (1 − M)⊙W_f + M⊙W_e in the chosen modules. Nothing else changes.

Two modes. ``dense`` works on dense weights: full fine-tunes, and fresh LoRA adapters on top of
W_a (seen as W_a + s·B·A, one module at a time). ``lora`` is the official setting: the aligned
model is W_b + adapter, the fine-tune continued training that adapter; masks are computed on the
A and B factors (their inputs are x and A·x), the transplant edits the factors, the output is an adapter.

Memory. prepare holds the reference model (one model, on the compute device), the running sums
of the pass (per layer and shared input, the smaller of one d_in² input Gram and the modules'
d_out² output Grams, float32: about 8.6 GB for Llama-3-8B; ``wanda`` needs only column norms,
``snip`` one gradient per linear weight), and the patch being built (1 bit per weight plus the
two value vectors: ≈ 0.93 byte per weight in bf16, ≈ 6.5 GB for an 8B model). The decompositions
run one matrix at a time, in float64. apply streams: per module it reads W_f, the mask and the
values, and keeps nothing but c_j; the writer later re-reads what it transplants.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param, params_dict
from realign.progress import progress
from realign.sources import LoraAdapter, Model, weights_sha256
from realign.stats import Encoded, collect, encode, loss_gradients
from realign.tensorio import prefetched

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
        "lowrank", "safety score: lowrank |U_r U_rᵀ W| (activation-aware low rank), wanda |W|·‖X_j‖, snip |W·∂L/∂W|",
        choices=("lowrank", "wanda", "snip"))
    rank_ratio: float = param(0.8, "lowrank: r = floor(rank_ratio · min(d_out, d_in)) output directions kept")
    sparsity: float = param(0.8, "share of each matrix outside the safety region (region: top 1 − sparsity)")
    granularity: str = param("entry", "region unit: single entries, or whole output rows (neurons)",
                             choices=("entry", "row"))
    samples: int = param(2000, "calibration rows with a safe response used (the first N)")
    max_response_tokens: int = param(256, "safe responses are cut to this many tokens")
    batch_size: int = param(8, "calibration batch size")
    selection: str = param("adaptive", "which modules to restore: adaptive (seeded Bernoulli draw by similarity "
                           "rank), threshold (c_j < tau), fraction (the k least similar)", stage="apply",
                           choices=("adaptive", "threshold", "fraction"))
    direction: str = param("paper", "adaptive: paper = the least similar module is the most likely restored; "
                           "official = the official code's reverse order", stage="apply",
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
    ]
    for ok, msg in checks:
        if not ok:
            raise RealignError(f"nlsr: {msg}")


# ============================================================================ the formulas
def lowrank_projection(w: torch.Tensor, r: int, *, gram: torch.Tensor | None = None,
                       out_gram: torch.Tensor | None = None, half: torch.Tensor | None = None) -> torch.Tensor:
    """W̃ = U_r U_rᵀ W, with U_r the top-r eigenvectors of W G Wᵀ (G = XᵀX), i.e. the top-r right
    singular vectors of S = X Wᵀ — from the input Gram G, or from SᵀS (``out_gram``) directly.

    Computed in float64 (the boundary at r sits among small eigenvalues), in the smaller of the
    two spaces: eigh of W G Wᵀ (d_out × d_out) when d_out ≤ d_in; else, with G = H Hᵀ (``half``,
    shareable by modules that read the same input) and M = W H, eigh of MᵀM (d_in × d_in), since
    U_r U_rᵀ W = M V_r Λ_r⁻¹ V_rᵀ Mᵀ W. Directions the data never reaches (zero eigenvalues) are
    not kept."""
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
        c = w64.T @ w64
        lam, v = torch.linalg.eigh(_sym(h.T @ c @ h))
        lam, v = lam[-r:], v[:, -r:]
        keep = lam > max(float(lam.max()), 0.0) * 1e-12
        if not bool(keep.any()):
            return torch.zeros_like(w, dtype=torch.float32)
        lam, v = lam[keep], v[:, keep]
        return (w64 @ (h @ ((v / lam) @ (v.T @ (h.T @ c))))).float()
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


def top_mask(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of exactly ``keep`` largest entries (ties broken by position, deterministically)."""
    flat = torch.nan_to_num(score.reshape(-1).float(), nan=0.0)
    n = flat.numel()
    if keep >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = torch.kthvalue(flat, n - keep).values
    mask = flat > thresh
    missing = keep - int(mask.sum())
    if missing > 0:
        ties = (flat == thresh).nonzero().flatten()[:missing]
        mask[ties] = True
    return mask.reshape(score.shape)


def _keep_count(n: int, sparsity: float) -> int:
    return n - math.floor(n * sparsity + 1e-9)


def region_mask(score: torch.Tensor, sparsity: float, granularity: str = "entry") -> torch.Tensor:
    """The safety region of one matrix: the top (1 − sparsity) of its entries by score, or of its
    output rows by summed score (``granularity="row"``)."""
    if granularity == "row":
        rows = top_mask(score.float().sum(1), _keep_count(score.shape[0], sparsity))
        return rows.unsqueeze(1).expand_as(score).contiguous()
    return top_mask(score, _keep_count(score.numel(), sparsity))


# Masks and gathers go through numpy: its bit packing and compress/put are several times faster
# than torch's boolean indexing on CPU, which matters when apply streams a multi-GB checkpoint.
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> np.ndarray:
    """The raw bits of a contiguous CPU tensor as a numpy integer array (sharing memory; bf16
    has no numpy dtype, and copying values needs none)."""
    return x.reshape(-1).view(_INT_VIEW[x.element_size()]).numpy()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 bits (row-major, most significant bit first): 1 bit per entry."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).view(np.bool_)).view(shape)


def gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entries of ``x`` under ``mask``, row-major, in x's dtype (= x.reshape(-1)[mask.reshape(-1)])."""
    x = x.detach().cpu().contiguous()
    return torch.from_numpy(np.compress(mask.reshape(-1).cpu().numpy(), _bits(x))).view(x.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(vec a, vec b), accumulated in float64; 0 when either side is all zeros (no direction)."""
    def flat(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu().reshape(-1)
        return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()

    x, y = flat(a), flat(b)
    xx = np.einsum("i,i->", x, x, dtype=np.float64)
    yy = np.einsum("i,i->", y, y, dtype=np.float64)
    if xx == 0 or yy == 0:
        return 0.0
    return float(np.einsum("i,i->", x, y, dtype=np.float64) / math.sqrt(xx * yy))


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


def factor_gradients(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂A, ∂L/∂B) from G = ∂L/∂W when W = W_b + s·B·A (chain rule; no second pass needed)."""
    g = g.float()
    return scale * (b.float().T @ g), scale * (g @ a.float().T)


def transplant(w: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(1 − M)⊙W + M⊙W_e, with W_e given by its values under M (row-major order)."""
    new = w.clone(memory_format=torch.contiguous_format)
    np.put(_bits(new), np.flatnonzero(mask.reshape(-1).numpy()), _bits(values.to(new.dtype).contiguous()))
    return new


# apply streams a whole checkpoint through the two functions below: they work on row-major chunks
# of a matrix, straight from the packed mask bits (no full boolean mask, no full float copies),
# in a few threads (numpy and torch release the GIL), and add the chunks up in a fixed order.
_CHUNK = 1 << 20  # entries (a multiple of 8 so chunks start on a mask byte); small: 4 threads hold one each
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(packed: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT[packed].sum(dtype=np.int64))


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                   thread_name_prefix="realign-nlsr")
    return _POOL


def _chunks(packed: torch.Tensor, n: int) -> list[tuple[int, int, int]]:
    """(first entry, entries, offset of the chunk's first masked entry in the value vectors)."""
    bits = packed.numpy()
    out, offset = [], 0
    for start in range(0, n, _CHUNK):
        size = min(_CHUNK, n - start)
        out.append((start, size, offset))
        offset += _popcount(bits[start // 8:(start + size + 7) // 8])
    return out


def _chunk_mask(packed: torch.Tensor, start: int, size: int) -> np.ndarray:
    return np.unpackbits(packed.numpy()[start // 8:(start + size + 7) // 8], count=size).view(np.bool_)


def masked_similarity(w_f: torch.Tensor, packed: torch.Tensor, ref: torch.Tensor,
                      base: torch.Tensor | None = None) -> tuple[float, int]:
    """(c, changed) for one module: c = cos(W_f[M] − W_b[M], W_e[M] − W_b[M]) (without ``base``:
    cos(W_f[M], W_e[M])), accumulated in float64; changed = entries where W_e[M] differs from
    W_f[M] in W_f's dtype. Equal to ``cosine(gather(...) − base, ref − base)`` with the differences
    taken in float64, up to summation order."""
    w_f = w_f.detach().cpu().contiguous()
    bits, dtype = _bits(w_f), w_f.dtype

    def part(chunk: tuple[int, int, int]) -> tuple[float, float, float, int]:
        start, size, offset = chunk
        f = torch.from_numpy(np.compress(_chunk_mask(packed, start, size), bits[start:start + size])).view(dtype)
        e = ref[offset:offset + f.numel()]
        changed = int(torch.count_nonzero(e.to(dtype) != f))
        # float64: exact differences and products of the stored values, new tensors (the patch is never touched)
        x, y = f.double(), e.double()
        if base is not None:
            b = base[offset:offset + f.numel()].double()
            x, y = x.sub_(b), y.sub_(b)
        return float(x @ x), float(y @ y), float(x @ y), changed

    parts = list(_pool().map(part, _chunks(packed, w_f.numel())))
    xx, yy, xy = (math.fsum(p[i] for p in parts) for i in range(3))
    changed = sum(p[3] for p in parts)
    if xx == 0 or yy == 0:
        return 0.0, changed
    return xy / math.sqrt(xx * yy), changed


def transplant_packed(w: torch.Tensor, packed: torch.Tensor, values: torch.Tensor,
                      in_place: bool = False) -> tuple[torch.Tensor, int]:
    """``transplant`` with the mask given as packed bits, chunk by chunk in threads. Returns the
    new tensor and how many entries changed value (``new != w``). ``in_place``: write into ``w``
    itself (a contiguous CPU tensor the caller owns), sparing a copy of the whole matrix."""
    new = w if in_place else w.detach().cpu().clone(memory_format=torch.contiguous_format)
    if in_place and (new.device.type != "cpu" or not new.is_contiguous()):
        raise ValueError("in_place needs a contiguous CPU tensor")
    bits, vals = _bits(new), _bits(values.to(new.dtype).contiguous())
    dtype = new.dtype

    def part(chunk: tuple[int, int, int]) -> int:
        start, size, offset = chunk
        where = np.flatnonzero(_chunk_mask(packed, start, size))
        region, incoming = bits[start:start + size], vals[offset:offset + where.size]
        # compared as values of the dtype (−0 = +0, NaN ≠ NaN), as ``new != w`` would
        changed = int(torch.count_nonzero(torch.from_numpy(region[where]).view(dtype)
                                          != torch.from_numpy(incoming).view(dtype)))
        np.put(region, where, incoming)
        return changed

    changed = sum(_pool().map(part, _chunks(packed, new.numel())))
    return new, changed


def _scattered(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 zeros with ``values`` under ``mask`` (M⊙W_e from the stored values)."""
    out = torch.zeros(mask.shape)
    np.put(_bits(out), np.flatnonzero(mask.reshape(-1).numpy()), _bits(values.float().contiguous()))
    return out


def _masked(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 M⊙W (one new tensor, zeroed in place)."""
    return w.to(torch.float32, copy=True).masked_fill_(~mask, 0.0)


# ============================================================================ the method
class _Lazy(Mapping):
    """Tensors produced on first access and kept (adapter outputs are small and read twice)."""

    def __init__(self, producers: dict[str, Callable[[], torch.Tensor]]):
        self._producers = producers
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self._producers[key]()
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._producers)

    def __len__(self) -> int:
        return len(self._producers)


@dataclass
class _Setup:
    """What prepare decided about the models: mode, W_b, and how W_e is formed."""

    mode: str
    aligned: Model
    base: Model | None
    factor: float  # lora mode: each factor of the aligned adapter is multiplied by this
    formula: str
    notes: list[str]


@dataclass
class _Calib:
    """The result of the one calibration pass."""

    stats: Any  # realign.stats.Stats, or None for snip
    grads: dict[str, torch.Tensor] | None  # snip: ∂L/∂W per weight name
    rep: dict[str, str]  # module -> the module whose input statistic it shares
    source: str  # what was collected, for the report
    halves: dict[str, torch.Tensor] = field(default_factory=dict)  # G = H Hᵀ of the current shared input


@register
class NLSR(Method):
    name = "nlsr"
    title = "NLSR: neuron-level safety realignment"
    paper = "Yi et al., NLSR: Neuron-Level Safety Realignment of LLMs Against Harmful Fine-Tuning, AAAI 2025"
    Params = NLSRParams
    needs = ()
    uses = ("base", "calibration")  # calibration is checked in prepare: apply never needs it
    natural_output = "full"

    # ------------------------------------------------------------------------ prepare
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
        """(W_e, W_b) of one matrix in float32; W_b None without a base."""
        w_a = s.aligned.get(name).float()
        if s.base is None:
            return w_a, None
        w_b = s.base.get(name).float()
        return w_a + s.factor * (w_a - w_b), w_b

    def _factor_reference(self, s: _Setup, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        f = s.aligned.lora_factors(name)
        if f is None:
            return None
        a, b, scale = f
        return s.factor * a.float(), s.factor * b.float(), scale

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

    def prepare(self, inputs: Inputs, params: NLSRParams) -> Patch:
        from realign.compute import load_model

        _check_params(params)
        p = params
        s = self._setup(inputs, p)
        arch = s.aligned.arch
        inputs.require("calibration", self.name)
        timing: dict[str, float] = {}
        t0 = time.perf_counter()

        # The reference model W_e, in memory, for the calibration pass (one model's worth of memory).
        model, tokenizer = load_model(s.aligned, device=inputs.device, dtype=inputs.dtype)
        device = next(model.parameters()).device
        layers: list[tuple[int, str, str]] = []
        lora_ref: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        with torch.no_grad():
            for layer, role, name in arch.linear_weights():
                if s.mode == "lora":
                    ref = self._factor_reference(s, name)
                    if ref is None:
                        continue  # modules outside the adapter keep W_b = W_a: nothing to realign
                    a_e, b_e, scale = ref
                    lora_ref[name] = ref
                    w_e = s.base.get(name).float() + scale * (b_e @ a_e)  # type: ignore[union-attr]
                else:
                    w_e = self._dense_reference(s, name)[0]
                model.get_parameter(name).data.copy_(w_e.to(device))
                layers.append((layer, role, name))
        if not layers:
            raise RealignError(f"nlsr: the aligned adapter {s.aligned.ref} has no LoRA module on a decoder linear "
                               "weight; use mode=dense")
        encoded = self._encode(inputs, p, tokenizer)
        timing["reference_model"] = time.perf_counter() - t0

        # ONE pass over the safe responses: running sums for the chosen score.
        t1 = time.perf_counter()
        calib = self._statistics(model, arch, layers, lora_ref, encoded, s, p)
        timing["calibration_pass"] = time.perf_counter() - t1
        del model
        tokens = sum(e.response_len for e in encoded)

        # Score, keep the top (1 − sparsity) of each matrix, store M, W_e[M], W_b[M].
        t2 = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        modules: list[dict[str, Any]] = []
        kept_total = entries_total = 0
        for layer, role, name in progress(layers, desc="NLSR: safety region", total=len(layers), unit="module"):
            module = arch.module_name(layer, role)
            if s.mode == "lora":
                a_e, b_e, scale = lora_ref[name]
                score_a, score_b = self._factor_scores(a_e, b_e, scale, module, name, calib, p, device)
                entry: dict[str, Any] = {"layer": layer, "role": role, "name": name, "module": module,
                                         "scale": scale}
                masked = []
                for part, w, score in (("lora_A", a_e, score_a), ("lora_B", b_e, score_b)):
                    mask = region_mask(score, p.sparsity, p.granularity)
                    dtype = s.aligned.adapter.store.dtype(s.aligned.adapter.modules[module][part == "lora_B"])  # type: ignore[union-attr]
                    tensors[f"{module}.{part}.mask"] = pack_mask(mask)
                    tensors[f"{module}.{part}.ref"] = gather(w, mask).to(dtype)
                    # what apply compares with: the stored values, as they will be read back
                    masked.append(_scattered(mask, tensors[f"{module}.{part}.ref"]))
                    entry[f"{part}_shape"] = list(w.shape)
                    entry[f"{part}_kept"] = int(mask.sum())
                    kept_total += int(mask.sum())
                    entries_total += mask.numel()
                entry["ref_norm2"] = factor_inner(masked[0], masked[1], masked[0], masked[1])
                modules.append(entry)
                continue
            w_e, w_b = self._dense_reference(s, name)
            score = self._dense_score(w_e, module, name, calib, p, device)
            mask = region_mask(score, p.sparsity, p.granularity)
            flat = mask.reshape(-1)
            dtype = s.aligned.dtype(name) if w_b is None else torch.promote_types(s.aligned.dtype(name),
                                                                                  s.base.dtype(name))  # type: ignore[union-attr]
            tensors[f"{name}.mask"] = pack_mask(mask)
            tensors[f"{name}.ref"] = gather(w_e, mask).to(dtype)
            if w_b is not None:
                tensors[f"{name}.base"] = gather(w_b, mask).to(dtype)
            modules.append({"layer": layer, "role": role, "name": name, "module": module, "shape": list(w_e.shape),
                            "kept": int(flat.sum())})
            kept_total += int(flat.sum())
            entries_total += flat.numel()
        timing["scoring"] = time.perf_counter() - t2

        meta = {
            "format": PATCH_FORMAT,
            "mode": s.mode,
            "has_base": s.base is not None,
            "reference": s.formula,
            "modules": modules,
        }
        if s.mode == "lora":
            # A fine-tune continuing the aligned adapter sits on the same W_b: checked at apply.
            meta["lora_base"] = {"path": str(s.base.path), "sha256": sorted(weights_sha256(s.base).values())}  # type: ignore[union-attr]
        report = {
            "mode": s.mode,
            "reference": {"formula": s.formula, "alpha": p.alpha, "amplify": p.amplify,
                          "base": s.base.ref if s.base is not None else None},
            "score": p.score,
            "statistic": calib.source,
            "region": {"sparsity": p.sparsity, "granularity": p.granularity, "entries_kept": kept_total,
                       "entries_total": entries_total, "rank_ratio": p.rank_ratio if p.score == "lowrank" else None},
            "calibration": {"examples": len(encoded), "response_tokens": tokens},
            "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
            "notes": list(s.notes),
        }
        return Patch(self.name, params_dict(p), meta, tensors, report)

    def _statistics(self, model, arch, layers, lora_ref, encoded, s: _Setup, p: NLSRParams) -> _Calib:
        """The one calibration pass over the safe responses, collecting only what the score needs."""
        if p.score == "snip":
            grads = loss_gradients(model, encoded, [name for _, _, name in layers], batch_size=p.batch_size,
                                   desc="NLSR: gradient pass (safe responses)")
            return _Calib(None, grads, {}, "gradient of the safe-response NLL (one forward + backward pass)")
        by_layer: dict[int, dict[str, str]] = {}
        for layer, role, name in layers:
            by_layer.setdefault(layer, {})[role] = name
        gram, out_gram, sqnorm = [], [], []
        project: dict[str, torch.Tensor] = {}
        shared: dict[str, str] = {}
        for layer, roles in by_layer.items():
            for group in _groups(list(roles)):
                rep = arch.module_name(layer, group[0])
                shared.update({arch.module_name(layer, r): rep for r in group})
                if p.score == "wanda":
                    sqnorm.append(rep)
                if s.mode == "lora":
                    # A's output Gram (= B's input Gram) is all lowrank needs; wanda's B needs its diagonal.
                    for role in group:
                        project[arch.module_name(layer, role)] = lora_ref[roles[role]][0]
                    continue
                if p.score != "lowrank":
                    continue
                d_in = model.get_parameter(roles[group[0]]).shape[1]
                d_outs = [model.get_parameter(roles[r]).shape[0] for r in group]
                # Keep the smaller statistic: one d_in² input Gram, or a d_out² output Gram per module.
                if d_in * d_in <= sum(d * d for d in d_outs):
                    gram.append(rep)
                else:
                    out_gram.extend(arch.module_name(layer, r) for r in group)
        stats = collect(model, arch, encoded, gram=gram, out_gram=out_gram, sqnorm=sqnorm, project=project,
                        positions="response", batch_size=p.batch_size, desc="NLSR: calibration pass (safe responses)")
        what = {"lowrank": "input Gram XᵀX or output Gram SᵀS per module (one forward pass)",
                "wanda": "input column norms ‖X_j‖ (one forward pass)"}[p.score]
        if s.mode == "lora":
            what = "A·XᵀX·Aᵀ per module (the B factor's input Gram)" + (
                " and input column norms" if p.score == "wanda" else "") + " (one forward pass)"
        return _Calib(stats, None, shared, what)

    def _dense_score(self, w_e, module, name, calib: _Calib, p: NLSRParams, device) -> torch.Tensor:
        if p.score == "snip":
            return (w_e * calib.grads[name].cpu().float()).abs()  # type: ignore[index]
        stats = calib.stats
        if p.score == "wanda":
            return wanda_score(w_e, stats.sqnorm[calib.rep[module]].cpu())
        r = math.floor(p.rank_ratio * min(w_e.shape) + 1e-9)
        if module in stats.out_gram:
            return lowrank_projection(w_e.to(device), r, out_gram=stats.out_gram[module]).abs().cpu()
        rep = calib.rep[module]
        if w_e.shape[0] <= w_e.shape[1]:
            return lowrank_projection(w_e.to(device), r, gram=stats.gram[rep]).abs().cpu()
        if rep not in calib.halves:  # one eigendecomposition per shared input (gate and up share one)
            calib.halves.clear()
            calib.halves[rep] = gram_half(stats.gram[rep])
        return lowrank_projection(w_e.to(device), r, half=calib.halves[rep]).abs().cpu()

    def _factor_scores(self, a_e, b_e, scale, module, name, calib: _Calib, p: NLSRParams, device):
        if p.score == "snip":
            g_a, g_b = factor_gradients(calib.grads[name].cpu(), a_e, b_e, scale)  # type: ignore[index]
            return (a_e * g_a).abs(), (b_e * g_b).abs()
        stats = calib.stats
        k_a = stats.proj_gram[module]  # A·XᵀX·Aᵀ: the output Gram of A, the input Gram of B
        if p.score == "wanda":
            return (wanda_score(a_e, stats.sqnorm[calib.rep[module]].cpu()),
                    wanda_score(b_e, torch.diagonal(k_a).cpu()))
        r_a = math.floor(p.rank_ratio * min(a_e.shape) + 1e-9)
        r_b = math.floor(p.rank_ratio * min(b_e.shape) + 1e-9)
        return (lowrank_projection(a_e.to(device), r_a, out_gram=k_a).abs().cpu(),
                lowrank_projection(b_e.to(device), r_b, gram=k_a).abs().cpu())

    # ------------------------------------------------------------------------ apply
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
                "sparsity": prep.get("sparsity"),
            },
            "notes": notes,
        }

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

        # The next module's tensors are read while this one is scored.
        for mod, arrays in progress(prefetched(modules, read), desc="NLSR: similarity per module",
                                    total=len(modules), unit="module"):
            shape = tuple(mod["shape"])
            c, changed = masked_similarity(*arrays)
            del arrays
            rows.append({"module": mod["module"], "layer": mod["layer"], "role": mod["role"], "c": c,
                         "entries_changed": changed, "entries": math.prod(shape), "region": mod["kept"]})
        sel = self._selection([r["c"] for r in rows], p)
        transforms: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, int]]] = {}
        for mod, restored in zip(modules, sel.restored, strict=True):
            if restored:
                transforms[mod["name"]] = self._transplant_fn(tensors, mod["name"])
        changed = sum(r["entries_changed"] for r, on in zip(rows, sel.restored, strict=True) if on)
        entries = sum(r["entries"] for r in rows)
        notes: list[str] = []
        adapter = None
        if ft.is_adapter:
            adapter = self._dense_adapter(ft, modules, sel.restored, transforms)
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

    def _dense_adapter(self, ft: Model, modules, restored, transforms) -> dict[str, Any]:
        """A LoRA adapter on W_a reproducing the dense result: restored modules at full rank."""
        adapter = ft.adapter
        assert adapter is not None and ft.base is not None
        config = dict(adapter.config)
        ranks = dict(config.get("rank_pattern") or {})
        alphas = dict(config.get("alpha_pattern") or {})
        full: dict[str, tuple[str, int, int]] = {}
        for mod, on in zip(modules, restored, strict=True):
            if not on:
                continue
            module, (d_out, d_in) = mod["module"], mod["shape"]
            k = min(d_out, d_in)
            ranks[module] = k
            alphas[module] = math.sqrt(k) if config.get("use_rslora") else k  # scale 1: B·A is the update itself
            full[module] = (mod["name"], d_out, d_in)
        config["rank_pattern"], config["alpha_pattern"] = ranks, alphas
        new_scale = LoraAdapter(adapter.directory, config, adapter.store)

        def factors(module: str) -> tuple[torch.Tensor, torch.Tensor]:
            name, d_out, d_in = full[module]
            base = ft.base.get(name)  # type: ignore[union-attr]
            old = ft.get(name)
            restored, _ = transforms[name](old)
            delta = (restored.to(old.dtype).float() - base.float()) / new_scale.scale(module)
            if d_in <= d_out:
                return torch.eye(d_in), delta  # A = I, B = ΔW
            return delta, torch.eye(d_out)  # A = ΔW, B = I

        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def produce(tensor: str, module: str | None, which: int) -> Callable[[], torch.Tensor]:
            def fn() -> torch.Tensor:
                if module is None:
                    return adapter.store.get(tensor)
                if module not in cache:
                    cache[module] = factors(module)
                return cache[module][which].contiguous()
            return fn

        owner = {}
        for module, (a_name, b_name) in adapter.modules.items():
            if module in full:
                owner[a_name], owner[b_name] = (module, 0), (module, 1)
        producers = {t: produce(t, *owner.get(t, (None, 0))) for t in adapter.store.names}
        return {"config": config, "tensors": _Lazy(producers)}

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
            # Mask A and B separately, multiply, then compare (the product is the update ΔW, up to s).
            c = factor_cosine(_masked(a_f, m_a), _masked(b_f, m_b), _scattered(m_a, e_a), _scattered(m_b, e_b),
                              mod.get("ref_norm2"))
            rows.append({"module": module, "layer": mod["layer"], "role": mod["role"], "c": c,
                         "entries_changed": changed, "entries": a_f.numel() + b_f.numel(),
                         "region": mod["lora_A_kept"] + mod["lora_B_kept"]})
        sel = self._selection([r["c"] for r in rows], p)
        out: dict[str, torch.Tensor] = {}
        restored = {mod["module"] for mod, on in zip(modules, sel.restored, strict=True) if on}
        for module in restored:  # factors and masks read again: nothing per module was kept
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
