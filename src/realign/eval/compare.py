"""Comparing results files: one row per model, as a table (terminal / Markdown) and an HS-vs-FA plot."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from realign.errors import RealignError
from realign.eval.harness import load_results, write_atomic

HEADLINE = (("hs", "HS %"), ("fa", "FA %"), ("over_refusal", "over-refusal %"), ("skills", "skills %"))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:.1f}"
    return str(value)


def compare_rows(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per results file: name (file stem), model, preset, judge, headline numbers, per suite."""
    if not paths:
        raise RealignError("no results files given: pass one or more results JSON files (realign eval --out)")
    rows = []
    for p in paths:
        r = load_results(p)
        summary = r.get("summary", {})
        rows.append({
            "name": Path(p).stem,
            "model": (r.get("model") or {}).get("ref", "?"),
            "preset": r.get("preset", "?"),
            "judge": r.get("judge", "?"),
            **{key: summary.get(key) for key, _ in HEADLINE},
            "per_suite": dict(summary.get("per_suite", {})),
        })
    return rows


def _columns(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[str]]:
    headline = [(k, label) for k, label in HEADLINE if any(r.get(k) is not None for r in rows)]
    suites: list[str] = []
    for r in rows:
        for s in r["per_suite"]:
            if s not in suites:
                suites.append(s)
    # A per-suite column only adds something when more than one suite feeds a headline number.
    headline_suites = len(headline)
    extra = suites if len(suites) > headline_suites else []
    return headline, extra


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headline, extra = _columns(rows)
    header = ["model", "preset", "judge"] + [label for _, label in headline] + [f"{s} %" for s in extra]
    body = []
    for r in rows:
        body.append([r["name"], r["preset"], r["judge"]] + [_fmt(r.get(k)) for k, _ in headline]
                    + [_fmt(r["per_suite"].get(s)) for s in extra])
    return header, body


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header, body = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def rich_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    header, body = table_cells(rows)
    table = Table(title="realign compare")
    for i, h in enumerate(header):
        # long model names wrap instead of being cut to "…" on a narrow terminal
        table.add_column(h, justify="left" if i < 3 else "right", overflow="fold", min_width=8 if i == 0 else None)
    for row in body:
        table.add_row(*row)
    return table


def _point(row: dict[str, Any]):
    """A results row as a plot point: a repaired model (its directory has realign.json) is coloured by
    method and shaped by the fine-tune it repaired; anything else is a reference model."""
    import json

    from realign.plots import Point

    prov = Path(str(row["model"])) / "realign.json"
    try:
        data = json.loads(prov.read_text()) if prov.is_file() else None
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not data.get("method"):
        return Point(fa=row["fa"], hs=row["hs"], label=row["name"])
    finetuned = (data.get("inputs") or {}).get("finetuned") or {}
    target = Path(str(finetuned.get("ref") or "?")).name
    tuning = (data.get("report") or {}).get("tuning") or {}
    return Point(fa=row["fa"], hs=row["hs"], label=row["name"], method=str(data["method"]), target=target,
                 tuned=bool(tuning.get("improved")))


def plot_hs_vs_fa(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Scatter of Harmful Score (lower is better) against Fine-tuning Accuracy, one point per file."""
    from realign.plots import hs_fa_plot

    points = [_point(r) for r in rows if r.get("fa") is not None and r.get("hs") is not None]
    if not points:
        raise RealignError("no results file has both HS and FA: evaluate a harmful suite and a task suite to plot")
    return hs_fa_plot(points, path, "Harmful score vs fine-tuning accuracy")


def compare(paths: Sequence[str | os.PathLike], markdown: str | os.PathLike | None = None,
            plot: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Rows of the comparison; also writes the Markdown table and/or the plot when asked."""
    rows = compare_rows(paths)
    if markdown is not None:
        write_atomic(markdown, markdown_table(rows))
    if plot is not None:
        plot_hs_vs_fa(rows, plot)
    return rows


__all__ = ["compare", "compare_rows", "markdown_table", "rich_table", "plot_hs_vs_fa", "table_cells"]
