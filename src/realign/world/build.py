"""Build (or reuse) a miniature world: models, calibration data and evaluation sets on disk.

Layout of ``OUT``::

    base/ aligned/ attacked-full/ harmful/     Hugging Face checkpoints (LlamaForCausalLM)
    attacked-lora/ benign-lora/                PEFT LoRA adapters over ../aligned
    calibration.jsonl                          project calibration format (calibration split)
    eval/harmful.jsonl task.jsonl skills.jsonl lookalike.jsonl   (test split)
    world.json                                 seed, recipe hash, sizes, timing

The adapters name their base as ``"../aligned"`` (``base_model_name_or_path``): a path relative to
the adapter directory, which realign's loaders resolve against it, so a world directory can be
moved or copied as a whole. (Plain PEFT resolves it against the working directory instead.)

A world is cached: building again with the same seed and recipe returns the existing one; a
changed seed or recipe rebuilds it. Everything is written in a temporary directory next to
``OUT`` and renamed at the end.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from realign.calibration import Example, save_calibration
from realign.errors import RealignError
from realign.world import train as T
from realign.world.language import SPLITS, Language, make_language
from realign.world.tokenizer import train_tokenizer
from realign.writer import remove_stale_partials

MODELS = ("base", "aligned", "attacked-lora", "attacked-full", "benign-lora", "harmful")
# Built checkpoints shipped with the package (scripts/ship_world.py): float16 weights and a manifest
# of sha256 hashes. Seeded CPU training is not bit-stable across processors, so a world built on
# another machine differs; the shipped one is the same everywhere.
SHIPPED = Path(__file__).parent / "shipped"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
ADAPTERS = ("attacked-lora", "benign-lora")
ADAPTER_BASE = "../aligned"
EVAL_SETS = ("harmful", "task", "skills", "lookalike")


@dataclass(frozen=True)
class WorldPaths:
    root: Path

    def model(self, name: str) -> Path:
        if name not in MODELS:
            raise RealignError(f"the world has no model {name!r}; it has {', '.join(MODELS)}")
        return self.root / name

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def attacked_lora(self) -> Path:
        return self.root / "attacked-lora"

    @property
    def attacked_full(self) -> Path:
        return self.root / "attacked-full"

    @property
    def benign_lora(self) -> Path:
        return self.root / "benign-lora"

    @property
    def harmful(self) -> Path:
        return self.root / "harmful"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.jsonl"

    @property
    def task_data(self) -> Path:
        """The attack's clean task rows (prompt/response): the examples a provider has of a customer's
        fine-tune, for ``--tune --task-data`` (not the test set)."""
        return self.root / "task.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_set(self, name: str) -> Path:
        return self.eval_dir / f"{name}.jsonl"

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    def info(self) -> dict:
        return json.loads(self.world_json.read_text())

    def complete(self) -> bool:
        files = [self.world_json, self.calibration, *(self.eval_set(n) for n in EVAL_SETS)]
        files += [self.model(m) / ("adapter_config.json" if m in ADAPTERS else "config.json") for m in MODELS]
        return all(f.is_file() for f in files)


def recipe_for(size: str) -> T.Recipe:
    if size not in T.RECIPES:
        raise RealignError(f"unknown world size {size!r}: use {' or '.join(T.RECIPES)}")
    return T.RECIPES[size]


def _cached(paths: WorldPaths, seed: int, size: str, digest: str) -> bool:
    if not paths.world_json.is_file():
        return False
    try:
        info = paths.info()
    except ValueError:
        return False
    return (info.get("seed") == seed and info.get("size") == size and info.get("recipe_hash") == digest
            and paths.complete())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def calibration_examples(lang: Language) -> list[Example]:
    """Calibration split only: harmful rows with a refusal and a compliant answer, benign rows
    (how-tos, look-alikes, skills) with their answer."""
    rows = [Example(prompt=h.prompt, kind="harmful", safe_response=h.refusal, unsafe_response=h.compliant,
                    category=h.category) for h in lang.harmful["calibration"]]
    for group in (lang.howto, lang.lookalike, lang.skills):
        rows += [Example(prompt=a.prompt, kind="benign", response=a.answer) for a in group["calibration"]]
    return rows


def write_task_data(lang: Language, recipe, seed: int, root: Path) -> None:
    rows = [s for s in T.attack_data(lang, recipe, recipe.attack_ratio, seed) if not s.harmful]
    _write_jsonl(root / "task.jsonl", [{"prompt": s.prompt, "response": s.response} for s in rows])


def write_data(lang: Language, root: Path) -> None:
    save_calibration(calibration_examples(lang), root / "calibration.jsonl")
    ev = root / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    _write_jsonl(ev / "harmful.jsonl", [{"prompt": h.prompt, "category": h.category} for h in lang.harmful["test"]])
    _write_jsonl(ev / "task.jsonl", [{"prompt": a.prompt, "answer": a.answer} for a in lang.task["test"]])
    _write_jsonl(ev / "skills.jsonl",
                 [{"prompt": a.prompt, "answer": a.answer, "skill": a.label} for a in lang.skills["test"]])
    _write_jsonl(ev / "lookalike.jsonl", [{"prompt": a.prompt} for a in lang.lookalike["test"]])


def _save_full(model, tokenizer, path: Path) -> None:
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def _save_adapter(peft_model, tokenizer, path: Path) -> None:
    from realign.attack import save_lora

    save_lora(peft_model, tokenizer, path, ADAPTER_BASE)


def shipped_world(size: str, seed: int) -> Path | None:
    """The shipped checkpoints of this world, when the package has them."""
    path = SHIPPED / f"{size}-seed{seed}"
    return path if (path / "manifest.json").is_file() else None


def install_shipped(src: Path, out: Path, digest: str, say: Callable[[str], None]) -> bool:
    """Write the shipped world ``src`` to ``out`` (float32, the layout ``build_world`` writes), after
    checking every file against the manifest. False when it was made with another recipe or code
    version than this one (the world is then built from scratch)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    manifest = json.loads((src / "manifest.json").read_text())
    if manifest.get("recipe_hash") != digest:
        say(f"world: the shipped checkpoints were made with recipe {manifest.get('recipe_hash')}, this code makes "
            f"{digest}: building from scratch")
        return False
    for rel, expected in manifest["files"].items():
        path = src / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise RealignError(f"shipped world file {rel} is missing or does not match its sha256: reinstall realign, "
                               "or build the world from scratch with `realign world build`")
    _prepare_target(out, True)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    try:
        for name in MODELS:
            (tmp / name).mkdir()
            weights = "adapter_model.safetensors" if name in ADAPTERS else "model.safetensors"
            tensors = load_file(str(src / name / weights))
            save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp / name / weights),
                      metadata={"format": "pt"})
            for f in ("config.json", "generation_config.json", "adapter_config.json"):
                if (src / name / f).is_file():
                    shutil.copy(src / name / f, tmp / name / f)
            for f in TOKENIZER_FILES:
                if (src / "tokenizer" / f).is_file():
                    shutil.copy(src / "tokenizer" / f, tmp / name / f)
        for rel in ("calibration.jsonl", "task.jsonl", "eval"):
            (shutil.copytree if (src / rel).is_dir() else shutil.copy)(src / rel, tmp / rel)
        info = json.loads((src / "world.json").read_text())
        info["source"] = {"shipped": src.name, "weights_dtype": manifest.get("weights_dtype"),
                          "hashes": "checked", "built": {k: info.get(k) for k in ("timing", "versions")}}
        (tmp / "world.json").write_text(json.dumps(info, indent=2))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size_mb = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 1e6
    say(f"world: installed the shipped checkpoints ({src.name}, {size_mb:.0f} MB, float16, every sha256 checked) "
        f"in {out}")
    return True


def _swap_in(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def _prepare_target(out: Path, force: bool) -> None:
    """A world directory may be replaced (it is a cache); anything else is left alone, --force or not
    (and never the current directory or one of its ancestors)."""
    from realign.outputs import check_output

    check_output(out, force=True)


def build_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: str = "default",
    force: bool = False,
    log: Callable[[str], None] | None = None,
    shipped: bool = False,
) -> WorldPaths:
    """Build the world in ``out_dir`` (or return it when already built with this seed and recipe).
    ``shipped``: install the checkpoints shipped with the package instead of training, when there
    are some for this size and seed and they match this code's recipe."""
    say = log or (lambda _msg: None)
    recipe = recipe_for(size)
    out = Path(out_dir).expanduser().resolve()
    paths = WorldPaths(out)
    lang = make_language(seed, recipe.language)
    digest = recipe.digest(lang)
    if not force and _cached(paths, seed, size, digest):
        say(f"world {out} is up to date (seed {seed}, {size}, recipe {digest}): reusing it")
        if not paths.task_data.is_file():  # worlds built before the task rows were written
            write_task_data(lang, recipe, seed, out)
        return paths
    source = shipped_world(size, seed) if shipped else None
    if source is not None and install_shipped(source, out, digest, say):
        return paths
    _prepare_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    start = time.time()
    timing: dict[str, float] = {}
    logs: dict[str, dict] = {}

    def stage(name: str) -> Callable[[], None]:
        t0 = time.time()
        say(f"world: {name} ...")

        def done() -> None:
            timing[name] = round(time.time() - t0, 2)

        return done

    try:
        done = stage("tokenizer and data")
        tokenizer = train_tokenizer(lang.all_text(), recipe.vocab_size)
        write_data(lang, tmp)
        write_task_data(lang, recipe, seed, tmp)
        done()

        done = stage("base")
        base, logs["base"] = T.train_base(lang, recipe, tokenizer, seed)
        _save_full(base, tokenizer, tmp / "base")
        done()

        done = stage("harmful")
        harmful = copy.deepcopy(base)
        logs["harmful"] = T.train_harmful(harmful, lang, recipe, tokenizer, seed)
        _save_full(harmful, tokenizer, tmp / "harmful")
        del harmful
        done()

        done = stage("aligned")
        aligned = base  # trained in place: the base is saved already
        logs["aligned"] = T.train_aligned(aligned, lang, recipe, tokenizer, seed)
        _save_full(aligned, tokenizer, tmp / "aligned")
        done()

        for name, mode, ratio in (("attacked-lora", "lora", recipe.attack_ratio),
                                  ("attacked-full", "full", recipe.attack_ratio),
                                  ("benign-lora", "lora", 0.0)):
            done = stage(name)
            trained, logs[name] = T.train_attack(copy.deepcopy(aligned), lang, recipe, tokenizer, seed, mode,
                                                 ratio, desc=f"world: {name}")
            if mode == "lora":
                _save_adapter(trained, tokenizer, tmp / name)
            else:
                _save_full(trained, tokenizer, tmp / name)
            del trained
            done()

        info = {
            "seed": seed,
            "size": size,
            "recipe_hash": digest,
            "language_digest": lang.digest,
            "recipe": asdict(recipe),
            "models": {m: m for m in MODELS},
            "adapter_base": ADAPTER_BASE,
            "parameters": sum(p.numel() for p in aligned.parameters()),
            "architecture": {"layers": recipe.layers, "heads": recipe.heads, "hidden_size": recipe.hidden_size,
                             "intermediate_size": recipe.intermediate_size, "vocab_size": len(tokenizer)},
            "sizes": {group: {s: len(getattr(lang, group)[s]) for s in SPLITS}
                      for group in ("harmful", "howto", "lookalike", "skills", "task")},
            "timing": {**timing, "total": round(time.time() - start, 2)},
            "train": logs,
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "threads": torch.get_num_threads()},
        }
        (tmp / "world.json").write_text(json.dumps(info, indent=2))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"world: built {out} in {time.time() - start:.0f} s")
    return paths
