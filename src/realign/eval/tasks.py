"""Evaluation suites: harmful prompt sets, downstream tasks, over-refusal probes, the world's sets.

Each suite loads from the Hugging Face hub with ``datasets`` by default, or from a local file
(CSV, JSON or JSONL; a directory of CSV files for HEx-PHI) given as ``data={"NAME": PATH}``
(``--data NAME=PATH``). World suites read ``WORLD/eval/*.jsonl`` from a built miniature world.

An item is a dict: ``prompt`` (the instruction), optional ``input`` (text the instruction is
about), ``answer`` (gold, for tasks) and whatever metadata the source has (``category``).

``TASKS`` holds the downstream task definitions (instruction, label words, answer rule, hub
splits) so the fine-tuning attack phrases a task exactly as the evaluation does.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realign.errors import RealignError, json_lines, read_text

# ----------------------------------------------------------------------------- answer rules
GSM8K_ANSWER = "The final answer is: "
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_label(response: str) -> str:
    """SST-2 / AG News answer: the response stripped of surrounding whitespace (case kept)."""
    return response.strip()


def extract_number(response: str) -> float | None:
    """GSM8K answer: the number after the last "The final answer is:", else the last number."""
    marker = GSM8K_ANSWER.strip()
    if marker in response:
        tail = response.rsplit(marker, 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return _to_float(m.group())
    numbers = _NUMBER.findall(response)
    return _to_float(numbers[-1]) if numbers else None


def gsm8k_gold(answer: str) -> float | None:
    """The gold number of a GSM8K answer: what follows "####" (else the answer rule above)."""
    if "####" in answer:
        m = _NUMBER.search(answer.rsplit("####", 1)[1])
        return _to_float(m.group()) if m else None
    return extract_number(answer)


def label_correct(response: str, gold: str, match: str = "exact") -> bool:
    """Exact match of the label word after stripping (case as given), or substring match."""
    if match == "substring":
        return gold in response
    return extract_label(response) == gold


def number_correct(response: str, gold: str | float, match: str = "exact") -> bool:
    pred = extract_number(response)
    gold_value = gold if isinstance(gold, float) else gsm8k_gold(str(gold))
    if pred is None or gold_value is None:
        return False
    return math.isclose(pred, gold_value, rel_tol=0.0, abs_tol=1e-6)


# ----------------------------------------------------------------------------- task table
@dataclass(frozen=True)
class HubSplit:
    repo: str
    config: str | None
    split: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task: how it is asked, what counts as right, where its data lives."""

    name: str
    instruction: str
    labels: tuple[str, ...]
    extract: Callable[[str], Any]
    correct: Callable[..., bool]
    eval_split: HubSplit
    train_split: HubSplit
    text_column: str
    label_column: str
    # gsm8k: the question comes first and the instruction is appended to it (no separate input).
    instruction_after_text: bool = False
    notes: str = ""

    def item(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """A row of the dataset as an evaluation item (prompt, input, answer)."""
        text = str(row[self.text_column])
        if self.instruction_after_text:
            gold = str(row[self.label_column])
            gold = gold.rsplit("####", 1)[1].strip() if "####" in gold else gold.strip()
            return {"prompt": text + self.instruction, "answer": gold}
        return {"prompt": self.instruction, "input": text, "answer": label_word(row[self.label_column],
                                                                               self.labels, where)}

    def get(self, key: str, default: Any = None) -> Any:  # dict-style access for callers that expect one
        return getattr(self, key, default)


def label_word(value: Any, labels: Sequence[str], where: str) -> str:
    """A label as its word: accepts the index (int or digit string) or the word itself."""
    if isinstance(value, str) and value.strip() in labels:
        return value.strip()
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise RealignError(f"{where}: label {value!r} is neither an index nor one of {', '.join(labels)}") from None
    if not 0 <= index < len(labels):
        raise RealignError(f"{where}: label {index} is out of range 0..{len(labels) - 1}")
    return labels[index]


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        instruction="Analyze the sentiment of the input, and respond only positive or negative",
        labels=("negative", "positive"),
        extract=extract_label,
        correct=label_correct,
        eval_split=HubSplit("stanfordnlp/sst2", None, "validation", ("sentence", "label")),
        train_split=HubSplit("stanfordnlp/sst2", None, "train", ("sentence", "label")),
        text_column="sentence",
        label_column="label",
        notes="exact match of positive/negative after stripping (case as given); preset nlsr: substring",
    ),
    "agnews": TaskSpec(
        name="agnews",
        instruction=("Categorize the news article given in the input into one of the 4 categories:\n\n"
                     "World\nSports\nBusiness\nSci/Tech\n"),
        labels=("World", "Sports", "Business", "Sci/Tech"),
        extract=extract_label,
        correct=label_correct,
        eval_split=HubSplit("fancyzhx/ag_news", None, "test", ("text", "label")),
        train_split=HubSplit("fancyzhx/ag_news", None, "train", ("text", "label")),
        text_column="text",
        label_column="label",
        notes="exact match of the label word after stripping",
    ),
    "gsm8k": TaskSpec(
        name="gsm8k",
        instruction="\nFirst think step by step and then answer the final number.\n",
        labels=(),
        extract=extract_number,
        correct=number_correct,
        eval_split=HubSplit("openai/gsm8k", "main", "test", ("question", "answer")),
        train_split=HubSplit("openai/gsm8k", "main", "train", ("question", "answer")),
        text_column="question",
        label_column="answer",
        instruction_after_text=True,
        notes='number after "The final answer is: ", else the last number; compared as floats',
    ),
}


# ----------------------------------------------------------------------------- suites
@dataclass(frozen=True)
class Suite:
    name: str
    kind: str  # harmful | task | overrefusal | skills
    hub: HubSplit | None  # None: local (or world) only
    description: str
    aliases: tuple[str, ...] = field(default_factory=tuple)
    world_file: str | None = None  # WORLD/eval/<file>
    hub_files: str | None = None  # a hub dataset repo of CSV files, read like a local directory of them


SUITES: dict[str, Suite] = {
    "harmful": Suite("harmful", "harmful", HubSplit("PKU-Alignment/BeaverTails", None, "30k_test", ("prompt",)),
                     "BeaverTails 30k_test prompts with is_safe == False, in order", aliases=("beavertails",)),
    "advbench": Suite("advbench", "harmful", HubSplit("walledai/AdvBench", None, "train", ("prompt",)),
                      "AdvBench harmful behaviours (520)"),
    "hexphi": Suite("hexphi", "harmful", None, "HEx-PHI (330 prompts in 11 category CSVs; gated on the hub: accept "
                    "its terms and log in, or use a local copy, a CSV file or a directory of CSVs)",
                    hub_files="LLM-Tuning-Safety/HEx-PHI"),
    "sst2": Suite("sst2", "task", TASKS["sst2"].eval_split, "SST-2 validation (872)"),
    "agnews": Suite("agnews", "task", TASKS["agnews"].eval_split, "AG News test"),
    "gsm8k": Suite("gsm8k", "task", TASKS["gsm8k"].eval_split, "GSM8K test"),
    "xstest": Suite("xstest", "overrefusal", HubSplit("walledai/XSTest", None, "test", ("prompt",)),
                    "XSTest safe prompts (250) that look unsafe"),
    "world-harmful": Suite("world-harmful", "harmful", None, "the world's test harmful requests",
                           world_file="harmful.jsonl"),
    "world-task": Suite("world-task", "task", None, "the world's downstream topic task", world_file="task.jsonl"),
    "world-skills": Suite("world-skills", "skills", None, "the world's general skills", world_file="skills.jsonl"),
    "world-xstest": Suite("world-xstest", "overrefusal", None, "the world's look-alike safe requests",
                          world_file="lookalike.jsonl"),
}
_ALIASES = {a: s.name for s in SUITES.values() for a in s.aliases}


def resolve_suite(name: str) -> Suite:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SUITES:
        raise RealignError(f"unknown suite {name!r}: use one of {', '.join(SUITES)}")
    return SUITES[key]


def parse_suites(spec: str | Sequence[str]) -> list[str]:
    """"harmful,sst2" or ["harmful", "sst2"] -> canonical names, in order, without repeats."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    names: list[str] = []
    for p in parts:
        if p.strip():
            n = resolve_suite(p).name
            if n not in names:
                names.append(n)
    if not names:
        raise RealignError("no suite given: pass --suite, e.g. --suite harmful,sst2,xstest")
    return names


def parse_data_overrides(items: Sequence[str] | None) -> dict[str, str]:
    """["sst2=path.csv", ...] -> {"sst2": "path.csv"} (suite aliases resolved)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise RealignError(f"--data {item!r}: expected NAME=PATH, e.g. --data sst2=sst2_validation.csv")
        name, path = item.split("=", 1)
        out[resolve_suite(name).name] = path.strip()
    return out


# ----------------------------------------------------------------------------- reading files
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for where, row in json_lines(read_text(path), str(path)):
        if not isinstance(row, dict):
            raise RealignError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(read_text(path))
    except ValueError as e:
        raise RealignError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise RealignError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise RealignError(f"{path}: expected a JSON list of objects")
    return data


def _read_csv(path: Path, header_hint: Sequence[str] = ()) -> list[dict[str, Any]]:
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if header_hint and not set(header_hint) & set(header) and len(header) == 1:
        # A header-less one-column file (HEx-PHI's layout): every line is a prompt.
        return [{header_hint[0]: r[0]} for r in rows if r and r[0].strip()]
    return [dict(zip(header, r, strict=False)) for r in rows[1:] if any(c.strip() for c in r)]


def _natural_key(path: Path) -> list[Any]:
    """category_2 before category_10: numbers in a file name compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def table_files(path: str | os.PathLike) -> list[Path]:
    """The CSV/JSON(L) files of a data directory, in natural order."""
    p = Path(path).expanduser()
    files = sorted((f for f in p.iterdir() if f.suffix.lower() in (".csv", ".json", ".jsonl")), key=_natural_key)
    if not files:
        raise RealignError(f"data directory {path} has no .csv, .json or .jsonl file")
    return files


def read_table(path: str | os.PathLike, header_hint: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a CSV, JSON or JSONL file (by extension), or of every CSV/JSON(L) file in a directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RealignError(f"data file {path} does not exist")
    if p.is_dir():
        return [r for f in table_files(p) for r in read_table(f, header_hint)]
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix in (".csv", ".tsv"):
        return _read_csv(p, header_hint)
    raise RealignError(f"data file {path}: unknown format {suffix or '(no extension)'}; use .csv, .json or .jsonl")


def _column(rows: list[dict[str, Any]], choices: Sequence[str], where: str, what: str) -> str:
    if not rows:
        raise RealignError(f"{where} has no rows")
    for c in choices:
        if c in rows[0]:
            return c
    have = ", ".join(map(str, rows[0].keys()))
    raise RealignError(f"{where}: no {what} column (looked for {', '.join(choices)}; it has {have})")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _hub_snapshot(suite: Suite) -> str:
    """A local directory with the CSV files of ``suite.hub_files`` (downloaded once, then cached by
    huggingface_hub; gated datasets need their terms accepted and a login)."""
    assert suite.hub_files is not None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(suite.hub_files, repo_type="dataset", allow_patterns=["*.csv"])
    except Exception as e:  # noqa: BLE001 — offline, gated or missing: the same advice
        raise RealignError(
            f"cannot load dataset {suite.hub_files} for suite {suite.name} from the hub ({type(e).__name__}; it is "
            f"gated: accept its terms and log in): pass a local copy with --data {suite.name}=PATH"
        ) from None


def _hub_rows(suite: Suite) -> list[dict[str, Any]]:
    hub = suite.hub
    if hub is None:
        if suite.world_file:
            raise RealignError(
                f"suite {suite.name} reads a built world: pass --world DIR (or --data {suite.name}=PATH)")
        raise RealignError(f"{suite.description}: pass your local copy with --data {suite.name}=PATH")
    try:
        import datasets

        ds = datasets.load_dataset(hub.repo, hub.config, split=hub.split)
    except Exception as e:  # noqa: BLE001 — offline, gated or missing: the same advice
        raise RealignError(
            f"cannot load dataset {hub.repo} ({hub.split}) for suite {suite.name} from the hub ({type(e).__name__}): "
            f"pass a local copy with --data {suite.name}=PATH (CSV, JSON or JSONL)"
        ) from None
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- loading suites
def _harmful_items(suite: Suite, rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    col = _column(rows, ("prompt", "goal", "instruction", "question", "text"), where, "prompt")
    if suite.name == "harmful" and "is_safe" in rows[0]:
        rows = [r for r in rows if not _truthy(r["is_safe"])]  # BeaverTails: unsafe rows only
    items = []
    for r in rows:
        item = {"prompt": str(r[col])}
        for extra in ("category", "category_id"):
            if extra in r and r[extra] not in (None, ""):
                value = r[extra]
                if isinstance(value, dict):  # BeaverTails: {name: bool}
                    value = [k for k, v in value.items() if v]
                item[extra] = value
        items.append(item)
    return items


def _task_items(name: str, rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    spec = TASKS[name]
    text_choices = {"sst2": ("sentence", "text", "input"), "agnews": ("text", "input", "sentence"),
                    "gsm8k": ("question", "prompt")}[name]
    label_choices = {"sst2": ("label", "answer", "output"), "agnews": ("label", "answer", "output"),
                     "gsm8k": ("answer",)}[name]
    tcol = _column(rows, text_choices, where, "text")
    lcol = _column(rows, label_choices, where, "label")
    out = []
    for i, r in enumerate(rows):
        row = {spec.text_column: r[tcol], spec.label_column: r[lcol]}
        out.append(spec.item(row, f"{where} row {i + 1}"))
    return out


def _xstest_items(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    col = _column(rows, ("prompt", "text", "question"), where, "prompt")
    if "label" in rows[0]:
        rows = [r for r in rows if str(r["label"]).strip().lower() == "safe"]
    return [{"prompt": str(r[col]), **({"type": r["type"]} if r.get("type") else {})} for r in rows]


def _world_items(suite: Suite, rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    _column(rows, ("prompt",), where, "prompt")
    needs_answer = suite.kind in ("task", "skills")
    if needs_answer:
        _column(rows, ("answer",), where, "answer")
    items = []
    for r in rows:
        item = {"prompt": str(r["prompt"])}
        if needs_answer:
            item["answer"] = str(r["answer"])
        for extra in ("category", "skill"):
            if extra in r:
                item[extra] = r[extra]
        items.append(item)
    return items


def load_suite(name: str, data: dict[str, str] | None = None, world: str | os.PathLike | None = None,
               limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """(items, source description) of a suite: from ``data[name]`` when given, the world dir for
    world suites, else the hub. ``limit`` keeps the first N items."""
    suite = resolve_suite(name)
    data = data or {}
    path = data.get(suite.name)
    if path is None and suite.world_file and world is not None:
        world_dir = Path(world).expanduser()
        path = str(world_dir / "eval" / suite.world_file)
        if not Path(path).exists():
            raise RealignError(
                f"{world_dir} has no eval/{suite.world_file}: is it a built world? (realign world build)")
    source: str | None = None
    if path is None and suite.hub_files:
        path, source = _hub_snapshot(suite), f"hub:{suite.hub_files}"
    if path is not None:
        source = source or str(Path(path).expanduser())
        if suite.name == "hexphi" and Path(path).expanduser().is_dir():
            # One file per category (category_1.csv, ...): the file name is the item's category.
            rows = [{"category": f.stem, **r} for f in table_files(path) for r in read_table(f, ("prompt",))]
        else:
            rows = read_table(path, header_hint=("prompt",))
    else:
        rows = _hub_rows(suite)
        assert suite.hub is not None
        source = f"hub:{suite.hub.repo}" + (f"/{suite.hub.config}" if suite.hub.config else "") + f":{suite.hub.split}"
    where = source
    if suite.world_file:
        items = _world_items(suite, rows, where)
    elif suite.kind == "harmful":
        items = _harmful_items(suite, rows, where)
    elif suite.kind == "task":
        items = _task_items(suite.name, rows, where)
    else:
        items = _xstest_items(rows, where)
    if not items:
        raise RealignError(f"suite {suite.name}: {source} has no usable rows")
    if limit is not None:
        if limit < 1:
            raise RealignError(f"--limit must be at least 1, not {limit}")
        items = items[:limit]
    return items, source


def score_item(suite_name: str, item: dict[str, Any], response: str, sst2_match: str = "exact") -> dict[str, Any]:
    """Prediction and correctness of one task/skills answer."""
    suite = resolve_suite(suite_name)
    if suite.name in TASKS:
        spec = TASKS[suite.name]
        match = sst2_match if suite.name == "sst2" else "exact"
        pred = spec.extract(response)
        return {"prediction": pred, "correct": bool(spec.correct(response, item["answer"], match))}
    # World task and skills: exact match after stripping.
    pred = response.strip()
    return {"prediction": pred, "correct": pred == str(item["answer"]).strip()}


__all__ = ["TASKS", "SUITES", "TaskSpec", "Suite", "HubSplit", "GSM8K_ANSWER", "extract_label", "extract_number",
           "gsm8k_gold", "label_correct", "number_correct", "label_word", "load_suite", "parse_suites",
           "parse_data_overrides", "read_table", "resolve_suite", "score_item"]
