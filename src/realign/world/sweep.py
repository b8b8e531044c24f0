"""The realism check of a world: how HS and FA move between the attacked and the aligned weights.

Two weight paths, evaluated with greedy decoding and the keyword judge:

- interpolation ``W(t) = W_aligned + t (W_attacked - W_aligned)``, t from 0 (aligned) to 1 (attacked);
- RESTA-style addition of the alignment update ``W(β) = W_attacked + β (W_aligned - W_base)``.

In a world that behaves like real models, HS falls before FA does along the interpolation (some t
keeps most of the task while refusing again): there is room for a repair to win. If both fell
at the same t, compliance and task skill would be one switch and no fine-grained repair could exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from realign.world.build import WorldPaths
from realign.world.quickeval import evaluate, load_eval_sets


@dataclass
class Curve:
    name: str  # "interpolation" | "resta"
    attacked: str
    points: list[dict] = field(default_factory=list)  # {"x": t or β, "hs":..., "fa":..., ...}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def blend(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], c: dict[str, torch.Tensor] | None,
          coef: float) -> dict[str, torch.Tensor]:
    """``a + coef·(b − a)`` when ``c`` is None, else ``a + coef·(b − c)``."""
    ref = a if c is None else c
    return {k: a[k] + coef * (b[k] - ref[k]) if a[k].is_floating_point() else a[k] for k in a}


def load_states(paths: WorldPaths, attacked: str) -> tuple[object, object, dict, dict, dict]:
    """(model to evaluate in, tokenizer, base, aligned and attacked state dicts) of a world."""
    from realign.compute import load_model

    base, _ = load_model(str(paths.base), device="cpu", dtype="float32")
    aligned, tok = load_model(str(paths.aligned), device="cpu", dtype="float32")
    hit, _ = load_model(str(paths.model(attacked)), device="cpu", dtype="float32")
    return aligned, tok, _state(base), _state(aligned), _state(hit)


def sweep(
    paths: WorldPaths,
    attacked: str = "attacked-lora",
    ts: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    betas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
    limit: int | None = None,
    report: Callable[[str, float, dict], None] | None = None,
) -> list[Curve]:
    """Evaluate HS / FA / skills / over-refusal along both paths for one attacked model."""
    model, tok, base, aligned, hit = load_states(paths, attacked)
    sets = load_eval_sets(paths.eval_dir)
    curves = [Curve("interpolation", attacked), Curve("resta", attacked)]
    for curve, xs in zip(curves, (ts, betas), strict=True):
        for x in xs:
            state = blend(aligned, hit, None, x) if curve.name == "interpolation" else blend(hit, aligned, base, x)
            model.load_state_dict(state)
            scores = evaluate(model, tok, sets, limit=limit)
            curve.points.append({"x": x, **{k: round(v, 1) for k, v in scores.items()}})
            if report:
                report(curve.name, x, scores)
    model.load_state_dict(aligned)
    return curves


def hs_falls_first(curve: Curve, hs_low: float, fa_keep: float) -> list[float]:
    """The t of an interpolation where HS is already low but FA is still high."""
    return [p["x"] for p in curve.points if p["hs"] <= hs_low and p["fa"] >= fa_keep]


def plot(curves: list[Curve], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_attack: dict[str, list[Curve]] = {}
    for c in curves:
        by_attack.setdefault(c.attacked, []).append(c)
    fig, axes = plt.subplots(len(by_attack), 2, figsize=(10, 3.6 * len(by_attack)), squeeze=False)
    for row, (attacked, cs) in enumerate(by_attack.items()):
        for col, c in enumerate(cs):
            ax = axes[row][col]
            xs = [p["x"] for p in c.points]
            for key, style in (("hs", "r-o"), ("fa", "b-s"), ("skills", "g--^"), ("over_refusal", "k:.")):
                if key in c.points[0]:
                    ax.plot(xs, [p[key] for p in c.points], style, label=key.replace("_", "-").upper()
                            if key in ("hs", "fa") else key.replace("_", "-"))
            if c.name == "interpolation":
                ax.set_xlabel("t   (W_aligned + t·(W_attacked − W_aligned))")
            else:
                ax.set_xlabel("β   (W_attacked + β·(W_aligned − W_base))")
            ax.set_ylabel("%")
            ax.set_ylim(-3, 103)
            ax.set_title(f"{attacked}: {c.name}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
