"""Evaluation: Harmful Score, fine-tuning accuracy and over-refusal, with auditable results files.

    from realign.eval import evaluate, rejudge, save_results
    results = evaluate("out/repaired", suites=["harmful", "sst2", "xstest"], judge="keywords")
    save_results(results, "results/repaired.json")
    save_results(rejudge(results, "refusal"), "results/repaired-refusal.json")  # no regeneration
"""

from realign.eval.harness import evaluate, load_results, rejudge, save_results
from realign.eval.judges import JUDGES, get_judge, judge_responses
from realign.eval.presets import available_presets, get_preset
from realign.eval.tasks import SUITES, TASKS, load_suite

__all__ = ["evaluate", "rejudge", "save_results", "load_results", "JUDGES", "get_judge", "judge_responses", "TASKS",
           "SUITES", "load_suite", "get_preset", "available_presets"]
