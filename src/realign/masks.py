"""Sparse regions of weight matrices: choosing them by score, storing them (1 bit per entry),
reading and writing the weights under them, fast enough to stream a multi-GB checkpoint.

A region is a boolean mask of a matrix. On disk it is the mask bit-packed (row-major, most
significant bit first) plus, per matrix, the values under it as a 1-D vector in row-major order
(``RegionPatch`` builds such a patch). Methods that select and transplant entries (NLSR, and
those that need the same kinds of masks) share these kernels, and the activation-aware low-rank
projection whose magnitudes score the entries (``lowrank_projection``).

Masks and gathers go through numpy: its bit packing and compress/put are several times faster
than torch's boolean indexing on CPU. The streaming kernels (``masked_similarity``,
``transplant_packed``) work on row-major chunks straight from the packed bits (no full boolean
mask, no full float copies), in a few threads (numpy and torch release the GIL), and add the
chunks up in a fixed order, so results do not depend on the thread count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from realign.errors import RealignError

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------- scoring a region
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


def projection_from_stats(w: torch.Tensor, r: int, stats: Any, module: str, shared: str,
                          halves: dict[str, torch.Tensor]) -> torch.Tensor:
    """``lowrank_projection`` of ``module``'s weight from the statistic collected for it
    (``realign.stats.Stats``): its output Gram, else the input Gram stored under ``shared`` (the
    module whose input it reads), factored once per input into ``halves`` when d_out > d_in."""
    if module in stats.out_gram:
        return lowrank_projection(w, r, out_gram=stats.out_gram[module])
    if w.shape[0] <= w.shape[1]:
        return lowrank_projection(w, r, gram=stats.gram[shared])
    if shared not in halves:
        halves[shared] = gram_half(stats.gram[shared])
    return lowrank_projection(w, r, half=halves[shared])


def gram_half(gram: torch.Tensor) -> torch.Tensor:
    """H with G = H Hᵀ (float64), from one eigendecomposition of the input Gram G."""
    lam, v = torch.linalg.eigh(_sym(gram.double()))
    return v * lam.clamp_min(0).sqrt()


def _sym(k: torch.Tensor) -> torch.Tensor:
    return (k + k.T) / 2  # running sums drift from exact symmetry; eigh reads one triangle


def _top_eigvecs(k: torch.Tensor, r: int) -> torch.Tensor:
    _, v = torch.linalg.eigh(_sym(k))  # ascending eigenvalues
    return v[:, k.shape[0] - r:]


# ----------------------------------------------------------------------------- choosing a region
def keep_above(score: torch.Tensor, drop: float, dim: int | None = None) -> torch.Tensor:
    """Boolean mask of the entries scored strictly above the ⌊n·drop⌋-th smallest score (0-based)
    of their group: the whole tensor (``dim=None``) or each slice along ``dim`` (``dim=1``: each
    row of a matrix). Without ties that keeps n − ⌊n·drop⌋ − 1 entries per group; entries tied
    with that score are all left out. This is the official NLSR code's count (``thresh =
    sorted(score)[int(n * drop)]``, kept = ``score > thresh``), one entry fewer than the top
    n − ⌊n·drop⌋. NaN scores count as 0."""
    if not 0 <= drop < 1:
        raise ValueError("drop must be in [0, 1)")
    s = torch.nan_to_num(score.float(), nan=0.0)
    if dim is None:
        flat = s.reshape(-1)
        k = math.floor(flat.numel() * drop)
        thresh = torch.kthvalue(flat, k + 1).values
        return s > thresh
    n = s.shape[dim]
    k = math.floor(n * drop)
    thresh = torch.kthvalue(s, k + 1, dim=dim, keepdim=True).values
    return s > thresh


# ----------------------------------------------------------------------------- storing a region
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


@dataclass
class RegionPatch:
    """A patch of regions being built: per matrix KEY, ``KEY.mask`` (bit-packed) and one value
    vector per source (``KEY.ref``, ``KEY.base``, …), plus the records a method keeps per module."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: list[dict[str, Any]] = field(default_factory=list)
    kept: int = 0
    entries: int = 0

    def add(self, key: str, mask: torch.Tensor, dtype: torch.dtype, **values: torch.Tensor | None) -> int:
        """Store ``mask`` and, per named source, its values under the mask in ``dtype`` (None: not
        stored); returns the entries kept."""
        self.tensors[f"{key}.mask"] = pack_mask(mask)
        for suffix, w in values.items():
            if w is not None:
                self.tensors[f"{key}.{suffix}"] = gather(w, mask).to(dtype)
        kept = int(mask.sum())
        self.kept += kept
        self.entries += mask.numel()
        return kept


def gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entries of ``x`` under ``mask``, row-major, in x's dtype (= x.reshape(-1)[mask.reshape(-1)])."""
    x = x.detach().cpu().contiguous()
    return torch.from_numpy(np.compress(mask.reshape(-1).cpu().numpy(), _bits(x))).view(x.dtype)


def scattered(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 zeros with ``values`` under ``mask`` (M⊙W from the stored values)."""
    out = torch.zeros(mask.shape)
    np.put(_bits(out), np.flatnonzero(mask.reshape(-1).numpy()), _bits(values.float().contiguous()))
    return out


def masked(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 M⊙W (one new tensor, zeroed in place)."""
    return w.to(torch.float32, copy=True).masked_fill_(~mask, 0.0)


def transplant(w: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(1 − M)⊙W + M⊙V, with V given by its values under M (row-major order)."""
    new = w.clone(memory_format=torch.contiguous_format)
    np.put(_bits(new), np.flatnonzero(mask.reshape(-1).numpy()), _bits(values.to(new.dtype).contiguous()))
    return new


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


# ----------------------------------------------------------------------------- streaming kernels
_CHUNK = 1 << 20  # entries (a multiple of 8 so chunks start on a mask byte); small: 4 threads hold one each
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_POOL: ThreadPoolExecutor | None = None


def _popcount(packed: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT[packed].sum(dtype=np.int64))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                   thread_name_prefix="realign-masks")
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
    """(c, changed) for one matrix: c = cos(W_f[M] − W_b[M], W_e[M] − W_b[M]) (without ``base``:
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


# ----------------------------------------------------------------------------- applying a patch
def check_fits(ft: Any, shapes: Mapping[str, Sequence[int]]) -> None:
    """Each matrix of a patch ({name: shape}) is in the model ``ft``, with that shape."""
    for name, shape in shapes.items():
        if name not in ft or tuple(ft.shape(name)) != tuple(shape):
            got = list(ft.shape(name)) if name in ft else "missing"
            raise RealignError(f"the patch does not fit fine-tune {ft.ref}: {name} is {got}, the patch was "
                               f"prepared for {list(shape)}")


def region_similarities(ft: Any, shapes: Mapping[str, Sequence[int]], tensors: Mapping[str, torch.Tensor],
                        with_base: bool, desc: str = "similarity per matrix") -> Iterator[tuple[float, int]]:
    """``masked_similarity`` of each weight of the model ``ft`` named in ``shapes`` against the
    patch's ``NAME.mask``, ``NAME.ref`` (and ``NAME.base``), in order, streamed: the next matrix
    is read while this one is compared. Checks first that every matrix fits (``check_fits``)."""
    from realign.progress import progress
    from realign.tensorio import prefetched

    check_fits(ft, shapes)

    def read(name: str) -> tuple[torch.Tensor, ...]:
        return (ft.get(name), tensors[f"{name}.mask"], tensors[f"{name}.ref"],
                tensors[f"{name}.base"] if with_base else None)

    def stream() -> Iterator[tuple[float, int]]:
        for _name, arrays in progress(prefetched(list(shapes), read), desc=desc, total=len(shapes), unit="module"):
            result = masked_similarity(*arrays)
            del arrays
            yield result

    return stream()


def transplant_from(tensors: Mapping[str, torch.Tensor], key: str
                    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
    """A writer transform W → ((1 − M)⊙W + M⊙V, entries changed) for the patch's matrix ``key``.
    The mask and values are read when the writer reaches the tensor (memory stays one matrix); the
    writer hands over a fresh copy of W, transplanted in place."""
    def fn(old: torch.Tensor) -> tuple[torch.Tensor, int]:
        return transplant_packed(old, tensors[f"{key}.mask"], tensors[f"{key}.ref"], in_place=True)
    return fn
