"""LoRA factors: a module's weight as W = W_b + s·B·A (A: r × d_in, B: d_out × r), and sparse
regions of the factors themselves, for methods that edit an adapter's factors rather than dense
weights (NLSR's LoRA-factor mode).

Products are never formed: ⟨B1A1, B2A2⟩ is computed from r × r matrices, and the gradients of A
and B follow from the weight's gradient by the chain rule. A region of a module is one mask per
factor (``MODULE.lora_A.mask``, ``MODULE.lora_B.mask``, values ``….ref``, as ``realign.masks``
stores them); a fine-tune that continued training the adapter is compared and transplanted
factor by factor, and the output is an adapter again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from realign.errors import RealignError
from realign.masks import RegionPatch, gather, masked, scattered, transplant, unpack_mask
from realign.sources import weights_sha256

PARTS = ("lora_A", "lora_B")


# ----------------------------------------------------------------------------- products and gradients
def merged(w_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W_b + s·B·A (float32, on the CPU)."""
    return w_b.float() + scale * (b.float().cpu() @ a.float().cpu())


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


def factor_gradients(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂A, ∂L/∂B) from G = ∂L/∂W when W = W_b + s·B·A (chain rule; no second pass needed)."""
    g = g.float()
    return scale * (b.float().T @ g), scale * (g @ a.float().T)


def factor_gradient_transforms(model, factors: Mapping[str, tuple[str, tuple[torch.Tensor, torch.Tensor, float]]]
                               ) -> dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """For ``realign.stats.example_gradient_sums``: per LoRA module {module: (weight name, (A, B, s))},
    G_n ↦ (s·BᵀG_n, s·G_n·Aᵀ), so that the sums are the factors' (A, B on the weight's device)."""
    out = {}
    for module, (name, (a, b, scale)) in factors.items():
        dev = model.get_parameter(name).device
        out[module] = lambda g, a=a.to(dev), b=b.to(dev), scale=scale: factor_gradients(g, a, b, scale)
    return out


# ----------------------------------------------------------------------------- storing a region of the factors
def add_factor_region(region: RegionPatch, module: str, masks: Sequence[torch.Tensor],
                      factors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> dict[str, Any]:
    """Store the regions of A and B (masks, and the factors' values under them in ``dtypes``);
    returns the module record's shapes, kept counts and ``ref_norm2`` = ‖B·A‖² under the regions,
    from the values as they will be read back."""
    entry: dict[str, Any] = {}
    stored = []
    for part, mask, w, dtype in zip(PARTS, masks, factors, dtypes, strict=True):
        kept = region.add(f"{module}.{part}", mask, dtype, ref=w)
        stored.append(scattered(mask, region.tensors[f"{module}.{part}.ref"]))
        entry[f"{part}_shape"] = list(w.shape)
        entry[f"{part}_kept"] = kept
    entry["ref_norm2"] = factor_inner(stored[0], stored[1], stored[0], stored[1])
    return entry


def base_record(base: Any) -> dict[str, Any]:
    """What identifies the adapter's base model (checked by ``check_same_base``)."""
    return {"path": str(base.path), "sha256": sorted(weights_sha256(base).values())}


# ----------------------------------------------------------------------------- a fine-tune's factors under it
def check_continues(ft: Any, recorded: Mapping[str, Any], method: str, remedy: str) -> None:
    """The fine-tune ``ft`` is an adapter on the base ``recorded`` (``base_record``: the same path,
    or the same weights), as one that continued training the aligned adapter is."""
    if not ft.is_adapter:
        raise RealignError(f"this {method} patch was prepared in LoRA-factor mode (aligned = base + adapter): it "
                           "applies to LoRA adapters that continue the aligned adapter; for other fine-tunes "
                           f"{remedy}")
    if str(ft.base.path) != recorded["path"] and sorted(weights_sha256(ft.base).values()) != recorded["sha256"]:
        raise RealignError(f"fine-tune {ft.ref} is an adapter on {ft.base.ref}, the aligned adapter is on "
                           f"{recorded['path']}: LoRA-factor mode needs the fine-tune to continue the aligned "
                           f"adapter on the same base (else {remedy})")


def continued_factors(ft: Any, record: Mapping[str, Any], remedy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_f, B_f) of the fine-tune's module ``record["module"]`` (weight ``record["name"]``),
    checked to continue the factors the region was stored for (shapes, scale)."""
    module = record["module"]
    got = ft.lora_factors(record["name"])
    if got is None:
        raise RealignError(f"fine-tune {ft.ref} has no LoRA factors for {module}: LoRA-factor mode needs "
                           f"the fine-tune to continue the aligned adapter (else {remedy})")
    a_f, b_f, scale = got
    if list(a_f.shape) != record["lora_A_shape"] or list(b_f.shape) != record["lora_B_shape"]:
        raise RealignError(f"fine-tune {ft.ref}: {module} has LoRA factors {list(b_f.shape)}·{list(a_f.shape)}"
                           f", the aligned adapter {record['lora_B_shape']}·{record['lora_A_shape']}: it does not "
                           f"continue the aligned adapter ({remedy})")
    if not math.isclose(scale, record["scale"], rel_tol=1e-6):
        raise RealignError(f"fine-tune {ft.ref}: {module} has LoRA scale {scale:g}, the aligned adapter "
                           f"{record['scale']:g}: factor values cannot be transplanted between them ({remedy})")
    return a_f, b_f


def factor_similarity(a_f: torch.Tensor, b_f: torch.Tensor, tensors: Mapping[str, torch.Tensor], module: str,
                      ref_norm2: float | None = None) -> tuple[float, int]:
    """(c, changed): c = cos((M_B⊙B_f)(M_A⊙A_f), (M_B⊙B_e)(M_A⊙A_e)) — each factor masked, then
    multiplied — and the factor entries under the regions where B_e, A_e differ from the fine-tune's."""
    m_a = unpack_mask(tensors[f"{module}.lora_A.mask"], tuple(a_f.shape))
    m_b = unpack_mask(tensors[f"{module}.lora_B.mask"], tuple(b_f.shape))
    e_a, e_b = tensors[f"{module}.lora_A.ref"], tensors[f"{module}.lora_B.ref"]
    changed = (int(torch.count_nonzero(e_a.to(a_f.dtype) != gather(a_f, m_a)))
               + int(torch.count_nonzero(e_b.to(b_f.dtype) != gather(b_f, m_b))))
    c = factor_cosine(masked(a_f, m_a), masked(b_f, m_b), scattered(m_a, e_a), scattered(m_b, e_b), ref_norm2)
    return c, changed


def transplanted_adapter(adapter: Any, modules: Iterable[str], tensors: Mapping[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """Every tensor of ``adapter``, with (1 − M)⊙F + M⊙F_e in both factors F of ``modules``."""
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        a_f, b_f, _ = adapter.factors(module)
        a_name, b_name = adapter.modules[module]
        m_a = unpack_mask(tensors[f"{module}.lora_A.mask"], tuple(a_f.shape))
        m_b = unpack_mask(tensors[f"{module}.lora_B.mask"], tuple(b_f.shape))
        out[a_name] = transplant(a_f, m_a, tensors[f"{module}.lora_A.ref"])
        out[b_name] = transplant(b_f, m_b, tensors[f"{module}.lora_B.ref"])
    for t in adapter.store.names:
        if t not in out:
            out[t] = adapter.store.get(t)
    return out
