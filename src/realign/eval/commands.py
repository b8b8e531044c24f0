"""CLI commands of the evaluation: ``realign eval``, ``realign judge``, ``realign compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from realign.errors import RealignError


def eval_command(
    model: Annotated[str, typer.Argument(help="Model directory, hub id, or LoRA adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results JSON to write (atomically).")],
    suite: Annotated[str, typer.Option("--suite", "-s", help="Comma-separated suites: harmful, advbench, hexphi, "
                                       "sst2, agnews, gsm8k, xstest, world-harmful, world-task, world-skills, "
                                       "world-xstest.")] = "harmful",
    adapter: Annotated[str | None, typer.Option("--adapter", help="A LoRA adapter to put on MODEL.")] = None,
    judge: Annotated[str, typer.Option("--judge", "-j", help="keywords|refusal|classifier|guard; add + for HS+.")]
    = "keywords",
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Model of a classifier/guard judge.")]
    = None,
    preset: Annotated[str, typer.Option("--preset", "-p", help="booster|vaccine|nlsr|world.")] = "booster",
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="Keep the first N items of each suite.")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="Local copy of a suite's data: NAME=PATH "
                                                   "(CSV, JSON or JSONL; repeatable).")] = None,
    world: Annotated[str | None, typer.Option("--world", help="A built miniature world (for world-* suites).")]
    = None,
    template: Annotated[str, typer.Option("--template", "-t", help="auto|chat|alpaca|raw or a format string "
                                          "with {prompt}.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together.")] = 64,
    backend: Annotated[str, typer.Option("--backend", help="hf|vllm.")] = "hf",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read pickle weights (can run code).")]
    = False,
) -> None:
    """Evaluate a model: Harmful Score, fine-tuning accuracy, over-refusal; writes a results JSON."""
    from rich.console import Console
    from rich.table import Table

    from realign.eval.harness import evaluate, save_results
    from realign.eval.tasks import parse_data_overrides
    from realign.outputs import check_output, input_paths

    overrides = parse_data_overrides(data)
    check_output(out, input_paths(model, adapter, world, judge_model, *overrides.values()), kind="file")
    results = evaluate(model, adapter=adapter, suites=suite, judge=judge, preset=preset, limit=limit,
                       data=overrides, world=world, device=device, dtype=dtype,
                       batch_size=batch_size, backend=backend, template=template, judge_model=judge_model,
                       allow_pickle=allow_pickle)
    path = save_results(results, out)
    table = Table(title=f"{model} ({results['preset']}, judge {results['judge']})")
    table.add_column("suite")
    table.add_column("n", justify="right")
    table.add_column("metric")
    table.add_column("%", justify="right")
    for name, entry in results["suites"].items():
        for key, value in entry["metrics"].items():
            if isinstance(value, (int, float)):
                table.add_row(name, str(entry["n"]), key, f"{value:.1f}")
    Console().print(table)
    typer.echo(f"wrote {path}")


def _read_responses(path: Path) -> list[dict]:
    if not path.exists():
        raise RealignError(f"input file {path} does not exist")
    from realign.errors import json_lines, read_text

    rows = []
    for where, row in json_lines(read_text(path), str(path)):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("response"), str):
            raise RealignError(f"{where}: expected an object with string fields prompt and response")
        rows.append(row)
    if not rows:
        raise RealignError(f"{path} has no responses (one JSON object per line with prompt and response)")
    return rows


def judge_command(
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL with prompt and response per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Verdicts JSONL to write (atomically).")],
    judge: Annotated[str, typer.Option("--judge", "-j", help="keywords|refusal|classifier|guard; add + for HS+.")]
    = "keywords",
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Model of a classifier/guard judge.")]
    = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (model judges).")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (model judges).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs judged together (model judges).")] = 16,
) -> None:
    """Re-judge stored responses without regenerating; prints the harmful rate."""
    from realign.eval.harness import write_atomic
    from realign.eval.judges import get_judge, harmful_rate, parse_judge_name
    from realign.outputs import check_output, input_paths

    parse_judge_name(judge)  # a typo or a bad file should not cost a judge model load
    check_output(out, input_paths(input, judge_model), kind="file")
    rows = _read_responses(input)
    j = get_judge(judge, judge_model=judge_model, device=device, dtype=dtype, batch_size=batch_size)
    verdicts = j.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    lines = []
    for row, v in zip(rows, verdicts, strict=True):
        merged = {k: row[k] for k in row if k not in v}  # keep the input's other fields (ids, categories)
        merged.update(v)
        lines.append(json.dumps(merged, ensure_ascii=False))
    write_atomic(out, "\n".join(lines) + "\n")
    typer.echo(f"harmful: {harmful_rate(verdicts):.1f}% of {len(verdicts)} ({j.spec}); "
               f"wrote {out}")


def compare_command(
    results: Annotated[list[Path], typer.Argument(help="Results JSON files (realign eval --out).")],
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the table as Markdown.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write an HS-vs-FA scatter plot (PNG).")] = None,
) -> None:
    """Compare results files: a table and, optionally, Markdown and an HS-vs-FA plot."""
    from rich.console import Console

    from realign.eval.compare import compare, rich_table
    from realign.outputs import check_output, input_paths

    for flag, path in (("--markdown", markdown), ("--plot", plot)):
        if path is not None:
            check_output(path, input_paths(*results), kind="file", flag=flag)
    if markdown is not None and plot is not None and Path(markdown).resolve() == Path(plot).resolve():
        raise RealignError("--markdown and --plot name the same file: give two paths")
    rows = compare(results, markdown=markdown, plot=plot)
    Console().print(rich_table(rows))
    if markdown is not None:
        typer.echo(f"wrote {markdown}")
    if plot is not None:
        typer.echo(f"wrote {plot}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("judge")(judge_command)
    app.command("compare")(compare_command)
