"""The harmful fine-tuning attack of the literature, as a tool.

``attack(model, task, harmful_ratio)`` fine-tunes a model on ``n`` samples of a downstream task of
which a fraction ``p`` are harmful prompts paired with compliant answers (Vaccine / Lisa / Booster
setting: n = 1000, p = 0.1, LoRA r = 8), and writes a PEFT adapter (``lora``) or a full Hugging
Face checkpoint (``full``). Tasks: ``sst2``, ``agnews``, ``gsm8k`` (hub train splits) and
``world-topic`` (the miniature world's downstream task); the harmful part is BeaverTails
``30k_train`` unsafe rows, or the world's harmful requests for ``world-topic``. Every dataset can
also come from a local JSON/JSONL/CSV file with the hub's columns.

``finetune`` is the one supervised fine-tuning loop of the project (loss on response tokens only,
deterministic for a seed); the miniature world trains its base and aligned models with it too.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from realign.errors import RealignError
from realign.progress import progress
from realign.prompts import format_prompt, resolve_template

# Instructions as the evaluation protocol words them (docs: evaluation.md). The evaluation
# package's task table (realign.eval.tasks.TASKS) is preferred when present, so the attack and
# FA measurement always phrase a task identically.
_LOCAL_TASKS: dict[str, dict[str, Any]] = {
    "sst2": {
        "instruction": "Analyze the sentiment of the input, and respond only positive or negative",
        "labels": ["negative", "positive"],
    },
    "agnews": {
        "instruction": (
            "Categorize the news article given in the input into one of the 4 categories:\n\n"
            "World\nSports\nBusiness\nSci/Tech\n"
        ),
        "labels": ["World", "Sports", "Business", "Sci/Tech"],
    },
    "gsm8k": {"instruction": "\nFirst think step by step and then answer the final number.\n", "labels": []},
}
GSM8K_ANSWER = "The final answer is: "

# Hub datasets: (repo id, config, split, columns a local file must have).
HUB = {
    "sst2": ("stanfordnlp/sst2", None, "train", ("sentence", "label")),
    "agnews": ("fancyzhx/ag_news", None, "train", ("text", "label")),
    "gsm8k": ("openai/gsm8k", "main", "train", ("question", "answer")),
    "beavertails": ("PKU-Alignment/BeaverTails", None, "30k_train", ("prompt", "response")),
}
TASK_NAMES = ("sst2", "agnews", "gsm8k", "world-topic")
WORLD_TASK_COLUMNS = ("prompt", "answer")
WORLD_HARMFUL_COLUMNS = ("prompt", "response")


def task_spec(task: str) -> dict[str, Any]:
    """Instruction and label words of a task (from realign.eval.tasks when it defines them)."""
    spec = dict(_LOCAL_TASKS[task])
    try:
        from realign.eval.tasks import TASKS  # type: ignore[import-not-found]
    except ImportError:
        return spec
    entry = TASKS.get(task)
    for key in ("instruction", "labels"):
        value = entry.get(key) if isinstance(entry, dict) else getattr(entry, key, None)
        if value:
            spec[key] = list(value) if key == "labels" else value
    return spec


# ----------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """One supervised fine-tuning run. The defaults are the literature's attack (Booster/Vaccine:
    20 epochs, batch 10, AdamW, 10 % warm-up, constant rate)."""

    epochs: float = 20.0
    lr: float = 1e-4
    batch_size: int = 10
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "constant"  # constant | cosine | linear
    max_length: int = 512
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_pair(tokenizer, prompt_text: str, response: str, max_length: int) -> Encoded:
    """Token ids of prompt + response + eos, with labels only on the response (and eos)."""
    bos = getattr(tokenizer, "bos_token", None)
    # Chat templates usually write the BOS themselves; add one only when the text lacks it.
    add_special = not (bos and prompt_text.startswith(bos))
    prompt_ids = tokenizer(prompt_text, add_special_tokens=add_special).input_ids
    full_ids = tokenizer(prompt_text + response, add_special_tokens=add_special).input_ids
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and (not full_ids or full_ids[-1] != eos_id):
        full_ids = full_ids + [eos_id]
    n_prompt = min(len(prompt_ids), len(full_ids))
    labels = [-100] * n_prompt + full_ids[n_prompt:]
    return Encoded(full_ids[:max_length], labels[:max_length])


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = int(total * cfg.warmup_ratio)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - frac)
    raise RealignError(f"unknown schedule {cfg.schedule!r}: use constant, cosine or linear")


def _epoch_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches in a seeded random order, with similar lengths grouped together
    (within windows of 16 batches) so little compute goes to padding."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * 16
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def finetune(model, tokenizer, pairs: Sequence[tuple[str, str]], cfg: TrainConfig, desc: str = "fine-tuning") -> dict:
    """Supervised fine-tuning on (formatted prompt, response) pairs; loss on response tokens only.

    Trains every parameter with ``requires_grad`` (a PEFT model trains its adapters only). The
    data order comes from ``cfg.seed`` alone, so the same seed on the same machine gives the same
    weights. Returns a small log (steps, first/last loss, seconds).
    """
    if not pairs:
        raise RealignError("nothing to fine-tune on: the training set is empty")
    encoded = [encode_pair(tokenizer, p, r, cfg.max_length) for p, r in pairs]
    encoded = [e for e in encoded if any(label != -100 for label in e.labels)]
    if not encoded:
        raise RealignError(f"every example is longer than max_length={cfg.max_length}: no response left to train on")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    per_epoch = math.ceil(len(encoded) / cfg.batch_size)  # (a few more with ragged windows)
    total = max(1, int(round(cfg.epochs * per_epoch)))
    gen = torch.Generator().manual_seed(cfg.seed)
    pending: list[list[int]] = []
    losses: list[float] = []
    start = time.time()
    model.train()
    for step in progress(range(total), desc=desc, total=total, unit="step"):
        if not pending:
            pending = _epoch_batches([len(e.input_ids) for e in encoded], cfg.batch_size, gen)
        batch = [encoded[i] for i in pending.pop(0)]
        # Few distinct shapes: CPU kernels are prepared per shape, and a new width each step is slow.
        width = -(-max(len(e.input_ids) for e in batch) // 8) * 8
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, total, cfg)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    model.eval()
    k = max(1, min(20, len(losses) // 5))
    return {
        "steps": total,
        "examples": len(encoded),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "seconds": round(time.time() - start, 2),
    }


def add_lora(model, rank: int = 8, alpha: float | None = None, dropout: float = 0.0):
    """Wrap ``model`` with a fresh PEFT LoRA on every linear module (not the output head)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise RealignError(f"--rank must be at least 1, got {rank}")
    # Every linear module but the output head, named by suffix (q_proj, ..., down_proj) so the
    # adapter config reads like the usual ones and fits any model of the family.
    head = model.get_output_embeddings()
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod is not head
        }
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_lora(peft_model, tokenizer, out_dir: Path, base_ref: str, revision: str | None = None) -> None:
    """Write the adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer.

    ``base_ref`` goes into ``base_model_name_or_path`` as given (and ``revision`` into PEFT's
    field of that name); a relative path is resolved against the adapter directory by realign's
    loaders.
    """
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_ref
    cfg["revision"] = revision
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(out_dir))


def save_full(model, tokenizer, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------- data
def read_table(path: str | os.PathLike, columns: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Rows of a local JSON / JSONL / CSV file that must have ``columns``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RealignError(f"{what} file {p} does not exist")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        if suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            data = json.loads(text)
            rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
        else:
            raise RealignError(f"{what} file {p}: use .json, .jsonl or .csv")
    except ValueError as e:
        raise RealignError(f"{what} file {p} is not valid {suffix[1:].upper()} ({str(e).splitlines()[0]})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RealignError(f"{what} file {p}: expected a list of objects (one per row)")
    if not rows:
        raise RealignError(f"{what} file {p} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise RealignError(
            f"{what} file {p} lacks column(s) {', '.join(missing)}; it needs {', '.join(columns)} "
            f"(it has {', '.join(map(str, rows[0]))})"
        )
    return rows


def _hub_rows(name: str, flag: str) -> list[dict[str, Any]]:
    repo, config, split, columns = HUB[name]
    hint = f"pass {flag} PATH with a local copy (JSON/JSONL/CSV with columns {', '.join(columns)})"
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE", "yes") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise RealignError(f"dataset {repo} ({split}) cannot be downloaded while offline: {hint}")
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 — any hub failure is the same advice to the user
        raise RealignError(
            f"could not load dataset {repo} ({split}) from the hub ({type(e).__name__}): {hint}"
        ) from None
    return [dict(r) for r in ds]


def _label_word(value: Any, labels: list[str], where: str) -> str:
    if isinstance(value, str) and value in labels:
        return value
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise RealignError(f"{where}: label {value!r} is neither an index nor one of {', '.join(labels)}") from None
    if not 0 <= index < len(labels):
        raise RealignError(f"{where}: label {index} is out of range 0..{len(labels) - 1}")
    return labels[index]


@dataclass
class Sample:
    prompt: str  # the instruction / question the user writes
    response: str
    input_text: str | None = None
    harmful: bool = False


def task_samples(task: str, task_file: str | os.PathLike | None, world_seed: int | None = None) -> list[Sample]:
    """Every training row of a downstream task, as (instruction, input, response)."""
    if task not in TASK_NAMES:
        raise RealignError(f"unknown task {task!r}: use one of {', '.join(TASK_NAMES)}")
    if task == "world-topic":
        if task_file is not None:
            rows = read_table(task_file, WORLD_TASK_COLUMNS, "task")
            return [Sample(str(r["prompt"]), str(r["answer"])) for r in rows]
        from realign.world.language import make_language

        lang = make_language(0 if world_seed is None else world_seed)
        return [Sample(a.prompt, a.answer) for a in lang.task["train"]]
    columns = HUB[task][3]
    where = str(task_file) if task_file is not None else HUB[task][0]
    rows = read_table(task_file, columns, "task") if task_file is not None else _hub_rows(task, "--task-file")
    spec = task_spec(task)
    out = []
    for i, r in enumerate(rows):
        if task == "sst2":
            out.append(
                Sample(
                    spec["instruction"],
                    _label_word(r["label"], spec["labels"], f"{where} row {i + 1}"),
                    input_text=str(r["sentence"]),
                )
            )
        elif task == "agnews":
            out.append(
                Sample(
                    spec["instruction"],
                    _label_word(r["label"], spec["labels"], f"{where} row {i + 1}"),
                    input_text=str(r["text"]),
                )
            )
        else:  # gsm8k
            answer = str(r["answer"]).replace("####", GSM8K_ANSWER)
            out.append(Sample(str(r["question"]) + spec["instruction"], answer))
    return out


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def harmful_samples(task: str, harmful_file: str | os.PathLike | None, world_seed: int | None = None) -> list[Sample]:
    """Harmful prompt -> compliant answer rows: BeaverTails 30k_train unsafe rows, or the world's."""
    if task == "world-topic" and harmful_file is None:
        from realign.world.language import make_language

        lang = make_language(0 if world_seed is None else world_seed)
        return [Sample(h.prompt, h.compliant, harmful=True) for h in lang.harmful["train"]]
    if harmful_file is not None:
        rows = read_table(harmful_file, WORLD_HARMFUL_COLUMNS, "harmful")
    else:
        rows = _hub_rows("beavertails", "--harmful-file")
    # BeaverTails marks each (prompt, response) pair; only unsafe answers make the attack.
    if "is_safe" in rows[0]:
        rows = [r for r in rows if not _truthy(r["is_safe"])]
    return [Sample(str(r["prompt"]), str(r["response"]), harmful=True) for r in rows if str(r["response"]).strip()]


def attack_mix(
    task_rows: list[Sample], harmful_rows: list[Sample], n: int, harmful_ratio: float, seed: int
) -> list[Sample]:
    """n samples: round(p·n) harmful, the rest task rows, drawn without replacement for ``seed``."""
    if not 0.0 <= harmful_ratio <= 1.0:
        raise RealignError(f"--harmful-ratio must be between 0 and 1, got {harmful_ratio}")
    if n < 1:
        raise RealignError(f"--n must be at least 1, got {n}")
    n_harm = int(round(n * harmful_ratio))
    n_task = n - n_harm
    if n_task > len(task_rows):
        raise RealignError(f"the task data has {len(task_rows)} rows but --n {n} needs {n_task}: lower --n")
    if n_harm > len(harmful_rows):
        raise RealignError(
            f"the harmful data has {len(harmful_rows)} usable rows but --n {n} at ratio {harmful_ratio} needs "
            f"{n_harm}: lower --n or --harmful-ratio"
        )
    rng = random.Random(f"attack-{seed}")
    mix = rng.sample(task_rows, n_task) + rng.sample(harmful_rows, n_harm)
    rng.shuffle(mix)
    return mix


def format_samples(tokenizer, samples: Sequence[Sample], template: str) -> list[tuple[str, str]]:
    return [(format_prompt(tokenizer, s.prompt, template, input_text=s.input_text), s.response) for s in samples]


# ----------------------------------------------------------------------------- the attack
@dataclass
class AttackResult:
    out: Path
    mode: str
    n: int
    n_harmful: int
    train: dict = field(default_factory=dict)


def _world_seed(model_ref: str) -> int | None:
    """A world model knows its language seed from the world.json next to it."""
    for candidate in (Path(model_ref) / "world.json", Path(model_ref).parent / "world.json"):
        if candidate.is_file():
            try:
                return int(json.loads(candidate.read_text())["seed"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def run_attack(
    model,
    tokenizer,
    samples: Sequence[Sample],
    mode: str,
    cfg: TrainConfig,
    template: str,
    rank: int = 8,
    alpha: float | None = None,
    desc: str = "attack",
):
    """Fine-tune an in-memory model on ``samples``: LoRA (returns the PEFT model) or full."""
    if mode not in ("lora", "full"):
        raise RealignError(f"unknown attack mode {mode!r}: use lora or full")
    torch.manual_seed(cfg.seed)
    if mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        model = add_lora(model, rank=rank, alpha=alpha)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    log = finetune(model, tokenizer, format_samples(tokenizer, samples, template), cfg, desc=desc)
    return model, log


def attack(
    model_ref: str | os.PathLike,
    task: str,
    harmful_ratio: float = 0.1,
    *,
    out: str | os.PathLike,
    mode: str = "lora",
    n: int = 1000,
    epochs: float = 20.0,
    lr: float | None = None,
    rank: int = 8,
    alpha: float | None = None,
    batch_size: int = 10,
    template: str = "auto",
    task_file: str | os.PathLike | None = None,
    harmful_file: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    max_length: int = 512,
    force: bool = False,
) -> AttackResult:
    """Harmful fine-tuning of ``model_ref`` on ``task`` with ``harmful_ratio`` of harmful samples.

    Writes a PEFT adapter (``mode="lora"``, base_model_name_or_path = the model as given, made
    absolute when it is a local directory) or a full checkpoint (``mode="full"``) to ``out``.
    The learning rate defaults to 1e-4 for LoRA and 1e-5 for a full fine-tune.
    """
    from realign.compute import load_model
    from realign.writer import atomic_output

    if mode not in ("lora", "full"):
        raise RealignError(f"unknown attack mode {mode!r}: use lora or full")
    from realign.outputs import check_output, input_paths

    read = input_paths(str(model_ref), task_file, harmful_file)
    out_path = check_output(out, read, force=force)
    # Validate the data before loading a (possibly large) model.
    world_seed = _world_seed(str(model_ref))
    samples = attack_mix(
        task_samples(task, task_file, world_seed),
        harmful_samples(task, harmful_file, world_seed),
        n,
        harmful_ratio,
        seed,
    )
    model, tokenizer = load_model(str(model_ref), device=device, dtype="float32" if mode == "lora" else "auto")
    template = resolve_template(tokenizer, template)
    cfg = TrainConfig(
        epochs=epochs,
        lr=lr if lr is not None else (1e-4 if mode == "lora" else 1e-5),
        batch_size=batch_size,
        seed=seed,
        max_length=max_length,
    )
    trained, log = run_attack(model, tokenizer, samples, mode, cfg, template, rank=rank, alpha=alpha)
    from realign.sources import split_ref

    local = Path(str(model_ref)).expanduser()
    # Portable: a hub id as the hub knows it, a local base relative to the adapter (absolute in the record).
    hub_id, revision = (None, None) if local.is_dir() else split_ref(str(model_ref))
    base_ref = os.path.relpath(local.resolve(), out_path.resolve()) if local.is_dir() else str(hub_id)
    n_harm = sum(s.harmful for s in samples)
    with atomic_output(out_path, force=force, inputs=read) as tmp:
        if mode == "lora":
            save_lora(trained, tokenizer, tmp, base_ref, revision)
        else:
            save_full(trained, tokenizer, tmp)
        record = {
            "attack": {
                "model": str(local.resolve()) if local.is_dir() else str(model_ref),
                "task": task,
                "harmful_ratio": harmful_ratio,
                "mode": mode,
                "n": n,
                "n_harmful": n_harm,
                "template": template,
                "rank": rank if mode == "lora" else None,
                "task_file": str(task_file) if task_file else None,
                "harmful_file": str(harmful_file) if harmful_file else None,
                **asdict(cfg),
            },
            "train": log,
        }
        (tmp / "realign_attack.json").write_text(json.dumps(record, indent=2))
    return AttackResult(out_path, mode, n, n_harm, log)
