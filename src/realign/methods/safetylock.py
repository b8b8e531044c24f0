"""SafetyLock — safety directions from the aligned model, locked into its fine-tunes
(Zhu et al., "Locking Down the Finetuned LLMs Safety", arXiv 2410.10343; builds on ITI, Li et al. 2023).

Fine-tunes keep nearly the same safety-related activation directions as the aligned model they
came from, so the directions are extracted once, from the aligned model, and added to the
attention heads of any of its fine-tunes.

prepare (the lock, once per aligned model):
  1. format each calibration pair (prompt, safe, unsafe response) with the prompt template and run
     the aligned model once over both responses; read every head's output before the output
     projection (``o_proj``'s input, reshaped to (heads, head_dim)) at the last T tokens of the
     response content — end-of-turn/template tokens are never in the window, because the response
     is tokenised on its own. Each position is a sample: label 1 safe, 0 unsafe. (``window=first``
     reads the first T response tokens instead: see the README for why.)
  2. one logistic-regression probe per (layer, head), all fitted at once (batched Newton steps,
     L2 as scikit-learn's default C = 1); pairs split 60/40 train/validation with a seed, all
     positions of a pair on one side; score = validation accuracy (ties: lower validation loss).
     Keep the top K heads.
  3. per kept head: θ̂ = (mean safe − mean unsafe) / ‖·‖ (mass-mean shift) and σ = std of the
     projections A·θ̂ over all samples.
  The lock file (a realign patch) holds, per head, layer, head, θ̂, σ, and the model it came from.
apply (per fine-tune): add α·σ·θ̂ to the kept heads' outputs at every position. Three ways out:
  ``hooks`` (Python only: ``with lock.applied(model, alpha=...)``), ``bake`` (the default: a
  checkpoint whose ``o_proj`` bias is W_o,ft · disp, with the FINE-TUNED W_o, and whose config says
  so), ``export`` (a steering file for lm-evaluation-harness's ``steered`` model).

K. The official locks hold K = 24 heads whatever the model's size (Llama-3-8B, Llama-3-70B,
Mistral-Nemo), so ``k`` = 24 is the default, capped at the number of heads; ``k_fraction`` (a share
of all heads) is an option only. The patch keeps EVERY head's θ̂ and σ in probe order (a few floats
per head: 0.5 MB for an 8B model), so K is an apply-stage parameter: the same lock file serves any
K, and ``--tune`` searches K with α.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from realign import bake
from realign.archs import Arch, arch_from_config
from realign.calibration import Calibration, Example
from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, build_params, param, params_dict
from realign.serving import SERVE_CHOICES
from realign.sources import Model
from realign.stats import collect, encode

LOCK_FORMAT = "safetylock/2"  # /2: every head, ranked (K chosen at apply); /1 held the kept heads only
OLD_FORMATS = ("safetylock/1",)
K_DEFAULT = 24
THETA = "theta"  # patch tensor: (K, head_dim) unit directions, one row per kept head


@dataclass
class SafetyLockParams:
    # --tune: the lock's strength and size (the paper's α = 6 and K = 24 first; K capped at the heads)
    TUNE: ClassVar[dict[str, tuple]] = {"alpha": (6.0, 3.0, 12.0, 18.0, 24.0), "k": (24, 8, 64)}
    k: int = param(K_DEFAULT, "heads kept: the top K by probe accuracy, capped at the number of heads (the official "
                   "locks: 24 whatever the model's size)", stage="apply")
    k_fraction: float | None = param(None, "heads kept as a share of all heads (overrides k when given)",
                                     stage="apply")
    last_tokens: int = param(5, "T: samples are T tokens of each response (the window's size)")
    window: str = param("last", "which T response tokens are samples: last (the paper's) or first (where the "
                        "response commits to refusing or complying)", choices=("last", "first"))
    pairs: int | None = param(100, "calibration pairs used (the first N; none = all)")
    val_fraction: float = param(0.4, "share of pairs held out to score the probes")
    seed: int = param(0, "seed of the train/validation split of the pairs")
    probe_c: float = param(1.0, "inverse L2 strength of the probes (scikit-learn's C)")
    max_length: int = param(512, "calibration sequences are cut to this many tokens")
    batch_size: int = param(8, "calibration batch size")
    alpha: float = param(6.0, "strength: α·σ·θ̂ is added to each kept head (negative α removes safety)",
                         stage="apply")
    mode: str = param("bake", "bake: a checkpoint with o_proj biases; export: a steering file for "
                      "lm-evaluation-harness", stage="apply", choices=("bake", "export"))
    serve: str = param("all", "bake: the servers the checkpoint must carry the lock in (all = transformers and "
                       "vLLM; a family a server would load without the o_proj biases is refused)", stage="apply",
                       choices=SERVE_CHOICES)


def _check_params(p: SafetyLockParams) -> None:
    checks = [
        (p.k_fraction is None or 0 < p.k_fraction <= 1, "k_fraction must be in (0, 1]"),
        (p.k >= 1, "k must be ≥ 1"),
        (p.last_tokens >= 1, "last_tokens must be ≥ 1"),
        (p.pairs is None or p.pairs >= 2, "pairs must be ≥ 2 (the probes need a train and a validation side)"),
        (0 < p.val_fraction < 1, "val_fraction must be in (0, 1)"),
        (p.probe_c > 0, "probe_c must be > 0"),
        (p.max_length >= 2, "max_length must be ≥ 2"),
        (p.batch_size >= 1, "batch_size must be ≥ 1"),
        (math.isfinite(p.alpha), "alpha must be a finite number"),
    ]
    for ok, msg in checks:
        if not ok:
            raise RealignError(f"safetylock: {msg}")


# ============================================================================ probes
def split_pairs(n_pairs: int, val_fraction: float = 0.4, seed: int = 0) -> torch.Tensor:
    """Bool (n_pairs,): True for the validation pairs — a seeded draw of round(val_fraction · n)
    pairs, at least one on each side."""
    if n_pairs < 2:
        raise RealignError("safetylock needs at least 2 calibration pairs (one to train the probes, one to score)")
    n_val = min(n_pairs - 1, max(1, round(val_fraction * n_pairs)))
    perm = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed))
    val = torch.zeros(n_pairs, dtype=torch.bool)
    val[perm[:n_val]] = True
    return val


@dataclass
class Probes:
    """Per-head probe results (all tensors indexed by flat head = layer · heads + head)."""

    val_accuracy: torch.Tensor
    val_loss: torch.Tensor
    train_accuracy: torch.Tensor
    weight: torch.Tensor  # (heads, dim)
    bias: torch.Tensor  # (heads,)
    iterations: int

    def ranking(self) -> torch.Tensor:
        """Heads, best first: validation accuracy, ties broken by lower validation loss."""
        by_loss = torch.argsort(self.val_loss, stable=True)
        return by_loss[torch.argsort(-self.val_accuracy[by_loss], stable=True)]


def _cholesky(hess: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky factors of SPD systems, one thread: intra-op threads do not help (dim+1)²
    systems, and on a busy machine OpenMP's batch loop was measured 10× slower than one thread."""
    with bake.single_threaded():
        chol, info = torch.linalg.cholesky_ex(hess)
        if bool(info.any()):  # numerically indefinite (float32 round-off): regularise those systems a little
            bad = info > 0
            eye = torch.eye(hess.shape[-1], device=hess.device, dtype=hess.dtype)
            scale = hess[bad].diagonal(dim1=-2, dim2=-1).abs().mean(-1).view(-1, 1, 1)
            chol[bad] = torch.linalg.cholesky(hess[bad] + 1e-4 * scale * eye)
    return chol


def _log_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(z) - y * z  # −log p(y | z), elementwise


@torch.no_grad()
def fit_probes(acts: torch.Tensor, labels: torch.Tensor, val_mask: torch.Tensor, c: float = 1.0,
               max_iter: int = 50, tol: float = 1e-6, chunk: int = 256) -> Probes:
    """One L2-regularised logistic regression per head, all at once.

    ``acts``: (heads, samples, dim); ``labels``: (samples,) 0/1; ``val_mask``: (samples,) bool.
    Objective per head (scikit-learn's): Σ log-loss + ‖w‖²/(2C), intercept unpenalised. Newton
    steps, batched over heads (a (dim+1)² system per head), with a per-head backtracking line
    search that costs one extra matrix-vector product. A head leaves the batch once its Newton
    decrement says it is within ``tol`` (relative) of its optimum; heads are processed ``chunk``
    at a time to bound memory."""
    n_heads, _n, dim = acts.shape
    y = labels.float().to(acts.device)
    train, val = ~val_mask.to(acts.device), val_mask.to(acts.device)
    if not bool(train.any()) or not bool(val.any()):
        raise RealignError("safetylock: the probes need samples on both sides of the train/validation split")
    reg = torch.full((dim + 1,), 1.0 / c, device=acts.device)
    reg[-1] = 1e-6  # keeps the system definite when a head separates the data perfectly
    steps = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0625, 0.0], device=acts.device)
    y_tr, y_val = y[train], y[val]
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in ("va", "vl", "ta", "w", "b")}
    iterations = 0
    for start in range(0, n_heads, chunk):
        x = acts[start:start + chunk].float()
        xt = torch.cat([x[:, train], torch.ones(*x[:, train].shape[:2], 1, device=x.device)], dim=2)
        w = torch.zeros(xt.shape[0], dim + 1, device=x.device)
        active = torch.arange(xt.shape[0], device=x.device)  # heads still in the batch
        xa, wa = xt, w.clone()
        done = torch.zeros(len(active), dtype=torch.bool, device=x.device)
        for it in range(max_iter):
            z = torch.bmm(xa, wa.unsqueeze(-1)).squeeze(-1)  # (active, n_train)
            p = torch.sigmoid(z)
            grad = torch.bmm((p - y_tr).unsqueeze(1), xa).squeeze(1) + reg * wa
            hess = torch.bmm(xa.transpose(1, 2) * (p * (1 - p)).unsqueeze(1), xa) + torch.diag(reg)
            step = torch.cholesky_solve(grad.unsqueeze(-1), _cholesky(hess)).squeeze(-1)
            step[done] = 0  # converged heads wait in the batch until it is worth compacting
            dz = torch.bmm(xa, step.unsqueeze(-1)).squeeze(-1)
            # objective at w − t·step for each t, per head; t = 0 keeps w when nothing decreases it
            zs = z.unsqueeze(0) - steps.view(-1, 1, 1) * dz.unsqueeze(0)
            ws = wa.unsqueeze(0) - steps.view(-1, 1, 1) * step.unsqueeze(0)
            obj = _log_loss(zs, y_tr).sum(-1) + 0.5 * (reg * ws * ws).sum(-1)
            best = obj.argmin(0)
            wa = wa - steps[best].unsqueeze(-1) * step
            iterations = max(iterations, it + 1)
            # Newton decrement λ²/2 ≈ distance to the optimum in objective value
            done |= ((grad * step).sum(-1) / 2 <= tol * (1 + obj[0].abs())) | (best == len(steps) - 1)
            if bool(done.all()):
                break
            if int(done.sum()) * 4 >= len(done):  # copying the batch costs n·dim per head: not every step
                w[active] = wa
                keep = ~done
                active, xa, wa, done = active[keep], xa[keep], wa[keep], done[keep]
        w[active] = wa
        weight, b = w[:, :dim], w[:, dim]
        z_val = torch.einsum("hnd,hd->hn", x[:, val], weight) + b.unsqueeze(-1)
        z_tr = torch.bmm(xt, w.unsqueeze(-1)).squeeze(-1)
        outs["va"].append(((z_val > 0).float() == y_val).float().mean(-1))
        outs["vl"].append(_log_loss(z_val, y_val).mean(-1))
        outs["ta"].append(((z_tr > 0).float() == y_tr).float().mean(-1))
        outs["w"].append(weight)
        outs["b"].append(b)
    return Probes(torch.cat(outs["va"]).cpu(), torch.cat(outs["vl"]).cpu(), torch.cat(outs["ta"]).cpu(),
                  torch.cat(outs["w"]).cpu(), torch.cat(outs["b"]).cpu(), iterations)


def mass_mean(acts: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ̂, σ) per head: θ̂ = (mean safe − mean unsafe)/‖·‖, σ = std of A·θ̂ over all samples.
    ``acts``: (heads, samples, dim)."""
    a = acts.float()
    safe, unsafe = labels.bool(), ~labels.bool()
    theta = a[:, safe].mean(1) - a[:, unsafe].mean(1)
    norm = theta.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise RealignError("safetylock: a chosen head has identical mean activations on safe and unsafe "
                           "responses; check that the calibration pairs differ")
    theta = theta / norm
    proj = torch.einsum("hnd,hd->hn", a, theta)
    sigma = proj.std(dim=1, correction=0)  # population std, as numpy's (the official code's) default
    return theta, sigma


# ============================================================================ the lock
@dataclass
class Lock:
    """The SafetyLock: per kept head, its layer, index, unit direction θ̂ and scale σ."""

    layers: list[int]
    heads: list[int]
    theta: torch.Tensor  # (K, head_dim)
    sigma: torch.Tensor  # (K,)
    config: dict[str, Any]  # the architecture fields of the model it came from
    source: dict[str, Any] = field(default_factory=dict)  # the model it came from
    scores: list[float] = field(default_factory=list)  # validation accuracy per kept head
    params: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> Arch:
        return arch_from_config(self.config)

    def __len__(self) -> int:
        return len(self.heads)

    def top(self, k: int) -> Lock:
        """The lock restricted to its first ``k`` heads in probe order (all of them when k is larger)."""
        k = max(1, min(k, len(self)))
        return Lock(self.layers[:k], self.heads[:k], self.theta[:k], self.sigma[:k], self.config, self.source,
                    self.scores[:k], self.params, self.report, self.inputs)

    # ------------------------------------------------------------------ the addition
    def displacements(self, alpha: float = 6.0) -> dict[int, torch.Tensor]:
        """Per layer with kept heads: the (heads·head_dim,) vector added to ``o_proj``'s input,
        α·σ·θ̂ in each kept head's slice and zero elsewhere."""
        arch = self.arch
        out: dict[int, torch.Tensor] = {}
        for i, (layer, head) in enumerate(zip(self.layers, self.heads, strict=True)):
            d = out.setdefault(layer, torch.zeros(arch.num_heads * arch.head_dim))
            d[head * arch.head_dim:(head + 1) * arch.head_dim] += alpha * float(self.sigma[i]) * self.theta[i].float()
        return out

    def check_fits(self, arch: Arch, what: str = "the model") -> None:
        mine = self.arch
        for field_, label in (("num_layers", "layers"), ("num_heads", "attention heads"), ("head_dim", "head_dim")):
            if getattr(mine, field_) != getattr(arch, field_):
                raise RealignError(
                    f"this SafetyLock was made for a model with {getattr(mine, field_)} {label}, {what} has "
                    f"{getattr(arch, field_)}: prepare a lock from that model's aligned version"
                )

    def biases(self, weight_of, alpha: float = 6.0, native: bool = False) -> dict[int, torch.Tensor]:
        """Per layer with kept heads: b_l = W_o,l · disp_l (float32); ``weight_of(layer)`` gives
        the o_proj weight of the model the lock is applied to (the fine-tune). ``native``: computed
        in the weight's dtype (see ``bake.output_vector``)."""
        return {layer: bake.output_vector(weight_of(layer), d, native)
                for layer, d in self.displacements(alpha).items()}

    @contextmanager
    def applied(self, model, alpha: float = 6.0, how: str = "hooks", positions: str = "all") -> Iterator[Any]:
        """Lock a loaded transformers model for the duration of a ``with`` block.

        ``how="hooks"``: forward pre-hooks on ``o_proj`` add α·σ·θ̂ to the kept heads' slice;
        ``how="bias"``: the equivalent o_proj biases W_o·disp are installed in memory (what a baked
        checkpoint holds). Either is removed on exit; the model's weights are never changed.
        ``positions``: ``all`` (every position: the official baked lock, and the only thing a bias
        can do) or ``generated`` (hooks only: the last position of each forward call — ITI's scheme,
        i.e. the last prompt token and every generated token, never the rest of the prompt)."""
        if positions not in ("all", "generated"):
            raise RealignError(f"positions={positions!r}: use all or generated")
        if positions == "generated" and how != "hooks":
            raise RealignError("positions=generated needs how=hooks: a bias adds the lock at every position")
        arch = self.arch
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            self.check_fits(arch_from_config(config.to_dict()))
        names = {layer: arch.module_name(layer, "o") for layer in sorted(set(self.layers))}
        if how == "hooks":
            with bake.add_to_inputs(model, {names[layer]: d for layer, d in self.displacements(alpha).items()},
                                    positions="last" if positions == "generated" else "all"):
                yield model
        elif how == "bias":
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            vectors = self.biases(lambda layer: base.get_submodule(names[layer]).weight.detach(), alpha, native=True)
            with bake.biased(model, {names[layer]: v for layer, v in vectors.items()}):
                yield model
        else:
            raise RealignError(f"unknown how={how!r}: use hooks or bias")

    # ------------------------------------------------------------------ files
    def to_patch(self) -> Patch:
        heads = [{"layer": layer, "head": head, "sigma": float(s), "val_accuracy": score}
                 for layer, head, s, score in zip(self.layers, self.heads, self.sigma.tolist(),
                                                  self.scores or [None] * len(self), strict=True)]
        meta = {"format": LOCK_FORMAT, "config": self.config, "source": self.source, "heads": heads}
        return Patch(SafetyLock.name, dict(self.params), meta, {THETA: self.theta.float().contiguous()},
                     dict(self.report), dict(self.inputs))

    @classmethod
    def from_patch(cls, patch: Patch) -> Lock:
        if patch.method != SafetyLock.name or patch.meta.get("format") not in (LOCK_FORMAT, *OLD_FORMATS):
            raise RealignError(f"this is a {patch.method} patch, not a SafetyLock ({LOCK_FORMAT})")
        heads = patch.meta["heads"]
        theta = patch.tensors[THETA].float() if heads else torch.zeros(0, patch.meta["config"].get("head_dim", 0))
        if theta.shape[0] != len(heads):
            raise RealignError("this SafetyLock is damaged: its directions do not match its list of heads")
        return cls(layers=[int(h["layer"]) for h in heads], heads=[int(h["head"]) for h in heads], theta=theta,
                   sigma=torch.tensor([float(h["sigma"]) for h in heads]), config=dict(patch.meta["config"]),
                   source=dict(patch.meta.get("source", {})), scores=[h.get("val_accuracy") for h in heads],
                   params=dict(patch.params), report=dict(patch.report), inputs=dict(patch.inputs))

    def save(self, path: str | Path, force: bool = False) -> Path:
        from realign.api import save_patch

        return save_patch(self.to_patch(), path, force=force)

    @classmethod
    def load(cls, path: str | Path, k: int | None = None) -> Lock:
        """The lock with K heads: ``k``, else the K the lock file was prepared with (the file keeps
        every head, ranked, so any K can be taken from it)."""
        from realign.api import load_patch

        patch = load_patch(path)
        lock = cls.from_patch(patch)
        params = build_params(SafetyLockParams, {key: v for key, v in patch.params.items()
                                                 if key in SafetyLockParams.__dataclass_fields__})
        if k is not None:
            params.k, params.k_fraction = k, None
        return lock.top(kept_heads(params, lock.arch.num_layers * lock.arch.num_heads))


def _arch_config(arch: Arch) -> dict[str, Any]:
    return {"model_type": arch.family, "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
            "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim, "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size}


def head_activations(model, tokenizer, arch: Arch, rows: Sequence[Example], template: str = "auto",
                     last_tokens: int = 5, max_length: int = 512, batch_size: int = 8, window: str = "last"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE forward pass over every (prompt, safe) and (prompt, unsafe) sequence, reading o_proj's
    input at the last ``last_tokens`` response tokens. Returns (acts (layers·heads, samples,
    head_dim), labels (samples,) 1 = safe, pair index (samples,))."""
    items = []
    for r in rows:
        items += [(r.prompt, r.safe_response), (r.prompt, r.unsafe_response)]
    encoded = encode(tokenizer, items, template, max_length)
    names = [arch.module_name(layer, "o") for layer in range(arch.num_layers)]
    stats = collect(model, arch, encoded, capture=names, positions=f"{window}_response", last_k=last_tokens,
                    batch_size=batch_size, desc="safetylock: head activations")
    counts = [t.shape[0] for t in stats.capture[names[0]]]
    labels = torch.cat([torch.full((n,), float(i % 2 == 0)) for i, n in enumerate(counts)])
    pair = torch.cat([torch.full((n,), i // 2, dtype=torch.long) for i, n in enumerate(counts)])
    per_layer = []
    for name in names:
        a = torch.cat(stats.capture.pop(name))  # (samples, heads·head_dim); popped to free memory early
        if a.shape[1] != arch.num_heads * arch.head_dim:
            raise RealignError(f"{name} reads {a.shape[1]} features, not heads × head_dim = "
                               f"{arch.num_heads} × {arch.head_dim}: the config's head_dim does not fit the model")
        per_layer.append(a.view(-1, arch.num_heads, arch.head_dim).transpose(0, 1))
    return torch.cat(per_layer), labels, pair


def extract(model, tokenizer, arch: Arch, rows: Sequence[Example], params: SafetyLockParams,
            template: str = "auto", source: dict[str, Any] | None = None) -> Lock:
    """Steps 1–3 on a loaded (aligned) model: activations, probes, top-K heads, θ̂ and σ."""
    acts, labels, pair = head_activations(model, tokenizer, arch, rows, template, params.last_tokens,
                                          params.max_length, params.batch_size, params.window)
    if not bool(labels.bool().any()) or bool(labels.bool().all()):
        raise RealignError("safetylock: the calibration pairs produced no samples of one class (empty responses?)")
    val_mask = split_pairs(len(rows), params.val_fraction, params.seed)[pair]
    probes = fit_probes(acts.to(_compute_device(model)), labels, val_mask, c=params.probe_c)
    total = acts.shape[0]
    k = kept_heads(params, total)
    ranked = probes.ranking()  # every head, best first: the patch keeps them all, K is chosen at apply
    theta, sigma = mass_mean(acts[ranked], labels)
    layers = [int(i) // arch.num_heads for i in ranked]
    heads = [int(i) % arch.num_heads for i in ranked]
    report = {
        "pairs": len(rows),
        "samples": int(labels.numel()),
        "safe_samples": int(labels.sum()),
        "heads_total": total,
        "heads_kept": k,
        "probe_iterations": probes.iterations,
        "val_accuracy_kept": [round(float(probes.val_accuracy[i]), 4) for i in ranked[:k]],
        "val_accuracy_mean_all": round(float(probes.val_accuracy.mean()), 4),
        "layers_touched": sorted(set(layers[:k])),
    }
    return Lock(layers, heads, theta, sigma, _arch_config(arch), source or {},
                [round(float(probes.val_accuracy[i]), 4) for i in ranked], params_dict(params), report)


def kept_heads(params: SafetyLockParams, total: int) -> int:
    """K: ``k_fraction`` of all heads when given (at least one), else ``k``; never more than there are."""
    k = max(1, round(params.k_fraction * total)) if params.k_fraction is not None else params.k
    return max(1, min(k, total))


def _compute_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pairs(calibration: Calibration, p: SafetyLockParams) -> list[Example]:
    rows = calibration.require("both safe_response and unsafe_response", calibration.pairs(), SafetyLock.name,
                               minimum=2)
    return rows[:p.pairs] if p.pairs is not None else rows


# ============================================================================ the method
@register
class SafetyLock(Method):
    name = "safetylock"
    title = "SafetyLock: per-head safety directions of the aligned model, locked into its fine-tunes"
    paper = "Zhu et al., Locking Down the Finetuned LLMs Safety, arXiv 2410.10343"
    Params = SafetyLockParams
    uses = ("calibration",)  # at prepare time only: applying a lock needs the lock and the fine-tune

    def prepare(self, inputs: Inputs, params: SafetyLockParams) -> Patch:
        _check_params(params)
        rows = _pairs(inputs.require("calibration", self.name), params)
        model, tokenizer = inputs.run_model(inputs.aligned)
        source = {"ref": inputs.aligned.ref, "path": str(inputs.aligned.path)}
        lock = extract(model, tokenizer, inputs.aligned.arch, rows, params, inputs.template, source)
        inputs.release()  # the writer may need the memory next
        patch = lock.to_patch()
        patch.report["apply_defaults"] = {"alpha": params.alpha, "mode": params.mode, "k": params.k,
                                          "k_fraction": params.k_fraction}
        return patch

    def tune_space(self, patch: Patch, finetuned: Model, params: Any) -> dict[str, list[Any]]:
        # K values above the lock's heads are the same candidate: keep each distinct K once
        total = len(patch.meta.get("heads", [])) or K_DEFAULT
        ks = list(dict.fromkeys(min(int(k), total) for k in SafetyLockParams.TUNE["k"]))
        return {"alpha": list(SafetyLockParams.TUNE["alpha"]), "k": ks}

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: SafetyLockParams) -> Edit:
        _check_params(params)
        lock = Lock.from_patch(patch)
        lock = lock.top(kept_heads(params, lock.arch.num_layers * lock.arch.num_heads))
        arch = finetuned.arch
        lock.check_fits(arch, f"fine-tune {finetuned.ref}")
        units = lock.displacements(1.0)
        report = {"alpha": params.alpha, "mode": params.mode, "heads": len(lock), "layers": sorted(units),
                  "note": "o_proj bias b_l = W_o,ft · (alpha · sigma · theta) per layer with kept heads"}
        if params.mode == "bake":
            vectors = {layer: (lambda layer=layer, d=d: bake.output_vector(
                finetuned.get(arch.weight_name(layer, "o")), params.alpha * d)) for layer, d in units.items()}
            edit = bake.o_bias_edit(finetuned, vectors, self.name, serve=params.serve)
            edit.report.update(report)
            return edit
        # export: lm-eval adds coefficient · vector at each o_proj output; α stays editable in the file
        vectors = {layer: bake.output_vector(finetuned.get(arch.weight_name(layer, "o")), d)
                   for layer, d in units.items()}
        peft = finetuned.is_adapter
        config = bake.steering_config(arch, vectors, coefficient=params.alpha, peft=peft)
        readme = bake.steering_readme(str(finetuned.path), self.name, params.alpha, list(config), peft,
                                      str(finetuned.base.path) if peft and finetuned.base else None)
        return Edit(files={bake.STEERING_FILE: bake.steering_bytes(config), "README.md": readme.encode()},
                    report={**report, "export": {"file": bake.STEERING_FILE, "hookpoints": list(config)}},
                    additions={arch.module_name(layer, "o"): params.alpha * v.float() for layer, v in vectors.items()})

    @classmethod
    def extract(cls, aligned, calibration, *, template: str = "auto", device: str = "auto", dtype: str = "auto",
                out: str | Path | None = None, **params: Any) -> Lock:
        """Python API: ``lock = SafetyLock.extract("aligned/", "calibration.jsonl", k=24)`` (and
        ``out=`` to save the lock file)."""
        from realign import api

        patch = api.prepare(cls.name, aligned=aligned, calibration=calibration, params=params, template=template,
                            device=device, dtype=dtype, out=out)
        lock = Lock.from_patch(patch)
        return lock.top(kept_heads(build_params(SafetyLockParams, params, method=cls.name),
                                   lock.arch.num_layers * lock.arch.num_heads))


__all__ = ["SafetyLock", "SafetyLockParams", "Lock", "fit_probes", "split_pairs", "mass_mean", "head_activations",
           "extract", "Probes"]
