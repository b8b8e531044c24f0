"""FGSN — Fine-Grained Safety Neurons with training-free continual projection (Han et al. 2025,
arXiv 2508.09190; v4 "Multi-Level Safety Continual Projection", MSCP).

No official code exists; the method was reconstructed from the paper and the methods it builds on
(Wanda, SafeLoRA). Every choice the paper leaves open is a parameter, with the default named first.

prepare (once per aligned model; ONE calibration pass per data set: the benign/task rows, then
each harm category's rows):
  1. safety layers. On the aligned model, each layer's hidden state at the last prompt token:
     s_bb = mean cosine over benign–benign pairs, s_bh = mean cosine over benign–harmful pairs,
     gap_l = s_bb − s_bh. The safety layers are the first contiguous run of layers with
     gap ≥ ``gap_threshold`` × max gap (or ``layers=`` given explicitly; ``gap_baseline=min``
     measures the rise above the curve's minimum instead, for curves with no positive gap).
  2. safety neurons, per linear weight of the safety layers: Wanda scores S_ij = |W_ij|·‖X_j‖₂
     with X the module's inputs on harmful prompts (S_harm) and on benign/task data (S_task).
     H = top-q of S_harm, T = top-p of S_task, M = H \\ T (entries, or whole output rows).
  4. continual clusters: one M_k per harm category k, in order, each excluding the task neurons
     AND every earlier cluster, so a later category never touches an earlier one's neurons.
     ``--extend PATCH`` adds categories to a patch without recomputing (or changing) its clusters.
apply (per fine-tune, module by module, streaming):
  3. V = W_a − W_b (alignment update), ΔW = W_f − W_a (dense, also for LoRA fine-tunes), and
         ΔW' = M ⊙ (C ΔW) + (1 − M) ⊙ ΔW,     W_out = W_a + ΔW'
     with C = V Vᵀ / ‖V‖_F (``norm=fro``), V Vᵀ / numel(V) (``numel``: the paper's "Dim(V)"), or
     U_k U_kᵀ, the orthogonal projector onto the top-k left singular vectors of V (``exact``).
     C is never formed: C ΔW = V (Vᵀ ΔW) / ‖V‖_F, evaluated in column blocks so that no
     intermediate is larger than V itself. ``target=weight`` projects the whole weight instead:
     W_out = M ⊙ (C W_f) + (1 − M) ⊙ W_f.

The patch. Per safety-layer weight and cluster k, the sorted flat positions of M_k (int32 entry
indices, or row indices with ``granularity=row``): 4 bytes per edited entry, about 0.2 byte per
weight at 5 %. For ``--extend``, the task statistic Σ x_j² per module input (d_in floats, with
W_a it gives S_task and hence T exactly) and the earlier clusters are kept; nothing else is needed.
meta holds the gap curve, the layers, the clusters (name, prompts, size) and their history.

Memory. prepare holds the aligned model for its passes (running sums of d_in floats per module
input), then reads W_a one matrix at a time to score it. apply holds one module's W_a, W_b (as
V), W_f, ΔW and C ΔW in float32, plus one intermediate no larger than V.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from realign.archs import Arch
from realign.calibration import Calibration, Example
from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param, params_dict
from realign.progress import progress
from realign.sources import Model, weights_sha256
from realign.stats import collect, encode

PATCH_FORMAT = "fgsn/1"
PNG_NAME = "gap_curve.png"
UNCATEGORISED = "harmful"  # the cluster of harmful rows without a category
ALL = "all"  # the single cluster of per_category=false
# Roles that read the same input (the layer's normed hidden state): one Σ x_j² serves them all.
SHARED_INPUT = (("q", "k", "v"), ("gate", "up"))
# Parameters that define the clusters: an extended patch keeps its own values.
CLUSTER_PARAMS = ("layers", "gap_threshold", "gap_baseline", "max_layers", "q", "p", "granularity", "exclude_task",
                  "per_category", "task_responses")
PAPER_SHARE = "about 5 % (5.38 % Llama-3.1-8B, 4.67 % Qwen); a later category about 0.75 % more"


@dataclass
class FGSNParams:
    # --tune: the share of each safety-layer matrix projected (the paper's q = 0.05 first)
    TUNE: ClassVar[dict[str, tuple]] = {"q": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)}
    layers: str | list[int] | None = param(
        "auto", "safety layers: auto (first run of layers with gap ≥ gap_threshold × max gap), or explicit, "
        "e.g. 3-5 or 3,4,5 (0-based)")
    gap_threshold: float = param(0.5, "auto layers: share of the maximum cosine gap a safety layer reaches")
    gap_baseline: str = param(
        "zero", "auto layers: the share is of the gap above 0 (zero: gap ≥ t × max, the paper's rule) or above the "
        "curve's minimum (min: gap ≥ min + t × (max − min)); zero falls back to min when no gap is positive",
        choices=("zero", "min"))
    max_layers: int | None = param(None, "auto layers: keep at most the first N layers of the run (none = all)")
    q: float = param(0.05, "share of each matrix in the harmful set H = top-q of S_harm (another q at apply time "
                     "recomputes the clusters from the patch's input statistics)", stage="apply")
    p: float = param(0.05, "share of each matrix in the task set T = top-p of S_task")
    granularity: str = param("entry", "unit of H, T and M: single weights, or whole output rows (neurons)",
                             choices=("entry", "row"))
    exclude_task: bool = param(True, "remove the task neurons T from every cluster (M = H \\ T)")
    categories: list[str] | None = param(
        None, "harm categories, in order, one cluster each (default: every category of the calibration file, in "
        f"order of first appearance; rows without a category form the cluster {UNCATEGORISED!r})")
    per_category: bool = param(True, f"false: one cluster {ALL!r} from all harmful rows (no continual clusters)")
    task_responses: bool = param(True, "task statistics also read the benign rows' responses (task data = "
                                 "instruction + answer); false: their prompts only")
    samples: int | None = param(None, "rows used per data set: the first N benign rows and the first N harmful "
                                "rows of each category (none = all)")
    max_length: int = param(512, "calibration sequences are cut to this many tokens")
    batch_size: int = param(8, "calibration batch size")
    extend: str | None = param(None, "an fgsn patch to extend with new categories (its clusters are kept as they "
                               "are; the CLI's --extend)")
    norm: str = param("fro", "C: fro = V Vᵀ/‖V‖_F (SafeLoRA), numel = V Vᵀ/numel(V) (the paper's Dim(V)), "
                      "exact = U_k U_kᵀ, the projector onto the top-k left singular vectors of V",
                      stage="apply", choices=("fro", "numel", "exact"))
    rank: int = param(8, "norm=exact: k, the number of left singular vectors of V spanning the safety subspace",
                      stage="apply")
    target: str = param("delta", "delta: project the fine-tuning update ΔW under M; weight: project the whole "
                        "fine-tuned weight W_f under M", stage="apply", choices=("delta", "weight"))
    apply_categories: list[str] | None = param(
        None, "clusters projected at apply time (default: all clusters of the patch)", stage="apply")


def check_params(p: FGSNParams) -> None:
    checks = [
        (0 < p.gap_threshold <= 1, "gap_threshold must be in (0, 1]"),
        (p.max_layers is None or p.max_layers >= 1, "max_layers must be ≥ 1"),
        (0 <= p.q <= 1, "q must be in [0, 1]"),
        (0 <= p.p <= 1, "p must be in [0, 1]"),
        (p.samples is None or p.samples >= 1, "samples must be ≥ 1"),
        (p.max_length >= 2, "max_length must be ≥ 2"),
        (p.batch_size >= 1, "batch_size must be ≥ 1"),
        (p.rank >= 1, "rank must be ≥ 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise RealignError(f"fgsn: {msg}")


# ============================================================================ step 1: safety layers
def gap_curve(benign: torch.Tensor, harmful: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: s_bb (mean cosine over benign–benign pairs i ≠ j), s_bh (mean cosine over
    benign–harmful pairs) and gap = s_bb − s_bh, from hidden states (examples, layers, hidden).

    With unit vectors b̂_i and their sum Σb̂: Σ_{i≠j} b̂_i·b̂_j = ‖Σb̂‖² − n, and
    Σ_{i,j} b̂_i·ĥ_j = Σb̂ · Σĥ, so no pairwise matrix is formed."""
    if benign.shape[0] < 2 or harmful.shape[0] < 1:
        raise ValueError("gap_curve needs at least 2 benign and 1 harmful examples")
    b = torch.nn.functional.normalize(benign.double(), dim=-1)
    h = torch.nn.functional.normalize(harmful.double(), dim=-1)
    nb, nh = b.shape[0], h.shape[0]
    sb, sh = b.sum(0), h.sum(0)  # (layers, hidden)
    s_bb = ((sb * sb).sum(-1) - (b * b).sum(-1).sum(0)) / (nb * (nb - 1))
    s_bh = (sb * sh).sum(-1) / (nb * nh)
    return {"benign_benign": s_bb.tolist(), "benign_harmful": s_bh.tolist(), "gap": (s_bb - s_bh).tolist()}


def choose_layers(gap: Sequence[float], threshold: float = 0.5, max_layers: int | None = None,
                  baseline: str = "zero") -> list[int]:
    """The first contiguous run of layers whose gap reaches floor + threshold × (max − floor), with
    floor = 0 (``zero``: gap ≥ threshold × max gap) or the smallest gap (``min``)."""
    peak = max(gap)
    floor = 0.0 if baseline == "zero" else min(gap)
    if baseline == "zero" and not peak > 0:
        raise RealignError("fgsn: no layer of the aligned model separates harmful from benign prompts (max cosine "
                           "gap ≤ 0); use gap_baseline=min, or pass layers=... explicitly")
    level = floor + threshold * (peak - floor)
    start = next(i for i, g in enumerate(gap) if g >= level)
    end = start
    while end + 1 < len(gap) and gap[end + 1] >= level:
        end += 1
    run = list(range(start, end + 1))
    return run[:max_layers] if max_layers else run


def parse_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """``"3-5,7"`` or ``[3, 4, 5, 7]`` -> sorted, unique, checked layer indices."""
    out: set[int] = set()
    parts = spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec)
    for part in parts:
        try:
            if isinstance(part, str) and "-" in part.lstrip("-"):
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            elif part != "":
                out.add(int(part))
        except ValueError:
            raise RealignError(f"fgsn: layers={spec!r}: expected auto, or layer numbers like 3-5 or 3,4,5") from None
    bad = [layer for layer in out if not 0 <= layer < num_layers]
    if bad or not out:
        raise RealignError(f"fgsn: layers={spec!r}: the model has layers 0-{num_layers - 1}")
    return sorted(out)


def explicit_layers(p: FGSNParams) -> bool:
    return p.layers is not None and not (isinstance(p.layers, str) and p.layers.strip().lower() in ("auto", ""))


# ============================================================================ step 2: safety neurons
def wanda_score(w: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂, with ``sqnorm`` = Σ x_j² over the calibration tokens."""
    return w.abs().float() * sqnorm.float().clamp_min(0).sqrt().unsqueeze(0)


def keep_count(n: int, share: float) -> int:
    return min(n, max(0, math.floor(share * n + 0.5)))


def top_share(score: torch.Tensor, share: float, granularity: str = "entry") -> torch.Tensor:
    """The top ``share`` of a matrix's units by score: a bool mask of its entries (``entry``), or of
    its output rows by summed score (``row``, shape (d_out,)). Ties go to the earlier position."""
    flat = score.float().sum(1) if granularity == "row" else score.reshape(-1).float()
    if bool(flat.isnan().any()):  # a NaN score never ranks first
        flat = torch.nan_to_num(flat, nan=float("-inf"))
    keep, n = keep_count(flat.numel(), share), flat.numel()
    if keep >= n:
        return torch.ones(n, dtype=torch.bool).reshape(-1 if granularity == "row" else score.shape)
    mask = torch.zeros(n, dtype=torch.bool)
    if keep > 0:
        thresh = torch.kthvalue(flat, n - keep).values
        mask = flat > thresh
        ties = (flat == thresh).nonzero().flatten()[: keep - int(mask.sum())]
        mask[ties] = True
    return mask if granularity == "row" else mask.reshape(score.shape)


def expand(units: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A unit mask (entries, or rows) as a mask of the whole matrix."""
    return units.unsqueeze(1).expand(shape) if units.dim() == 1 else units


def to_indices(units: torch.Tensor) -> torch.Tensor:
    """Sorted flat positions of a unit mask (int32 while they fit): the patch's compact form."""
    idx = units.reshape(-1).nonzero().flatten()
    return idx.to(torch.int32) if units.numel() < 2**31 else idx


def from_indices(indices: torch.Tensor, units_shape: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(math.prod(units_shape), dtype=torch.bool)
    mask[indices.long()] = True
    return mask.reshape(units_shape)


def units_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    return (shape[0],) if granularity == "row" else tuple(shape)


# ============================================================================ step 3: the projection
def top_left_singular_vectors(v: torch.Tensor, k: int) -> torch.Tensor:
    """U_k (d_out × k'), k' = min(k, rank V): the orthonormal basis of the top-k left singular
    directions of V (directions with a numerically zero singular value are not kept)."""
    u, s, _ = torch.linalg.svd(v.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return v.new_zeros(v.shape[0], 0)
    tol = float(s[0]) * max(v.shape) * torch.finfo(torch.float32).eps
    k = min(k, int((s > tol).sum()))
    return u[:, :k].float()


class SafetyProjector:
    """x ↦ C x for one module's alignment update V, never forming the d_out × d_out matrix C:

    - ``fro``:   C x = V (Vᵀ x) / ‖V‖_F
    - ``numel``: C x = V (Vᵀ x) / numel(V)
    - ``exact``: C x = U_k (U_kᵀ x), U_k the top-k left singular vectors of V (an orthogonal projector)

    The product runs over column blocks of x whose intermediate Fᵀ x_block is never larger than
    the factor F (V or U_k). A zero V spans nothing: C = 0."""

    def __init__(self, v: torch.Tensor, norm: str = "fro", rank: int = 8):
        v = v.float()
        if norm == "exact":
            self.factor, self.scale = top_left_singular_vectors(v, rank), 1.0
        elif norm in ("fro", "numel"):
            denom = float(v.norm()) if norm == "fro" else float(v.numel())
            self.factor, self.scale = v, (1.0 / denom if float(v.norm()) > 0 else 0.0)
        else:
            raise ValueError(f"unknown norm {norm!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if self.scale == 0.0 or f.shape[1] == 0:
            return torch.zeros(x.shape, dtype=torch.float32)
        x = x.float()
        step = max(1, f.shape[0])  # Fᵀ x_block is f.shape[1] × step: at most the size of F
        if step >= x.shape[1]:
            return (f @ (f.T @ x)).mul_(self.scale)
        out = torch.empty(x.shape, dtype=torch.float32)
        for j in range(0, x.shape[1], step):
            out[:, j:j + step] = f @ (f.T @ x[:, j:j + step])
        return out.mul_(self.scale)


def project_update(w_a: torch.Tensor, w_b: torch.Tensor, w_f: torch.Tensor, units: torch.Tensor,
                   norm: str = "fro", rank: int = 8, target: str = "delta") -> torch.Tensor:
    """One module's output weight (float32): W_a + M ⊙ (C ΔW) + (1 − M) ⊙ ΔW (``delta``), or
    M ⊙ (C W_f) + (1 − M) ⊙ W_f (``weight``). Entries outside M are W_f exactly."""
    w_a, w_f = w_a.float(), w_f.float()
    c = SafetyProjector(w_a - w_b.float(), norm, rank)
    if target == "delta":
        projected = c(w_f - w_a).add_(w_a)
    else:
        projected = c(w_f)
    return torch.where(expand(units, tuple(w_f.shape)), projected, w_f)


# ============================================================================ calibration statistics
def input_groups(arch: Arch) -> dict[str, str]:
    """role -> the role whose input statistics it shares (same input tensor)."""
    rep = {role: role for role in arch.roles}
    for group in SHARED_INPUT:
        present = [r for r in group if r in rep]
        for r in present:
            rep[r] = present[0]
    return rep


@dataclass
class Statistics:
    """The calibration passes' results: hidden states for the gap curve, Σ x_j² per module input."""

    benign_hidden: torch.Tensor | None
    harmful_hidden: torch.Tensor | None
    task_sqnorm: dict[str, torch.Tensor]  # module input name -> Σ x_j² on benign/task data
    harm_sqnorm: dict[str, dict[str, torch.Tensor]]  # cluster -> module input name -> Σ x_j² on its prompts
    tokens: dict[str, int]
    seconds: float


def calibration_statistics(model, tokenizer, arch: Arch, benign: Sequence[Example],
                           clusters: Sequence[tuple[str, Sequence[Example]]], layers: Sequence[int],
                           template: str = "auto", task_responses: bool = True, hidden: bool = True,
                           max_length: int = 512, batch_size: int = 8) -> Statistics:
    """ONE pass over the benign/task rows and ONE over each cluster's harmful rows (together: one
    pass per data set), each collecting the last-prompt-token hidden states and Σ x_j² of the
    inputs of the given layers' linear modules (prompt tokens; task: also responses)."""
    start = time.perf_counter()
    rep = input_groups(arch)
    names = sorted({arch.module_name(layer, rep[role]) for layer in layers for role in arch.roles})
    tokens: dict[str, int] = {}
    task_sqnorm: dict[str, torch.Tensor] = {}
    benign_hidden = None
    if benign:
        items = [(e.prompt, e.response if task_responses else None) for e in benign]
        stats = collect(model, arch, encode(tokenizer, items, template, max_length), sqnorm=names, hidden=hidden,
                        positions="all", batch_size=batch_size, desc="fgsn: benign/task pass")
        task_sqnorm, benign_hidden, tokens["benign"] = stats.sqnorm, stats.hidden, stats.tokens
    harm_sqnorm: dict[str, dict[str, torch.Tensor]] = {}
    hiddens = []
    for name, rows in clusters:
        stats = collect(model, arch, encode(tokenizer, [(e.prompt, None) for e in rows], template, max_length),
                        sqnorm=names, hidden=hidden, positions="prompt", batch_size=batch_size,
                        desc=f"fgsn: harmful pass ({name})")
        harm_sqnorm[name], tokens[name] = stats.sqnorm, stats.tokens
        if stats.hidden is not None:
            hiddens.append(stats.hidden)
    return Statistics(benign_hidden, torch.cat(hiddens) if hiddens else None, task_sqnorm, harm_sqnorm, tokens,
                      time.perf_counter() - start)


# ============================================================================ clusters
def plan_clusters(cal: Calibration, p: FGSNParams, existing: Sequence[str] = ()) -> tuple[
        list[tuple[str, list[Example]]], list[str]]:
    """The clusters to build from this calibration file, in order, with their harmful rows (the
    first ``samples`` of each), skipping those already in an extended patch; and notes."""
    harmful = cal.harmful()
    cal.require("kind=harmful", harmful, "fgsn")
    notes: list[str] = []
    if not p.per_category:
        if existing:
            raise RealignError("fgsn: this patch was prepared with per_category=false (one cluster): it cannot be "
                               "extended by category; prepare a new patch")
        groups = {ALL: harmful}
    else:
        groups = {}
        for e in harmful:
            groups.setdefault(e.category or UNCATEGORISED, []).append(e)
        if p.categories:
            missing = [c for c in p.categories if c not in groups]
            if missing:
                raise RealignError(f"fgsn: category {missing[0]!r} has no harmful row in {cal.source}; it has: "
                                   f"{', '.join(groups)}")
            groups = {c: groups[c] for c in dict.fromkeys(p.categories)}
    kept = [c for c in groups if c in existing]
    if kept:
        notes.append(f"categories already in the extended patch kept as they were: {', '.join(kept)}")
    plan = [(c, rows[: p.samples] if p.samples else rows) for c, rows in groups.items() if c not in existing]
    if existing and not plan:
        raise RealignError(f"fgsn: {cal.source} has no harmful category that the patch lacks (it has: "
                           f"{', '.join(existing)}); give rows with a new 'category'")
    return plan, notes


def cluster_key(index: int, module: str) -> str:
    return f"cluster{index}.{module}"


def task_key(module_input: str) -> str:
    return f"task_sqnorm.{module_input}"


def harm_key(index: int, module_input: str) -> str:
    return f"harm_sqnorm{index}.{module_input}"


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / max(whole, 1), 4)


# ============================================================================ the gap-curve figure
def _draw_gap_curve(curve: Mapping[str, Any], layers: Sequence[int], level: float | None, title: str):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Two panels: the cosines are near 1 while the gap is small, so one axis would flatten the gap.
    fig = Figure(figsize=(6.4, 5.0), dpi=110)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})
    xs = list(range(len(curve["gap"])))
    top.plot(xs, curve["benign_benign"], "o-", label="benign–benign", color="tab:blue")
    top.plot(xs, curve["benign_harmful"], "s-", label="benign–harmful", color="tab:orange")
    top.set_ylabel("mean cosine")
    top.legend(fontsize=8, loc="best")
    bottom.plot(xs, curve["gap"], "^-", color="tab:red", linewidth=2, label="gap = s_bb − s_bh")
    if level is not None:
        bottom.axhline(level, color="tab:red", linestyle=":", linewidth=1, label="threshold (auto layers)")
    for ax in (top, bottom):
        if layers:
            ax.axvspan(min(layers) - 0.4, max(layers) + 0.4, color="tab:green", alpha=0.15,
                       label="safety layers" if ax is bottom else None)
        ax.grid(alpha=0.3)
    bottom.set_ylabel("cosine gap")
    bottom.set_xlabel("layer (output hidden state at the last prompt token)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(fontsize=8, loc="best")
    top.set_title(title)
    fig.tight_layout()
    return fig


def gap_curve_png(curve: Mapping[str, Any], layers: Sequence[int], level: float | None = None,
                  title: str = "FGSN safety layers") -> bytes:
    """The gap curve as PNG bytes (matplotlib's Agg canvas; no global pyplot state); ``level``: the
    threshold line of automatic layers."""
    buf = io.BytesIO()
    _draw_gap_curve(curve, layers, level, title).savefig(buf, format="png")
    return buf.getvalue()


def plot_gap_curve(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw the gap curve of an fgsn report (prepare's report, or a repair/apply report that
    carries it) into a PNG file at ``path`` (written to a temporary file, then renamed)."""
    rep = report.get("prepare", report) if "gap_curve" not in report else report
    curve = rep.get("gap_curve")
    if not curve or not curve.get("gap"):
        raise RealignError("this report has no fgsn gap curve (make one with `realign prepare fgsn` or repair)")
    png = gap_curve_png(curve, rep.get("safety_layers", []), rep.get("gap_level"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(png)
    tmp.replace(path)
    return path.resolve()


# ============================================================================ the method
def _check_recomputable(patch: Patch, meta: Mapping[str, Any], q: float) -> None:
    if not 0 <= q <= 1:
        raise RealignError(f"--set q={q}: q must be in [0, 1]")
    missing = [c["name"] for c in meta["clusters"]
               if not any(k.startswith(f"harm_sqnorm{c['index']}.") for k in patch.tensors.keys())]
    if "q" not in meta or missing:
        raise RealignError(f"fgsn: this patch cannot rebuild its clusters at another q (no input statistics for "
                           f"{missing[0] if missing else 'its clusters'}): prepare it again with this version, or "
                           "prepare with --set q=...")
    if meta.get("exclude_task") and not any(k.startswith("task_sqnorm.") for k in patch.tensors.keys()):
        raise RealignError("fgsn: this patch has no task statistics to rebuild its clusters: prepare it again")


def rebuilt_clusters(patch: Patch, meta: Mapping[str, Any], w_a: torch.Tensor, source: str, q: float,
                     indices: Sequence[int]) -> torch.Tensor:
    """The union of clusters ``indices`` of one matrix at share ``q``, rebuilt as prepare builds
    them: T = top-p of the task scores, then each cluster in order, top-q of its harmful scores
    minus T and the earlier clusters."""
    granularity = meta["granularity"]
    taken = torch.zeros(units_shape(tuple(w_a.shape), granularity), dtype=torch.bool)
    if meta.get("exclude_task"):
        taken |= top_share(wanda_score(w_a, patch.tensors[task_key(source)]), meta["p"], granularity)
    units = torch.zeros_like(taken)
    for c in meta["clusters"]:
        harm = top_share(wanda_score(w_a, patch.tensors[harm_key(c["index"], source)]), q, granularity)
        cluster = harm & ~taken
        taken |= cluster
        if c["index"] in indices:
            units |= cluster
    return units


def _linear_total(arch: Arch, aligned: Model) -> int:
    return sum(math.prod(aligned.shape(n)) for _, _, n in arch.linear_weights())


def _load_extended(inputs: Inputs, p: FGSNParams) -> tuple[Patch, FGSNParams]:
    """The patch to extend, checked against the models of this run; ``p`` with its cluster parameters."""
    from realign.api import load_patch  # the pipeline imports the methods: import it late

    old = load_patch(p.extend)  # type: ignore[arg-type]
    if old.method != FGSN.name or old.meta.get("format") != PATCH_FORMAT:
        raise RealignError(f"--extend {p.extend}: not an fgsn patch (it is {old.method!r})")
    for role, model in (("aligned", inputs.aligned), ("base", inputs.base)):
        rec = old.inputs.get(role) or {}
        if model is None or not rec.get("sha256"):
            continue
        same_path = Path(rec.get("path", "")).resolve() == Path(model.path).resolve()
        if not same_path and weights_sha256(model) != rec["sha256"]:
            raise RealignError(f"--extend {p.extend}: the patch was prepared on {role} model {rec.get('ref')}, "
                               f"not {model.ref}; extend it with the same {role} model")
    defaults = FGSNParams()
    changes: dict[str, Any] = {}
    for key in CLUSTER_PARAMS:
        old_value = old.meta["layers"] if key == "layers" else old.params.get(key, getattr(defaults, key))
        new_value = getattr(p, key)
        if key == "layers" and explicit_layers(p):
            new_value = parse_layers(new_value, inputs.aligned.arch.num_layers)  # type: ignore[arg-type]
        if new_value != old_value and new_value != getattr(defaults, key):
            raise RealignError(f"fgsn --extend: {key} is fixed by the extended patch ({old_value}); drop --set {key}")
        changes[key] = old_value
    return old, dataclasses.replace(p, **changes)


@register
class FGSN(Method):
    name = "fgsn"
    title = "FGSN: fine-grained safety neurons, continual projection onto the alignment subspace"
    paper = "Han et al. 2025, Fine-Grained Safety Neurons with Training-Free Continual Projection (arXiv 2508.09190)"
    Params = FGSNParams
    needs = ("base",)
    uses = ("calibration",)  # at prepare time only: apply needs the patch, W_a, W_b and the fine-tune

    # ------------------------------------------------------------------ prepare
    def prepare(self, inputs: Inputs, params: FGSNParams) -> Patch:
        check_params(params)
        p = params
        old: Patch | None = None
        if p.extend:
            old, p = _load_extended(inputs, p)
        cal = inputs.require("calibration", self.name)
        aligned, arch = inputs.aligned, inputs.aligned.arch
        old_clusters = list(old.meta["clusters"]) if old else []
        plan, notes = plan_clusters(cal, p, [c["name"] for c in old_clusters])

        # Which layers to collect statistics for: all of them when the gap curve chooses.
        auto = old is None and not explicit_layers(p)
        layers = old.meta["layers"] if old else (
            list(range(arch.num_layers)) if auto else parse_layers(p.layers, arch.num_layers))  # type: ignore[arg-type]
        benign = [] if old else cal.benign()[: p.samples] if p.samples else cal.benign()
        if old is None and (auto or p.exclude_task):
            cal.require("kind=benign (the gap curve and the task neurons need them)", benign, self.name, minimum=2)

        model, tokenizer = inputs.run_model(aligned)
        stats = calibration_statistics(model, tokenizer, arch, benign, plan, layers, inputs.template,
                                       p.task_responses, hidden=old is None, max_length=p.max_length,
                                       batch_size=p.batch_size)
        inputs.release()

        # Step 1: the gap curve and the safety layers.
        gap_level = old.meta.get("gap_level") if old is not None else None
        if old is not None:
            curve, layer_choice = old.meta.get("gap_curve"), old.meta.get("layer_choice", "")
        elif stats.benign_hidden is not None and stats.benign_hidden.shape[0] >= 2:
            curve = gap_curve(stats.benign_hidden, stats.harmful_hidden)  # type: ignore[arg-type]
            layer_choice = "explicit"
        else:
            curve, layer_choice = None, "explicit"
            notes.append("fewer than 2 benign rows: no gap curve")
        if auto:
            assert curve is not None
            gap, baseline = curve["gap"], p.gap_baseline
            if baseline == "zero" and max(gap) <= 0:
                baseline = "min"
                notes.append("no layer has a positive cosine gap (the benign prompts are no more alike than benign "
                             "and harmful ones): safety layers chosen by the rise above the curve's minimum "
                             "(gap_baseline=min)")
            layers = choose_layers(gap, p.gap_threshold, p.max_layers, baseline)
            rule = (f"gap ≥ {p.gap_threshold:g} × max gap ({max(gap):.4f})" if baseline == "zero" else
                    f"gap ≥ min + {p.gap_threshold:g} × (max − min) ({min(gap):.4f}, {max(gap):.4f})")
            layer_choice = f"auto: first run of layers with {rule}" + (
                f", at most {p.max_layers}" if p.max_layers else "")
            floor = 0.0 if baseline == "zero" else min(gap)
            gap_level = floor + p.gap_threshold * (max(gap) - floor)

        # Steps 2 and 4: per matrix, T, then each new cluster M_k = top-q(S_harm,k) \ T \ earlier clusters.
        rep = input_groups(arch)
        start_index = len(old_clusters)
        new_clusters = [{"name": c, "index": start_index + i, "prompts": len(rows), "entries": 0}
                        for i, (c, rows) in enumerate(plan)]
        tensors: dict[str, torch.Tensor] = {}
        if old is not None:
            tensors.update({k: old.tensors[k] for k in old.tensors.keys()})
        modules = []
        task_entries = 0
        t_masks = time.perf_counter()
        weights = arch.linear_weights(layers)
        for layer, role, name in progress(weights, desc="fgsn: safety neurons", total=len(weights), unit="module"):
            module, source = arch.module_name(layer, role), arch.module_name(layer, rep[role])
            shape = tuple(aligned.shape(name))
            modules.append({"layer": layer, "role": role, "name": name, "module": module, "shape": list(shape)})
            w = aligned.get(name).float()
            ushape = units_shape(shape, p.granularity)
            taken = torch.zeros(ushape, dtype=torch.bool)
            if p.exclude_task:
                sq = old.tensors[task_key(source)] if old is not None else stats.task_sqnorm[source]
                if old is None:
                    tensors[task_key(source)] = sq.float()
                task = top_share(wanda_score(w, sq), p.p, p.granularity)
                taken |= task
                task_entries += int(expand(task, shape).sum())
            for c in old_clusters:
                key = cluster_key(c["index"], module)
                if key in tensors:
                    taken |= from_indices(tensors[key], ushape)
            for c in new_clusters:
                # the input statistic (d_in floats) lets apply rebuild the cluster at another q
                tensors[harm_key(c["index"], source)] = stats.harm_sqnorm[c["name"]][source].float()
                harm = top_share(wanda_score(w, stats.harm_sqnorm[c["name"]][source]), p.q, p.granularity)
                cluster = harm & ~taken
                taken |= cluster
                if bool(cluster.any()):
                    tensors[cluster_key(c["index"], module)] = to_indices(cluster)
                    c["entries"] += int(expand(cluster, shape).sum())
        seconds_masks = time.perf_counter() - t_masks

        total = _linear_total(arch, aligned)
        in_layers = sum(math.prod(m["shape"]) for m in modules)
        clusters = old_clusters + new_clusters
        for c in new_clusters:
            c["share_percent"] = _percent(c["entries"], total)
        edited = sum(c["entries"] for c in clusters)
        history = list(old.meta.get("history", [])) if old else []
        history.append({"calibration": cal.source, "sha256": cal.sha256, "categories": [c for c, _ in plan]})
        meta = {"format": PATCH_FORMAT, "q": old.meta.get("q", p.q) if old else p.q, "p": p.p,
                "exclude_task": p.exclude_task, "granularity": p.granularity, "layers": layers,
                "layer_choice": layer_choice,
                "gap_curve": curve, "gap_level": gap_level, "clusters": clusters, "modules": modules,
                "linear_weights_total": total, "history": history}
        report: dict[str, Any] = {
            "rule": "M_k = top-q(|W|·‖X_harm,k‖) \\ top-p(|W|·‖X_task‖) \\ earlier clusters in the safety layers; "
                    "apply: W_out = W_a + M ⊙ (C ΔW) + (1 − M) ⊙ ΔW",
            "gap_curve": {k: [round(x, 6) for x in v] for k, v in curve.items()} if curve else None,
            "gap_level": gap_level,
            "layer_choice": layer_choice,
            "safety_layers": layers,
            "clusters": [{k: c[k] for k in ("name", "prompts", "entries", "share_percent") if k in c}
                         for c in clusters],
            "added_categories": [{"name": c["name"], "extra_share_percent": c["share_percent"]} for c in new_clusters],
            "edited_entries": edited,
            "edited_share_percent": _percent(edited, total),
            "edited_share_of_safety_layers_percent": _percent(edited, in_layers),
            "task_entries_excluded": task_entries if p.exclude_task else None,
            "linear_weights_total": total,
            "paper_share": PAPER_SHARE,
            "calibration_tokens": stats.tokens,
            "seconds": {"calibration_passes": round(stats.seconds, 3), "neurons": round(seconds_masks, 3)},
            "notes": notes,
        }
        if old is not None:
            report["extended_from"] = str(Path(p.extend).resolve())  # type: ignore[arg-type]
        patch = Patch(self.name, params_dict(p), meta=meta, tensors=tensors, report=report)
        if curve is not None:
            try:
                patch.files[PNG_NAME] = gap_curve_png(curve, layers, gap_level)
            except ImportError:  # matplotlib is a dependency, but a stripped install should still prepare
                notes.append("matplotlib is not installed: no gap-curve figure")
        return patch

    # ------------------------------------------------------------------ apply
    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: FGSNParams) -> Edit:
        meta = patch.meta
        if meta.get("format") != PATCH_FORMAT:
            raise RealignError(f"this fgsn patch has format {meta.get('format')!r}; expected {PATCH_FORMAT}: "
                               "prepare it again with this version")
        aligned, base = inputs.aligned, inputs.require("base", self.name)
        names = [c["name"] for c in meta["clusters"]]
        chosen = params.apply_categories or names
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise RealignError(f"fgsn: apply_categories: the patch has no cluster {unknown[0]!r}; it has: "
                               f"{', '.join(names)}")
        indices = [c["index"] for c in meta["clusters"] if c["name"] in chosen]
        granularity = meta["granularity"]
        recompute = not math.isclose(params.q, meta.get("q", params.q))
        if recompute:
            _check_recomputable(patch, meta, params.q)
        rep = input_groups(aligned.arch)
        transforms = {}
        for m in meta["modules"]:
            keys = [cluster_key(i, m["module"]) for i in indices if cluster_key(i, m["module"]) in patch.tensors]
            if not keys and not recompute:
                continue
            name = m["name"]

            def fn(old: torch.Tensor, name: str = name, keys: list[str] = keys, shape: tuple = tuple(m["shape"]),
                   source: str = aligned.arch.module_name(m["layer"], rep[m["role"]])) -> torch.Tensor:
                ushape = units_shape(shape, granularity)
                w_a = aligned.get(name)
                if recompute:
                    units = rebuilt_clusters(patch, meta, w_a, source, params.q, indices)
                else:
                    units = torch.zeros(ushape, dtype=torch.bool)
                    for key in keys:
                        units |= from_indices(patch.tensors[key], ushape)
                return project_update(w_a, base.get(name), old, units, params.norm, params.rank, params.target)
            transforms[name] = fn
        total = meta["linear_weights_total"]
        chosen_clusters = [c for c in meta["clusters"] if c["name"] in chosen]
        edited = sum(c["entries"] for c in chosen_clusters)
        report: dict[str, Any] = {
            "rule": ("W_out = W_a + M ⊙ (C ΔW) + (1 − M) ⊙ ΔW" if params.target == "delta"
                     else "W_out = M ⊙ (C W_f) + (1 − M) ⊙ W_f") + {
                "fro": ", C ΔW = V (Vᵀ ΔW) / ‖V‖_F", "numel": ", C ΔW = V (Vᵀ ΔW) / numel(V)",
                "exact": f", C = U_k U_kᵀ (top-{params.rank} left singular vectors of V)"}[params.norm]
                + ", V = W_a − W_b",
            "norm": params.norm,
            "target": params.target,
            "safety_layers": meta["layers"],
            "categories_applied": [c["name"] for c in chosen_clusters],
            "clusters": [{"name": c["name"], "entries": c["entries"], "share_percent": c.get("share_percent")}
                         for c in chosen_clusters],
            "modules_edited": len(transforms),
            "edited_entries": edited,
            "edited_share_percent": _percent(edited, total),
            "paper_share": PAPER_SHARE,
            "gap_curve": meta.get("gap_curve"),
            "gap_level": meta.get("gap_level"),
            "layer_choice": meta.get("layer_choice"),
            "notes": [],
        }
        if params.norm == "exact":
            report["rank"] = params.rank
        report["q"] = params.q
        if recompute:
            report["clusters_rebuilt"] = (f"q = {params.q:g} (the patch's clusters are for q = {meta['q']:g}): rebuilt "
                                          "at apply from the patch's input statistics; their sizes are in totals")
            for c in report["clusters"]:
                c["entries"] = c["share_percent"] = None
            report["edited_entries"] = report["edited_share_percent"] = None
        return Edit(transforms=transforms, report=report)
