"""CLI commands of the evaluation: ``realign eval``, ``realign judge``, ``realign compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from realign.errors import RealignError

# Judge options shared by eval and judge (None: the judge's own default).
JudgeModel = Annotated[str | None, typer.Option("--judge-model", help="classifier/guard: the judge model (dir or hub "
                                                "id); openai: the judge model's name, e.g. gpt-4-0613; refusal: a "
                                                "model file of scripts/train_refusal_model.py.")]
JudgeLayout = Annotated[str | None, typer.Option("--judge-layout", help="classifier: auto (read from the model), "
                                                 "beaver-dam, harmbench or harmbench-card.")]
JudgeUrl = Annotated[str | None, typer.Option("--judge-url", help="openai: base URL of an OpenAI-compatible API, e.g. "
                                              "http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL, else OpenAI's).")]
JudgeKeyEnv = Annotated[str | None, typer.Option("--judge-api-key-env", help="openai: the environment variable that "
                                                 "holds the API key (default OPENAI_API_KEY).")]
JudgeConcurrency = Annotated[int | None, typer.Option("--judge-concurrency", help="openai: most requests in flight "
                                                      "(default 8).")]
JudgeRetries = Annotated[int | None, typer.Option("--judge-retries", help="openai: retries of a request that got a "
                                                  "429, a 5xx or a timeout (default 5).")]
JudgeTimeout = Annotated[float | None, typer.Option("--judge-timeout", help="openai: seconds per request "
                                                    "(default 120).")]
JudgeCache = Annotated[bool, typer.Option("--judge-cache/--no-judge-cache", help="openai: reuse and keep answers in "
                                          "$REALIGN_CACHE/judge_openai.jsonl.")]
AllowUnparsed = Annotated[bool, typer.Option("--judge-allow-unparsed", help="Keep judge answers without a verdict as "
                                             "error verdicts (counted in no rate) instead of failing.")]


def _judge_options(layout: str | None, url: str | None, key_env: str | None, concurrency: int | None,
                   retries: int | None, timeout: float | None, cache: bool) -> dict[str, Any]:
    return {"layout": layout, "url": url, "api_key_env": key_env, "concurrency": concurrency, "retries": retries,
            "timeout": timeout, "cache": None if cache else False}


def _print_results(results: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("suite")
    table.add_column("n", justify="right")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, entry in results["suites"].items():
        metrics = dict(entry["metrics"])
        for other, values in metrics.pop("also", {}).items():  # judges reported alongside
            metrics.update({f"{k} ({other})": v for k, v in values.items()})
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                table.add_row(name, str(entry["n"]), key, f"{value:.1f}" if isinstance(value, float) else str(value))
    Console().print(table)


def eval_command(
    model: Annotated[str, typer.Argument(help="Model directory, hub id, or LoRA adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results JSON to write (atomically).")],
    suite: Annotated[str | None, typer.Option("--suite", "-s", help="Comma-separated suites: harmful, advbench, "
                                              "hexphi, sst2, agnews, gsm8k, xstest, world-harmful, world-task, "
                                              "world-skills, world-xstest (default: the preset's, else harmful).")]
    = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="A LoRA adapter to put on MODEL.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", "-j", help="keywords|refusal|refusal-rules|classifier|guard|"
                                              "openai; add + for HS+ (default: the preset's judge, else keywords).")]
    = None,
    judge_model: JudgeModel = None,
    judge_layout: JudgeLayout = None,
    judge_url: JudgeUrl = None,
    judge_api_key_env: JudgeKeyEnv = None,
    judge_concurrency: JudgeConcurrency = None,
    judge_retries: JudgeRetries = None,
    judge_timeout: JudgeTimeout = None,
    judge_cache: JudgeCache = True,
    judge_allow_unparsed: AllowUnparsed = False,
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="booster|hexphi|vaccine|nlsr|world (default: "
                                               "booster's lengths and sizes; a named preset also brings its judge).")
                      ] = None,
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
    from realign.eval.harness import UnparsedAnswers, evaluate, save_results
    from realign.eval.tasks import parse_data_overrides
    from realign.outputs import check_output, input_paths

    overrides = parse_data_overrides(data)
    check_output(out, input_paths(model, adapter, world, judge_model, *overrides.values()), kind="file")
    options = _judge_options(judge_layout, judge_url, judge_api_key_env, judge_concurrency, judge_retries,
                             judge_timeout, judge_cache)
    try:
        results = evaluate(model, adapter=adapter, suites=suite, judge=judge, preset=preset, limit=limit,
                           data=overrides, world=world, device=device, dtype=dtype,
                           batch_size=batch_size, backend=backend, template=template, judge_model=judge_model,
                           allow_pickle=allow_pickle, judge_options=options, allow_unparsed=judge_allow_unparsed)
    except UnparsedAnswers as e:
        # The generations are kept: the file has the failed answers as error verdicts, to re-judge.
        path = save_results(e.results, out)
        raise RealignError(f"{e}; wrote {path} with them as error verdicts: realign judge --results {path} "
                           "re-asks only those") from None
    path = save_results(results, out)
    _print_results(results, f"{model} ({results['preset']}, judge {results['judge']})")
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
    out: Annotated[Path, typer.Option("--out", "-o", help="Verdicts JSONL (with --input) or results JSON (with "
                                      "--results) to write (atomically).")],
    input: Annotated[Path | None, typer.Option("--input", "-i", help="JSONL with prompt and response per line.")]
    = None,
    results: Annotated[Path | None, typer.Option("--results", "-r", help="A results JSON of realign eval: re-judge "
                                                 "its responses into a new results file.")] = None,
    judge: Annotated[str, typer.Option("--judge", "-j", help="keywords|refusal|refusal-rules|classifier|guard|"
                                       "openai; add + for HS+.")] = "keywords",
    judge_model: JudgeModel = None,
    judge_layout: JudgeLayout = None,
    judge_url: JudgeUrl = None,
    judge_api_key_env: JudgeKeyEnv = None,
    judge_concurrency: JudgeConcurrency = None,
    judge_retries: JudgeRetries = None,
    judge_timeout: JudgeTimeout = None,
    judge_cache: JudgeCache = True,
    judge_allow_unparsed: AllowUnparsed = False,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (model judges).")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (model judges).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs judged together (model judges).")] = 16,
) -> None:
    """Re-judge stored responses without regenerating: a JSONL of pairs, or a results file."""
    from realign.eval.harness import UnparsedAnswers, load_results, rejudge, save_results, write_atomic
    from realign.eval.judges import get_judge, harmful_rate, parse_judge_name
    from realign.outputs import check_output, input_paths

    if (input is None) == (results is None):
        raise RealignError("pass --input PAIRS.jsonl or --results RESULTS.json (one of them)")
    parse_judge_name(judge)  # a typo or a bad file should not cost a judge model load
    check_output(out, input_paths(input, results, judge_model), kind="file")
    options = _judge_options(judge_layout, judge_url, judge_api_key_env, judge_concurrency, judge_retries,
                             judge_timeout, judge_cache)
    if results is not None:
        old = load_results(results)
        try:
            new = rejudge(old, judge, judge_model=judge_model, device=device, dtype=dtype, batch_size=batch_size,
                          judge_options=options, allow_unparsed=judge_allow_unparsed, source=str(results))
        except UnparsedAnswers as e:
            path = save_results(e.results, out)
            raise RealignError(f"{e}; wrote {path} with them as error verdicts (a rerun re-asks only those)") from None
        path = save_results(new, out)
        _print_results(new, f"{results} re-judged ({new['judge']}; was {old.get('judge', '?')})")
        typer.echo(f"wrote {path}")
        return
    assert input is not None
    rows = _read_responses(input)
    j = get_judge(judge, judge_model=judge_model, device=device, dtype=dtype, batch_size=batch_size, **options)
    verdicts = j.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    lines = []
    for row, v in zip(rows, verdicts, strict=True):
        merged = {k: row[k] for k in row if k not in v}  # keep the input's other fields (ids, categories)
        merged.update(v)
        lines.append(json.dumps(merged, ensure_ascii=False))
    write_atomic(out, "\n".join(lines) + "\n")
    unparsed = sum(v["harmful"] is None for v in verdicts)
    if unparsed and not judge_allow_unparsed:
        raise RealignError(f"{unparsed} of {len(verdicts)} judge answers gave no verdict; wrote {out} with them as "
                           "error verdicts (a rerun re-asks only those; --judge-allow-unparsed accepts them)")
    note = f", {unparsed} without a verdict" if unparsed else ""
    typer.echo(f"harmful: {harmful_rate(verdicts):.1f}% of {len(verdicts)} ({j.spec}{note}); "
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
