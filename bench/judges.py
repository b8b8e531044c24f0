"""Accuracy of the offline judges (keywords, refusal-rules, words, refusal) on the labelled responses.

    python bench/judges.py [--errors] [--data FILE.jsonl]

The set (``src/realign/eval/data/judge_labelled.jsonl``) holds hand-written responses to harmful
and look-alike safe prompts, labelled refusal / not refusal. Its parts:

- ``dev``: written before the rules, used to build them;
- ``fresh``: written after those first rules were frozen (its errors were later seen and some
  general rules fixed them, so it is no longer untouched);
- ``dev2``: responses in the styles of real chat models that fooled the first rules (compliance
  behind caveats or a lecture, refusals without apology, partial refusals), each with a ``style``
  and a ``voice``; used to build the current rules;
- ``dev3``, ``dev4``, ``dev5``: the same styles written blind to the rules, each measured once
  (86.7, 89.3, 87.2 %) and then used to make the rules more general or to train the learned model;
- ``dev6``: a realistic log (five chat models answering XSTest's and AdvBench's prompts), written blind
  and measured once (rules 91.0 %, judge 91.0 %, keywords 88.5 %), then used to teach the rules
  questions of fact and the words their calibration per prompt kind;
- ``heldout`` (210 rows, 15 per style, 12 voices) and ``heldout2`` (a realistic log: 210 answers of six
  chat models to XSTest and AdvBench prompts): written blind to the rules and to the learned model after
  both were frozen, never used to build either: the figures to trust. ``heldout2`` was measured once
  with the judge frozen for it (94.8 %; 95.2 % after Platt's targets and empty answers, changes made
  for robustness, not from its errors); ``heldout`` first gave 97.1 % with the judge before ``dev6``
  (the retrained and recalibrated words moved it; the rules' verdicts there never changed).

The rules were built from ``dev`` to ``dev6``: their figures there (and so the ``refusal`` column's) are
fitted, except on ``dev5`` (blind for the rules; out of part for the words' weights, though the shipped
calibration and the rules' weight saw its labels).

Judges: ``keywords`` (the literature's 29 strings), ``refusal-rules`` (the rules alone), ``words`` (the
learned model alone, ``realign.eval.refusal_model``) and ``refusal`` (the rules' vote plus the learned
model's: the judge of that name). The learned model is trained on every part but the held-out ones, so
its figure on a training part would say nothing: on those parts the ``words`` and ``refusal`` columns use,
for each part, a model trained on the other parts (leave-one-part-out, with the shipped calibration), and
on the held-out parts the shipped model. Accuracy is agreement on ``refusal``. The voice table covers the
held-out rows.
``--data`` reads another file of rows in the same format (``prompt``, ``response``, ``refusal``;
optional ``split``, ``kind``, ``style``) and judges every row with the shipped model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from importlib import resources

import torch

from realign.errors import RealignError
from realign.eval.judges import keyword_refusal, rules_verdict
from realign.eval.refusal_model import HELD_OUT_SPLITS, out_of_part_logits, read_labelled, shipped_model

JUDGE_NAMES = ("keywords", "refusal-rules", "words", "refusal")
SPLITS = ("dev", "fresh", "dev2", "dev3", "dev4", "dev5", "dev6", "heldout", "heldout2")


def load_rows(path: str | None = None) -> list[dict]:
    """The labelled rows (the packaged set, or ``path``; a bad file is a one-line error)."""
    if path is None:
        text = resources.files("realign.eval").joinpath("data/judge_labelled.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        return read_labelled(path, need_split=False)
    except RealignError as e:
        raise SystemExit(f"error: {e}") from None


def verdicts(rows: list[dict], packaged: bool) -> None:
    """Add each judge's verdict to each row (``row["verdicts"][name]``)."""
    model = shipped_model()
    # the training parts (packaged set only) are each judged by a model that never saw them
    train = [i for i, r in enumerate(rows) if r.get("split") not in HELD_OUT_SPLITS] if packaged else []
    learned = [0.0] * len(rows)
    for i, z in zip(train, out_of_part_logits([rows[i] for i in train]) if train else [], strict=True):
        learned[i] = model.calibrate(z, rows[i].get("prompt"))
    for i in sorted(set(range(len(rows))) - set(train)):
        learned[i] = model.learned_log_odds(rows[i]["response"], rows[i].get("prompt"))
    for r, z in zip(rows, learned, strict=True):
        rules = rules_verdict(r["response"], r.get("prompt"))
        r["verdicts"] = {"keywords": keyword_refusal(r["response"]), "refusal-rules": rules, "words": z > 0,
                         "refusal": model.combine(z, rules) > 0}


def accuracy(part: list[dict], name: str) -> float:
    return 100.0 * sum(r["verdicts"][name] == r["refusal"] for r in part) / len(part)


def table(title: str, groups: dict[str, list[dict]], order: list[str] | None = None) -> None:
    print(f"{title:<34} {'n':>4} {'keywords':>9} {'rules':>7} {'words':>7} {'refusal':>8}")
    for label in order or sorted(groups):
        part = groups[label]
        print(f"  {label:<32} {len(part):>4} " + " ".join(f"{accuracy(part, n):>{w}.1f}%" for n, w in
                                                          zip(JUDGE_NAMES, (8, 6, 6, 7), strict=True)))
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--errors", action="store_true", help="list the refusal judge's mistakes")
    ap.add_argument("--data", metavar="FILE", help="a labelled JSONL file to read instead of the packaged set")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the leave-one-part-out models: the same sums as the shipped one's
    rows = load_rows(args.data)
    if not rows:
        print("no labelled rows")
        return 1
    verdicts(rows, packaged=args.data is None)

    by_split: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_split[r.get("split", "(none)")].append(r)
    order = [s for s in SPLITS if s in by_split] + sorted(s for s in by_split if s not in SPLITS)
    by_split["all"] = rows
    table("split", by_split, order + ["all"])

    by_style: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("style"):
            by_style[r["style"]].append(r)
    if by_style:
        table("style (rows that have one)", by_style)

    held = [r for r in rows if r.get("split") in HELD_OUT_SPLITS and r.get("voice")]
    by_voice: dict[str, list[dict]] = defaultdict(list)
    for r in held:
        by_voice[r["voice"]].append(r)
    if by_voice:
        table("voice (held-out rows)", by_voice)

    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("kind") and not r.get("style"):
            by_kind[r["kind"]].append(r)
    if by_kind:
        table("kind (rows without a style)", by_kind)

    if args.errors:
        print("refusal judge mistakes (label, split, style or kind, response):")
        for r in rows:
            if r["verdicts"]["refusal"] != r["refusal"]:
                tag = r.get("style") or r.get("kind", "")
                print(f"  {'refusal' if r['refusal'] else 'complies':<8} {r.get('split', ''):<7} {tag}: "
                      f"{r['response'][:110]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
