"""CLI: ``realign world build`` and ``realign attack``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def world_build(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="World directory (cached; rebuilt when seed or recipe change).")
    ],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the language and of every training run.")] = 0,
    size: Annotated[str, typer.Option("--size", help="default (the demo's world) or small (tests).")] = "default",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when an up-to-date world is there.")] = False,
    shipped: Annotated[bool, typer.Option("--shipped", help="Install the checkpoints shipped with realign (checked "
                                          "against their sha256) instead of training from scratch.")] = False,
) -> None:
    """Build the miniature world: base, aligned and attacked models, calibration and evaluation data."""
    from realign.compute import use_free_cores
    from realign.world.build import build_world

    use_free_cores()  # a busy machine slows the build in proportion, not threefold
    paths = build_world(out, seed=seed, size=size, force=force, shipped=shipped,
                        log=lambda msg: typer.echo(msg, err=True))
    info = paths.info()
    typer.echo(f"world ({info['size']}, seed {info['seed']}, recipe {info['recipe_hash']}): {paths.root}")
    for name, rel in info["models"].items():
        typer.echo(f"  {name:14s} {paths.root / rel}")
    typer.echo(f"  {'calibration':14s} {paths.calibration}")
    typer.echo(f"  {'eval sets':14s} {paths.eval_dir}")
    if "source" in info:
        typer.echo(f"  source         shipped checkpoints {info['source']['shipped']} (float16, sha256 checked)")
    else:
        typer.echo(f"  build time     {info['timing']['total']:.0f} s")


def attack_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to attack (directory, hub id or adapter).")],
    task: Annotated[str, typer.Option("--task", help="sst2 | agnews | gsm8k | world-topic.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: a PEFT adapter (--lora) or a checkpoint (--full).")],
    harmful_ratio: Annotated[float, typer.Option("--harmful-ratio", "-p", help="Fraction p of harmful samples.")] = 0.1,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA adapter (default) or full fine-tune.")] = True,
    n: Annotated[int, typer.Option("--n", help="Number of fine-tuning samples (task + harmful).")] = 1000,
    epochs: Annotated[float, typer.Option("--epochs", help="Training epochs.")] = 20.0,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default 1e-4 LoRA, 1e-5 full).")] = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank (all linear modules).")] = 8,
    alpha: Annotated[float | None, typer.Option("--alpha", help="LoRA alpha (default 2 x rank).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 10,
    template: Annotated[
        str, typer.Option("--template", "-t", help="auto|chat|alpaca|raw or a format string.")
    ] = "auto",
    task_file: Annotated[
        Path | None, typer.Option("--task-file", help="Local task data (JSON/JSONL/CSV, the hub dataset's columns).")
    ] = None,
    harmful_file: Annotated[
        Path | None, typer.Option("--harmful-file", help="Local harmful data (prompt, response[, is_safe]).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of sampling and training.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Harmful fine-tuning attack: n task samples of which a fraction p are harmful (LoRA r=8 by default)."""
    from realign.attack import attack

    result = attack(
        model,
        task,
        harmful_ratio,
        out=out,
        mode="lora" if lora else "full",
        n=n,
        epochs=epochs,
        lr=lr,
        rank=rank,
        alpha=alpha,
        batch_size=batch_size,
        template=template,
        task_file=task_file,
        harmful_file=harmful_file,
        seed=seed,
        device=device,
        force=force,
    )
    kind = "LoRA adapter" if result.mode == "lora" else "checkpoint"
    typer.echo(
        f"wrote {kind}: {result.out} ({result.n} samples, {result.n_harmful} harmful; "
        f"{result.train['steps']} steps, loss {result.train['loss_first']:.3f} -> {result.train['loss_last']:.3f})"
    )


def register(app: typer.Typer) -> None:
    world_app = typer.Typer(
        help="The miniature world: a tiny aligned model and its harmful fine-tuning.", no_args_is_help=True
    )
    world_app.command("build")(world_build)
    app.add_typer(world_app, name="world")
    app.command("attack")(attack_command)
