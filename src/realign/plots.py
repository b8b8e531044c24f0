"""The HS-vs-FA scatter that the demo and ``realign compare`` draw.

Read by a person: one colour per method, one marker shape per fine-tune (target), hollow for a
method's default setting and filled for its tuned one, reference models in black with their own
shapes, and everything named in a legend beside the axes instead of text next to the points
(repairs that work cluster in one corner, where labels would print over each other).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from realign.writer import write_file_atomic

TARGET_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
REFERENCE_MARKERS = ("*", "X", "P", "D", "p", "H", "8", "d")


@dataclass(frozen=True)
class Point:
    fa: float
    hs: float
    label: str  # what the legend calls a reference point (method points are named by method and target)
    method: str | None = None  # None: a reference model (base, aligned, attacked, ...)
    target: str = ""  # the fine-tune a method repaired: one marker shape per target
    tuned: bool = False


def hs_fa_plot(points: Sequence[Point], path: str | os.PathLike, title: str) -> Path:
    """Write the scatter to ``path`` (PNG, atomically) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = list(dict.fromkeys(p.method for p in points if p.method is not None))
    targets = list(dict.fromkeys(p.target for p in points if p.method is not None))
    references = [p for p in points if p.method is None]
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    shape = {t: TARGET_MARKERS[i % len(TARGET_MARKERS)] for i, t in enumerate(targets)}

    fig, ax = plt.subplots(figsize=(9.5, 6), dpi=120)
    try:
        for p in points:
            if p.method is None:
                continue
            c = colour[p.method]
            ax.scatter([p.fa], [p.hs], marker=shape[p.target], s=70, linewidths=1.6, edgecolors=[c],
                       facecolors=[c] if p.tuned else ["none"], zorder=3)
        for i, p in enumerate(references):
            ax.scatter([p.fa], [p.hs], marker=REFERENCE_MARKERS[i % len(REFERENCE_MARKERS)], s=150, color="black",
                       zorder=2)  # under the methods: a repair landing on a reference (revert) stays visible
        handles = [Line2D([], [], linestyle="", marker="s", markersize=9, color=colour[m], label=m) for m in methods]
        if targets:
            handles.append(Line2D([], [], linestyle="", label=" "))
            handles += [Line2D([], [], linestyle="", marker=shape[t], markersize=8, markerfacecolor="none",
                               markeredgecolor="dimgray", label=f"repairs {t}" if t else "repairs") for t in targets]
        if any(p.tuned for p in points):
            handles += [Line2D([], [], linestyle="", marker="o", markersize=8, markerfacecolor="none",
                               markeredgecolor="dimgray", label="default setting"),
                        Line2D([], [], linestyle="", marker="o", markersize=8, color="dimgray", label="tuned setting")]
        if references:
            handles.append(Line2D([], [], linestyle="", label=" "))
            handles += [Line2D([], [], linestyle="", marker=REFERENCE_MARKERS[i % len(REFERENCE_MARKERS)],
                               markersize=11 if i == 0 else 9, color="black", label=p.label)
                        for i, p in enumerate(references)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.set_xlabel("fine-tuning accuracy FA (%)  →  better")
        ax.set_ylabel("harmful score HS (%)  ↓  better")
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    return write_file_atomic(path, png.getvalue())


__all__ = ["Point", "hs_fa_plot"]
