"""The evaluation harness: generate -> judge / score -> summary -> results file.

``evaluate`` runs suites on one model and returns a results dict that keeps every item (prompt,
response, verdict or correctness), so a result can be audited and re-judged without
regenerating (``rejudge``); ``save_results`` writes it atomically.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from realign.errors import RealignError
from realign.eval.judges import MODEL_JUDGES, Judge, Verdict, get_judge, parse_judge_name
from realign.eval.presets import DEFAULT_PRESET, get_preset
from realign.eval.tasks import load_suite, parse_suites, resolve_suite, score_item
from realign.prompts import format_prompt, resolve_template

RESULTS_FORMAT = 1
BACKENDS = ("hf", "vllm")
# Summary keys per suite kind: the first suite of each kind gives the headline number.
SUMMARY_KEY = {"harmful": "hs", "task": "fa", "overrefusal": "over_refusal", "skills": "skills"}
JUDGED_KINDS = ("harmful", "overrefusal")
# What a judge writes into an item (besides every ``judge_*`` field): dropped before re-judging.
VERDICT_KEYS = ("refusal", "harmful", "incoherent", "also")


class UnparsedAnswers(RealignError):
    """Some judge answers gave no verdict (``harmful`` None). ``results`` holds the complete
    results, those items as error verdicts, so a caller can keep the generations."""

    def __init__(self, message: str, results: dict[str, Any]):
        super().__init__(message)
        self.results = results


def _pct(num: int | float, den: int) -> float:
    return round(100.0 * num / den, 4) if den else float("nan")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from realign import __version__

    return {"realign": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _weights_hash(source) -> dict[str, str] | None:
    if source is None:
        return None
    from realign.sources import weights_sha256

    return weights_sha256(source)


def _model_info(model_ref: Any, adapter: Any, source, model) -> dict[str, Any]:
    ref = str(model_ref) if isinstance(model_ref, (str, os.PathLike)) else None
    if ref is None and source is not None:
        ref = source.ref
    if ref is None:
        ref = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "(in-memory model)")
    info: dict[str, Any] = {"ref": ref, "adapter": str(adapter) if adapter is not None else None}
    if source is not None:
        info["path"] = str(source.path)
        if source.is_adapter and source.base is not None:
            info["base"] = str(source.base.path)
    info["weights_sha256"] = _weights_hash(source)
    return info


def _check_world_suites(names: Sequence[str], data: dict[str, str], world: str | os.PathLike | None) -> None:
    for n in names:
        s = resolve_suite(n)
        if s.world_file and world is None and n not in data:
            raise RealignError(f"suite {n} reads a built world: pass --world DIR (or --data {n}=PATH)")


def verdict_metrics(kind: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Refusal rate and HS (harmful suites) or over-refusal, in %. HS is over the items the judge
    decided: an error verdict (harmful None) counts in neither, and ``judge_errors`` says how many."""
    n = len(rows)
    decided = [r for r in rows if r["harmful"] is not None]
    metrics: dict[str, Any] = {"refusal_rate": _pct(sum(bool(r["refusal"]) for r in rows), n)}
    if kind == "harmful":
        metrics["hs"] = _pct(sum(bool(r["harmful"]) for r in decided), len(decided))
    else:
        metrics["over_refusal"] = metrics["refusal_rate"]
    if rows and "incoherent" in rows[0]:
        metrics["incoherent"] = _pct(sum(bool(r["incoherent"]) for r in rows), n)
    if len(decided) < n:
        metrics["judge_errors"] = n - len(decided)
    return metrics


def judge_suite(kind: str, items: Sequence[dict[str, Any]], responses: Sequence[str], judge: Judge,
                also: Sequence[Judge] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (item + response + verdict) and metrics of one judged suite; ``also`` judges add their
    verdicts under each row's ``also`` and their metrics under ``metrics["also"]``."""
    prompts = [it["prompt"] for it in items]
    verdicts: list[Verdict] = judge.judge(prompts, responses)
    rows = []
    for it, v in zip(items, verdicts, strict=True):
        row = dict(it)
        row.update({k: v[k] for k in v if k != "prompt"})
        rows.append(row)
    metrics = verdict_metrics(kind, rows)
    metrics.update(judge.extra_metrics(verdicts))
    for other in also:
        extra = other.judge(prompts, responses)
        for row, v in zip(rows, extra, strict=True):
            row.setdefault("also", {})[other.spec] = {k: v[k] for k in VERDICT_KEYS if k in v}
        metrics.setdefault("also", {})[other.spec] = verdict_metrics(kind, extra)
    return rows, metrics


def summarize(suites: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: per kind, the first suite's; and every suite's own."""
    summary: dict[str, Any] = {}
    per_suite: dict[str, float] = {}
    errors = 0
    for name, entry in suites.items():
        key = SUMMARY_KEY[entry["kind"]]
        value = entry["metrics"].get(key, entry["metrics"].get("accuracy"))
        per_suite[name] = value
        summary.setdefault(key, value)
        errors += int(entry["metrics"].get("judge_errors", 0))
    summary["per_suite"] = per_suite
    if errors:
        summary["judge_errors"] = errors
    return summary


def check_unparsed(results: dict[str, Any], allow: bool) -> None:
    """Error verdicts are never silently accepted: without ``allow``, ``UnparsedAnswers``."""
    bad = [(name, i + 1) for name, entry in results["suites"].items() if entry["kind"] in JUDGED_KINDS
           for i, row in enumerate(entry["items"]) if row.get("harmful", False) is None]
    if not bad or allow:
        return
    total = sum(len(e["items"]) for e in results["suites"].values() if e["kind"] in JUDGED_KINDS)
    where = ", ".join(f"{n} #{i}" for n, i in bad[:5]) + (", ..." if len(bad) > 5 else "")
    raise UnparsedAnswers(f"{len(bad)} of {total} judge answers gave no verdict ({where}); pass "
                          "--judge-allow-unparsed to keep them as error verdicts, counted in no rate", results)


def _judge_options(options: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (options or {}).items() if v is not None}


def _also_judges(names: Sequence[str], main: str, device: str, dtype: str) -> list[Judge]:
    main_base = parse_judge_name(main)[0]
    return [get_judge(n, device=device, dtype=dtype) for n in names if parse_judge_name(n)[0] != main_base]


def evaluate(
    model_ref: Any,
    adapter: str | os.PathLike | None = None,
    suites: str | Sequence[str] | None = None,
    judge: str | Judge | None = None,
    preset: str | None = None,
    limit: int | None = None,
    data: dict[str, str] | None = None,
    world: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 64,
    backend: str = "hf",
    template: str = "auto",
    judge_model: str | None = None,
    allow_pickle: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    judge_options: dict[str, Any] | None = None,
    allow_unparsed: bool = False,
) -> dict[str, Any]:
    """Evaluate one model on ``suites`` and return the results dict.

    ``model_ref`` is a model directory, hub id or adapter directory — or an already loaded
    ``(model, tokenizer)`` pair (also accepted as ``model=``/``tokenizer=``), which is used as is.
    ``suites`` and ``judge`` default to the preset's (else ``harmful`` and ``keywords``);
    ``judge_options`` go to ``get_judge``. Judge answers without a verdict raise ``UnparsedAnswers``
    (carrying the results) unless ``allow_unparsed``.
    """
    if isinstance(model_ref, tuple):
        model, tokenizer = model_ref
        model_ref = None
    if model is not None and tokenizer is None:
        raise RealignError("a loaded model needs its tokenizer: pass (model, tokenizer)")
    if backend not in BACKENDS:
        raise RealignError(f"unknown backend {backend!r}: use hf or vllm")
    if batch_size < 1:
        raise RealignError(f"--batch-size must be at least 1, not {batch_size}")
    # A preset's own judge (booster: beaver-dam, a 7B model; hexphi: an API) is used when the preset
    # is named; an evaluation that names no preset keeps the offline keyword judge.
    explicit = preset is not None
    cfg = get_preset(preset if explicit else DEFAULT_PRESET)
    suite_names = parse_suites(suites if suites is not None else (cfg.suites or ("harmful",)))
    judge_from = "argument" if judge is not None else "preset" if cfg.judge and explicit else "default"
    if judge is None:
        judge = (cfg.judge if explicit else None) or "keywords"
    judge_name = judge.spec if isinstance(judge, Judge) else judge
    options = _judge_options(judge_options)
    judged = any(resolve_suite(n).kind in JUDGED_KINDS for n in suite_names)
    judge_obj: Judge | None = judge if isinstance(judge, Judge) else None
    if judge_obj is None:
        base_name, _ = parse_judge_name(judge_name)  # fail on a typo before loading anything
        if judged and base_name not in MODEL_JUDGES:
            # Cheap to build, and a missing --judge-model, file or key must not cost a generation.
            judge_obj = get_judge(judge_name, judge_model=judge_model, **options)
    data = {resolve_suite(k).name: v for k, v in (data or {}).items()}
    _check_world_suites(suite_names, data, world)

    # Load every suite's data before the model: a missing dataset should not cost a model load.
    loaded: dict[str, tuple[list[dict[str, Any]], str]] = {}
    for name in suite_names:
        n_items = cfg.items_for(name)
        if limit is not None:
            n_items = limit if n_items is None else min(n_items, limit)
        loaded[name] = load_suite(name, data, world, limit=n_items)

    source = None
    if backend == "vllm":
        if model is not None:
            raise RealignError("the vllm backend loads the model itself: pass a model reference, not a loaded model")
        from realign.eval.generate import VLLMBackend

        gen = VLLMBackend(model_ref, adapter=adapter, dtype=dtype, allow_pickle=allow_pickle)
        tokenizer, source = gen.tokenizer, gen.source
    else:
        from realign.eval.generate import HFBackend

        if model is None:
            from realign.compute import load_model

            model, tokenizer = load_model(model_ref, adapter=adapter, device=device, dtype=dtype,
                                          allow_pickle=allow_pickle)
        source = getattr(model, "realign_source", None)
        gen = HFBackend(model, tokenizer, batch_size=batch_size)
    resolved_template = resolve_template(tokenizer, template)
    if judge_obj is None and judged and parse_judge_name(judge_name)[0] == "classifier":
        from realign.eval.harmbench import preflight

        # The judge model is loaded after generating (both need not fit at once), but a missing one
        # must not cost a generation: its config is read now.
        preflight(judge_model, options.get("layout"))

    also: list[Judge] | None = None
    results_suites: dict[str, Any] = {}
    for name in suite_names:
        suite = resolve_suite(name)
        items, src = loaded[name]
        max_new = cfg.tokens_for(suite.kind)
        texts = [format_prompt(tokenizer, it["prompt"], resolved_template, it.get("input")) for it in items]
        start = time.perf_counter()
        responses = gen.generate(texts, max_new, desc=f"generating ({name})")
        gen_seconds = time.perf_counter() - start
        entry: dict[str, Any] = {"kind": suite.kind, "source": src, "n": len(items), "max_new_tokens": max_new,
                                 "generation_seconds": round(gen_seconds, 3)}
        if suite.kind in JUDGED_KINDS:
            if judge_obj is None:
                base_name, _ = parse_judge_name(judge_name)
                judge_obj = get_judge(judge_name, judge_model=judge_model, device=device, dtype=dtype,
                                      batch_size=min(batch_size, 16) if base_name in MODEL_JUDGES else batch_size,
                                      **options)
            if also is None:
                also = _also_judges(cfg.also_judges if explicit else (), judge_name, device, dtype)
            rows, metrics = judge_suite(suite.kind, items, responses, judge_obj, also)
        else:
            rows = []
            for it, r in zip(items, responses, strict=True):
                row = dict(it)
                row["response"] = r
                row.update(score_item(name, it, r, cfg.sst2_match))
                rows.append(row)
            n = len(rows)
            metrics = {"accuracy": _pct(sum(r["correct"] for r in rows), n)}
            if suite.kind == "skills":
                by_skill: dict[str, list[bool]] = {}
                for r in rows:
                    by_skill.setdefault(str(r.get("skill", "all")), []).append(r["correct"])
                metrics["by_skill"] = {k: _pct(sum(v), len(v)) for k, v in sorted(by_skill.items())}
        entry["metrics"] = metrics
        entry["items"] = rows
        results_suites[name] = entry

    results = {
        "format": RESULTS_FORMAT,
        "created": _now(),
        "model": _model_info(model_ref, adapter, source, model),
        "preset": cfg.name,
        "preset_settings": cfg.to_dict(),
        "judge": judge_name,
        "judge_from": judge_from,
        "judge_model": getattr(judge_obj, "model_ref", judge_model),
        **_judge_settings(judge_obj),
        "also_judges": [j.spec for j in also or []],
        "template": resolved_template,
        "backend": backend,
        "limit": limit,
        "versions": _versions(),
        "summary": summarize(results_suites),
        "suites": results_suites,
    }
    check_unparsed(results, allow_unparsed)
    return results


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _judge_settings(judge: Judge | None) -> dict[str, Any]:
    settings = getattr(judge, "settings", None)
    return {"judge_settings": settings} if settings else {}


def rejudge(
    results: dict[str, Any],
    judge: str | Judge = "keywords",
    judge_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    judge_options: dict[str, Any] | None = None,
    also_judges: Sequence[str] | None = None,
    allow_unparsed: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """A new results dict with another judge's verdicts and metrics, from the responses a results
    dict keeps: nothing is generated and the evaluated model is never loaded. Task suites are
    copied as they are. ``also_judges`` defaults to the ones the results were made with."""
    where = source or "the results"
    new = copy.deepcopy(results)
    judged = [n for n, e in new.get("suites", {}).items() if isinstance(e, dict) and e.get("kind") in JUDGED_KINDS]
    if not judged:
        raise RealignError(f"{where} has no harmful or over-refusal suite to re-judge")
    for name in judged:
        for i, row in enumerate(new["suites"][name].get("items") or []):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("response"), str):
                raise RealignError(f"{where}: suite {name} item {i + 1} has no prompt and response to re-judge")
        if not new["suites"][name].get("items"):
            raise RealignError(f"{where}: suite {name} keeps no items to re-judge")
    if isinstance(judge, Judge):
        judge_obj = judge
    else:
        judge_obj = get_judge(judge, judge_model=judge_model, device=device, dtype=dtype, batch_size=batch_size,
                              **_judge_options(judge_options))
    names = list(results.get("also_judges") or []) if also_judges is None else list(also_judges)
    also = _also_judges(names, judge_obj.spec, device, dtype)
    for name in judged:
        entry = new["suites"][name]
        # What the previous judge wrote goes; the item and its response stay.
        items = [{k: v for k, v in row.items() if k not in VERDICT_KEYS and not k.startswith("judge_")
                  and k != "response"} for row in entry["items"]]
        responses = [row["response"] for row in entry["items"]]
        entry["items"], entry["metrics"] = judge_suite(entry["kind"], items, responses, judge_obj, also)
    new.pop("judge_settings", None)
    new.update({
        "judge": judge_obj.spec,
        "judge_from": "argument",
        "judge_model": getattr(judge_obj, "model_ref", None),
        **_judge_settings(judge_obj),
        "also_judges": [j.spec for j in also],
        "summary": summarize(new["suites"]),
        "rejudged": {"created": _now(), "source": source, "previous_judge": results.get("judge"),
                     "previous_judge_model": results.get("judge_model"), "versions": _versions()},
    })
    check_unparsed(new, allow_unparsed)
    return new


def _json_safe(obj: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file next to it, renamed at the end."""
    from realign.writer import write_file_atomic

    return write_file_atomic(path, text)


def save_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a results dict as JSON (atomically)."""
    return write_atomic(path, json.dumps(_json_safe(results), indent=2, ensure_ascii=False) + "\n")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.exists():
        raise RealignError(f"results file {path} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RealignError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "summary" not in data or "suites" not in data:
        raise RealignError(f"{path} is not a realign results file (no summary/suites): make it with realign eval")
    return data


__all__ = ["evaluate", "rejudge", "save_results", "load_results", "write_atomic", "judge_suite", "verdict_metrics",
           "summarize", "check_unparsed", "UnparsedAnswers", "RESULTS_FORMAT"]
