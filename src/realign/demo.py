"""``realign demo``: the miniature world end to end — build (or reuse) the world, evaluate base,
aligned and attacked models, repair both attacks with every registered method (default
parameters), evaluate each result, and print the table the papers print.

Writes ``DIR/summary.json`` (one row per model or method: name, hs, fa, over_refusal, skills in
percent, parameters changed, seconds), ``DIR/summary.md`` and ``DIR/hs_vs_fa.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from realign.errors import RealignError

WORLD_SUITES = ["world-harmful", "world-task", "world-skills", "world-xstest"]
TARGETS = ("attacked-lora", "attacked-full")
REFERENCE_MODELS = ("base", "aligned", "attacked-lora", "attacked-full", "benign-lora")


@dataclass
class Row:
    name: str
    model: str
    method: str | None
    hs: float
    fa: float
    over_refusal: float
    skills: float | None
    params_changed_pct: float | None
    seconds: float
    setting: str = ""  # the tuned row's chosen setting (or the layer/c the refusal loop chose)


def _evaluate(path: Path, world: Path, device: str, limit: int | None, results_dir: Path, name: str):
    from realign.eval.harness import evaluate, save_results

    results = evaluate(str(path), suites=WORLD_SUITES, judge="keywords", preset="world", world=str(world),
                       limit=limit, device=device)
    save_results(results, results_dir / f"{name}.json")
    return results["summary"]


def _row(name: str, model: str, method: str | None, summary: dict[str, Any], changed: float | None,
         seconds: float, setting: str = "") -> Row:
    return Row(name=name, model=model, method=method, hs=summary.get("hs", float("nan")),
               fa=summary.get("fa", float("nan")), over_refusal=summary.get("over_refusal", float("nan")),
               skills=summary.get("skills"), params_changed_pct=changed, seconds=round(seconds, 2), setting=setting)


def _setting(report: dict[str, Any]) -> str:
    tuning = report.get("tuning")
    if not tuning or tuning.get("chosen") is None:
        return ""
    text = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuning["chosen"].items())
    return text if tuning.get("improved") else f"{text} (no gain: default)"


def run_demo(out: str | Path = "demo", seed: int = 0, size: str = "default", methods: list[str] | None = None,
             limit: int | None = None, device: str = "auto", rebuild: bool = False,
             world_dir: str | Path | None = None) -> list[Row]:
    """Run the whole demo; returns the rows (also written to ``out/summary.json``)."""
    from realign import api
    from realign.methods import available
    from realign.world.build import build_world

    chosen = methods or available()
    unknown = [m for m in chosen if m not in available()]
    if unknown:  # before the world is built, not after
        raise RealignError(f"unknown method {unknown[0]!r}; available: {', '.join(available())}")
    out = _demo_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    # The shipped checkpoints (hash-checked) make the table the same on every machine; --rebuild trains
    # the world from scratch on this one.
    world = Path(build_world(world_dir or out / "world", seed=seed, size=size, force=rebuild, shipped=not rebuild,
                             log=lambda msg: typer.echo(msg, err=True)).root)
    results_dir = out / "results"
    results_dir.mkdir(exist_ok=True)
    repaired_dir = out / "repaired"
    rows: list[Row] = []
    for name in REFERENCE_MODELS:
        start = time.perf_counter()
        summary = _evaluate(world / name, world, device, limit, results_dir, name)
        rows.append(_row(name, name, None, summary, None, time.perf_counter() - start))
        _print_row(rows[-1])
    common = {"aligned": world / "aligned", "base": world / "base", "harmful": world / "harmful",
              "calibration": world / "calibration.jsonl"}
    from realign.methods import get_method
    from realign.tuning import TuneOptions

    # the fine-tune's own task rows, as a provider has them; fallback=default keeps a row where no candidate repairs
    tuning = TuneOptions(task_data=world / "task.jsonl", fallback="default")
    for method in chosen:
        # Prepare once per method, apply to every fine-tune: the provider's workflow. Each fine-tune gets the
        # paper's default and, for methods with something to tune, the setting the tuning loop chooses for it.
        start = time.perf_counter()
        patch = api.prepare(method, device=device, **common)
        prepare_seconds = time.perf_counter() - start
        for target in TARGETS:
            for tuned in (False, True) if get_method(method).tunable() else (False,):
                label = f"{method}{' tuned' if tuned else ''} ({target})"
                dst = repaired_dir / f"{method}{'-tuned' if tuned else ''}-{target}"
                start = time.perf_counter()
                result = api.apply(patch, world / target, dst, device=device, force=True,
                                   tune=tuning if tuned else False, **common)
                seconds = prepare_seconds + time.perf_counter() - start
                totals = result.report.get("totals", {})
                changed = totals.get("percent_edited", totals.get("percent_changed"))
                summary = _evaluate(dst, world, device, limit, results_dir, dst.name)
                rows.append(_row(label, target, method, summary, changed, seconds, _setting(result.report)))
                _print_row(rows[-1])
                if result.output == "checkpoint":
                    # keep the report, drop the weights: the demo's disk footprint stays small
                    for f in dst.glob("*.safetensors"):
                        f.unlink()
    _write_summary(out, rows)
    return rows


DEMO_ENTRIES = {"world", "results", "repaired", "summary.json", "summary.md", "hs_vs_fa.png"}


def _demo_dir(out: str | Path) -> Path:
    """The demo adds to its directory: refuse the working directory, its ancestors, and a
    directory holding anything the demo did not write."""
    from realign.outputs import check_output

    target = check_output(out, kind="tree")
    if target.is_file():
        raise RealignError(f"--out {out} is a file: give a directory for the demo")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in DEMO_ENTRIES) if target.is_dir() else []
    if foreign:
        raise RealignError(f"--out {out} holds files the demo did not write ({', '.join(foreign[:3])}): "
                           "choose an empty or earlier demo directory")
    return target


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _print_row(row: Row) -> None:
    typer.echo(f"  {row.name:<34} HS {_fmt(row.hs):>5}  FA {_fmt(row.fa):>5}  over-refusal {_fmt(row.over_refusal):>5}"
               f"  skills {_fmt(row.skills):>5}  {row.setting}", err=True)


COLUMNS = ("model / method", "HS % ↓", "FA % ↑", "over-refusal % ↓", "skills % ↑", "params changed %", "time s",
           "tuned setting")


def _cells(r: Row) -> list[str]:
    return [r.name, _fmt(r.hs), _fmt(r.fa), _fmt(r.over_refusal), _fmt(r.skills), _fmt(r.params_changed_pct, 3),
            _fmt(r.seconds), r.setting]


def table_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 2) + "---|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_summary(out: Path, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    (out / "summary.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    (out / "summary.md").write_text(table_markdown(rows))
    table = Table(title="realign demo: miniature world")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col.startswith(("model", "tuned")) else "right")
    for r in rows:
        table.add_row(*_cells(r))
    Console(width=max(Console().width, 160)).print(table)  # one line per row, even in a log
    plot_rows(rows, out / "hs_vs_fa.png")
    typer.echo(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'hs_vs_fa.png'}")


def plot_rows(rows: list[Row], path: Path) -> None:
    from realign.plots import Point, hs_fa_plot

    points = [Point(fa=r.fa, hs=r.hs, label=r.name, method=r.method, target=r.model if r.method else "",
                    tuned=r.method is not None and r.name.startswith(f"{r.method} tuned "))
              for r in rows if r.fa == r.fa and r.hs == r.hs]  # NaN: a suite not evaluated
    hs_fa_plot(points, path, "Miniature world: repairs of the attacked models")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo directory (world cached in OUT/world).")] = Path(
        "demo"),
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
    size: Annotated[str, typer.Option(help="World size: default or small.")] = "default",
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods (default: all registered).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most N items per suite.")] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
    rebuild: Annotated[bool, typer.Option(help="Train the world from scratch on this machine instead of installing "
                                               "the shipped checkpoints (or reusing a cached world).")] = False,
    world: Annotated[Path | None, typer.Option(help="World directory to use or build (default: OUT/world).")] = None,
) -> None:
    """The miniature world end to end: world → attacks → every method → HS/FA table and plot."""
    from realign.compute import use_free_cores

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    use_free_cores()  # a busy machine slows the demo in proportion, not threefold
    run_demo(out, seed=seed, size=size, methods=chosen, limit=limit, device=device, rebuild=rebuild, world_dir=world)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


__all__ = ["run_demo", "register", "Row", "table_markdown"]
