"""Accuracy of the offline judges (keywords, refusal) on the labelled response set.

    python bench/judges.py [--errors] [--data FILE.jsonl]

The set (``src/realign/eval/data/judge_labelled.jsonl``) holds hand-written responses to harmful
and look-alike safe prompts, labelled refusal / not refusal. Its parts:

- ``dev``: written before the refusal judge, used to build it;
- ``fresh``: written after those first rules were frozen (its errors were later seen and some
  general rules fixed them, so it is no longer untouched);
- ``dev2``: responses in the styles of real chat models that fooled the first judge (compliance
  behind caveats or a lecture, refusals without apology, partial refusals), each with a ``style``
  and a ``voice``; used to build the current rules;
- ``dev3``: the same styles written blind by someone else; its errors were then used to make the
  rules more general (the prompt, notes, announcements, safe readings, discussion-only answers);
- ``dev4``: written blind to the rules (the first held-out part, measured once at 89.3 %); its errors
  were then used to make the rules more general (where an answer refuses or delivers);
- ``heldout`` (when present): written blind to the rules and never used to tune them: the figure
  to trust.

Accuracy is agreement on ``refusal``. ``--data`` reads another file of rows in the same format
(``prompt``, ``response``, ``refusal``; optional ``split``, ``kind``, ``style``) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from importlib import resources
from pathlib import Path

from realign.eval.judges import keyword_refusal, refusal_verdict

# Each judge reads (response, prompt); the keyword rule ignores the prompt.
JUDGES = {"keywords": lambda response, prompt: keyword_refusal(response), "refusal": refusal_verdict}
SPLITS = ("dev", "fresh", "dev2", "dev3", "dev4", "heldout")


def load_rows(path: str | None = None) -> list[dict]:
    if path is None:
        text = resources.files("realign.eval").joinpath("data/judge_labelled.jsonl").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def accuracy(part: list[dict], name: str) -> float:
    return 100.0 * sum(JUDGES[name](r["response"], r.get("prompt")) == r["refusal"] for r in part) / len(part)


def table(title: str, groups: dict[str, list[dict]], order: list[str] | None = None) -> None:
    print(f"{title:<34} {'n':>4} {'keywords':>9} {'refusal':>8}")
    for label in order or sorted(groups):
        part = groups[label]
        print(f"  {label:<32} {len(part):>4} {accuracy(part, 'keywords'):>8.1f}% {accuracy(part, 'refusal'):>7.1f}%")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--errors", action="store_true", help="list the refusal judge's mistakes")
    ap.add_argument("--data", metavar="FILE", help="a labelled JSONL file to read instead of the packaged set")
    args = ap.parse_args(argv)
    rows = load_rows(args.data)
    if not rows:
        print("no labelled rows")
        return 1

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

    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("kind") and not r.get("style"):
            by_kind[r["kind"]].append(r)
    if by_kind:
        table("kind (rows without a style)", by_kind)

    if args.errors:
        print("refusal judge mistakes (label, split, style or kind, response):")
        for r in rows:
            if refusal_verdict(r["response"], r.get("prompt")) != r["refusal"]:
                tag = r.get("style") or r.get("kind", "")
                print(f"  {'refusal' if r['refusal'] else 'complies':<8} {r.get('split', ''):<7} {tag}: "
                      f"{r['response'][:110]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
