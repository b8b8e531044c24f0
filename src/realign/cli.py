"""The ``realign`` command line: a thin layer over ``realign.api`` and friends."""

from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from realign import __version__
from realign.errors import RealignError

console = Console(stderr=False)
err_console = Console(stderr=True)


class _Group(TyperGroup):
    """Turns user errors into one line on stderr and exit code 2 (never a traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RealignError as e:
            click.echo(f"error: {e}", err=True)
            raise SystemExit(2) from None
        except FileNotFoundError as e:
            click.echo(f"error: {e.filename or e}: no such file or directory", err=True)
            raise SystemExit(2) from None
        except OSError as e:
            click.echo(f"error: {e.strerror or e} ({e.filename or ''})", err=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            raise SystemExit(130) from None


app = typer.Typer(
    cls=_Group,
    help="realign: give a fine-tuned LLM its safety back, without training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Options shared by repair/prepare/apply.
Aligned = Annotated[str | None, typer.Option("--aligned", "-a", help="The safety-aligned model (dir or hub id).")]
Base = Annotated[str | None, typer.Option("--base", "-b", help="The model before safety alignment.")]
Finetuned = Annotated[
    str, typer.Option("--finetuned", "-f", help="The fine-tune to repair (checkpoint or LoRA adapter).")
]
Calib = Annotated[Path | None, typer.Option("--calibration", "-c", help="Calibration JSONL (see README).")]
Harmful = Annotated[str | None, typer.Option("--harmful", help="A harmful model (base fine-tuned on harmful data).")]
Unaligned = Annotated[str | None, typer.Option("--unaligned", help="An unaligned model (aligned + harmful fine-tune).")]
Template = Annotated[
    str, typer.Option("--template", "-t", help="auto|chat|alpaca|raw or a format string with {prompt}.")
]
Sets = Annotated[list[str] | None, typer.Option("--set", "-s", help="Method parameter KEY=VALUE (repeatable).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda for running models.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 for running models.")]
Pickle = Annotated[bool, typer.Option("--allow-pickle", help="Read pickle (.bin/.pt) weights: they can run code.")]
Output = Annotated[str, typer.Option("--output", help="auto|checkpoint|adapter.")]
ShardSize = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")]
FtBase = Annotated[str | None, typer.Option("--finetuned-base", help="Base of a LoRA fine-tune, if not in its config.")]
Tune = Annotated[bool, typer.Option("--tune", help="Choose the method's setting for this fine-tune from forward passes "
                                    "over held-out rows (no generation); see the README's tuning section.")]
TaskData = Annotated[Path | None, typer.Option("--task-data", help="--tune: JSONL of the fine-tune's own "
                                               "prompt/response rows, for the utility score.")]
TuneBudget = Annotated[int, typer.Option("--tune-budget", help="--tune: most candidate settings tried.")]
TuneTolerance = Annotated[float, typer.Option("--tune-tolerance", help="--tune: most relative drop of the utility "
                                              "score accepted.")]
TuneFallback = Annotated[str, typer.Option("--tune-fallback", help="--tune: none (write nothing when no candidate "
                                           "repairs) or default (write the default setting).")]


def _tune_options(tune: bool, task_data: Path | None, budget: int, tolerance: float, fallback: str):
    from realign.tuning import TuneOptions

    if not tune:
        defaults = TuneOptions()
        given = [flag for flag, value, default in (("--task-data", task_data, None), ("--tune-budget", budget,
                 defaults.budget), ("--tune-tolerance", tolerance, defaults.tolerance), ("--tune-fallback", fallback,
                 defaults.fallback)) if value != default]
        if given:
            raise RealignError(f"{given[0]} only applies with --tune: add --tune")
        return False
    options = TuneOptions(budget=budget, tolerance=tolerance, task_data=task_data, fallback=fallback)
    options.check()
    return options


def _say(message: str) -> None:
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)


def _parse_sets(sets: list[str] | None, **shortcuts: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in sets or []:
        if "=" not in item:
            raise RealignError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    for key, value in shortcuts.items():
        if value is not None:
            out[key] = str(value)
    return out


def _show_result(result) -> None:
    totals = result.report.get("totals", {})
    table = Table(title=f"wrote {result.output}: {result.out}", show_header=False)
    for key, value in totals.items():
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("seconds", f"{result.seconds:.2f}")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"report: {result.out / 'realign.json'}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model directory, hub id, or LoRA adapter directory.")],
    base: Annotated[str | None, typer.Option("--base", help="Base of an adapter, if not in its config.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    allow_pickle: Pickle = False,
) -> None:
    """Family, layers, heads, head_dim, parameters, dtypes, shards and adapter info of a model."""
    from realign.sources import load_model

    info = load_model(model, base=base, allow_pickle=allow_pickle).describe()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{model}", show_header=False)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = "\n".join(map(str, value))
        table.add_row(key, str(value))
    console.print(table)


@app.command("methods")
def list_methods() -> None:
    """List the repair methods and their parameters."""
    from realign.methods import available, get_method
    from realign.methods.base import param_help

    for name in available():
        m = get_method(name)
        console.print(f"[bold]{name}[/bold] — {m.title}" + (f"  ({m.paper})" if m.paper else ""))
        needs = ", ".join(["aligned", "finetuned", *m.needs])
        uses = f"; uses when given: {', '.join(m.uses)}" if m.uses else ""
        console.print(f"  needs: {needs}{uses}; output: {m.natural_output}")
        for pname, default, stage, text in param_help(m.Params):
            console.print(f"  --set {pname}={default}  \\[{stage}] {text}", highlight=False)


@app.command()
def repair(
    method: Annotated[str, typer.Argument(help="Method name (see `realign methods`).")],
    finetuned: Finetuned,
    out: Out,
    aligned: Aligned = None,
    base: Base = None,
    calibration: Calib = None,
    harmful: Harmful = None,
    unaligned: Unaligned = None,
    template: Template = "auto",
    sets: Sets = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Shortcut for --set alpha=...")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="Shortcut for --set mode=...")] = None,
    output: Output = "auto",
    finetuned_base: FtBase = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_shard_size: ShardSize = "5GB",
    allow_pickle: Pickle = False,
    force: Force = False,
    tune: Tune = False,
    task_data: TaskData = None,
    tune_budget: TuneBudget = 24,
    tune_tolerance: TuneTolerance = 0.1,
    tune_fallback: TuneFallback = "none",
) -> None:
    """Repair a fine-tune in one go (prepare + apply)."""
    from realign import api

    options = _tune_options(tune, task_data, tune_budget, tune_tolerance, tune_fallback)
    result = api.repair(method, aligned, finetuned, out, base=base, calibration=calibration, harmful=harmful,
                        unaligned=unaligned, params=_parse_sets(sets, alpha=alpha, mode=mode), output=output,
                        finetuned_base=finetuned_base, template=template, device=device, dtype=dtype,
                        max_shard_size=max_shard_size, allow_pickle=allow_pickle, force=force, tune=options,
                        log=_say)
    _show_result(result)


@app.command()
def prepare(
    method: Annotated[str, typer.Argument(help="Method name (see `realign methods`).")],
    out: Out,
    aligned: Aligned = None,
    base: Base = None,
    calibration: Calib = None,
    harmful: Harmful = None,
    unaligned: Unaligned = None,
    template: Template = "auto",
    sets: Sets = None,
    extend: Annotated[
        Path | None, typer.Option("--extend", help="A patch to extend (methods that support it).")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: Pickle = False,
    force: Force = False,
) -> None:
    """Do a method's aligned-side work once and save it as a patch."""
    from realign import api

    params = _parse_sets(sets)
    if extend is not None:
        params["extend"] = str(extend)
    patch = api.prepare(method, aligned, out, base=base, calibration=calibration, harmful=harmful,
                        unaligned=unaligned, params=params, template=template, device=device, dtype=dtype,
                        allow_pickle=allow_pickle, force=force)
    console.print(f"wrote patch ({patch.method}): {Path(out).resolve()}")
    for note in patch.report.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")


@app.command()
def apply(
    patch: Annotated[Path, typer.Argument(help="A patch made by `realign prepare`.")],
    finetuned: Finetuned,
    out: Out,
    sets: Sets = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Shortcut for --set alpha=...")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="Shortcut for --set mode=...")] = None,
    output: Output = "auto",
    finetuned_base: FtBase = None,
    aligned: Aligned = None,
    base: Base = None,
    calibration: Calib = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_shard_size: ShardSize = "5GB",
    allow_pickle: Pickle = False,
    force: Force = False,
    tune: Tune = False,
    task_data: TaskData = None,
    tune_budget: TuneBudget = 24,
    tune_tolerance: TuneTolerance = 0.1,
    tune_fallback: TuneFallback = "none",
) -> None:
    """Apply a prepared patch to a fine-tune (checkpoint or LoRA adapter)."""
    from realign import api

    options = _tune_options(tune, task_data, tune_budget, tune_tolerance, tune_fallback)
    result = api.apply(patch, finetuned, out, params=_parse_sets(sets, alpha=alpha, mode=mode), output=output,
                       finetuned_base=finetuned_base, aligned=aligned, base=base, calibration=calibration,
                       device=device, dtype=dtype, max_shard_size=max_shard_size, allow_pickle=allow_pickle,
                       force=force, tune=options, log=_say)
    _show_result(result)


# Commands that live with their feature register themselves here.
_FEATURE_COMMANDS = ("realign.eval.commands", "realign.world.commands", "realign.demo")


def _register_features() -> None:
    for module in _FEATURE_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # feature not present in this build
            raise
        mod.register(app)


_register_features()


def _terminate(signum: int, _frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so every temporary output directory is removed on the way out.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except RealignError as e:  # errors raised outside a command (e.g. while registering)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
