"""The calibration data format every method reads: one JSONL file, one example per line.

Each line has ``prompt`` and ``kind`` ("harmful" or "benign"), and optionally
``safe_response`` (a refusal, for harmful prompts), ``unsafe_response`` (a compliant answer, for
harmful prompts), ``response`` (for benign prompts) and ``category``. For compatibility the
pair layout ``prompt``/``chosen``/``rejected`` (SafetyLock's) is read as a harmful row with
safe/unsafe responses, and PKU-SafeRLHF rows (``response_0``/``response_1`` with
``is_response_0_safe``/``is_response_1_safe``) keep pairs where exactly one response is safe.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from realign.errors import RealignError, decode_utf8, json_lines

KINDS = ("harmful", "benign")
FIELDS = ("prompt", "kind", "safe_response", "unsafe_response", "response", "category")


@dataclass(frozen=True)
class Example:
    prompt: str
    kind: str
    safe_response: str | None = None
    unsafe_response: str | None = None
    response: str | None = None
    category: str | None = None


def _normalise(row: dict, where: str) -> Example:
    if not isinstance(row, dict):
        raise RealignError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = dict(row)
    if "chosen" in row or "rejected" in row:
        row.setdefault("safe_response", row.pop("chosen", None))
        row.setdefault("unsafe_response", row.pop("rejected", None))
        row.setdefault("kind", "harmful")
    if "is_response_0_safe" in row and "is_response_1_safe" in row:
        s0, s1 = bool(row.pop("is_response_0_safe")), bool(row.pop("is_response_1_safe"))
        r0, r1 = row.pop("response_0", None), row.pop("response_1", None)
        if s0 == s1:
            return None  # type: ignore[return-value]  # PKU pairs without exactly one safe answer carry no contrast
        row["safe_response"], row["unsafe_response"] = (r0, r1) if s0 else (r1, r0)
        row.setdefault("kind", "harmful")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RealignError(f"{where}: 'prompt' must be a non-empty string")
    kind = row.get("kind")
    if kind not in KINDS:
        raise RealignError(f"{where}: 'kind' must be 'harmful' or 'benign', got {kind!r}")
    values = {}
    for key in ("safe_response", "unsafe_response", "response", "category"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise RealignError(f"{where}: {key!r} must be a string")
        values[key] = value
    if kind == "benign" and (values["safe_response"] or values["unsafe_response"]):
        raise RealignError(f"{where}: safe_response/unsafe_response belong to harmful rows; use 'response'")
    return Example(prompt=prompt, kind=kind, **values)


@dataclass
class Calibration:
    examples: list[Example]
    source: str = "<memory>"
    sha256: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def harmful(self, category: str | None = None) -> list[Example]:
        return [e for e in self.examples if e.kind == "harmful" and (category is None or e.category == category)]

    def benign(self) -> list[Example]:
        return [e for e in self.examples if e.kind == "benign"]

    def pairs(self) -> list[Example]:
        """Harmful rows with both a safe and an unsafe response."""
        return [e for e in self.harmful() if e.safe_response and e.unsafe_response]

    def with_safe_response(self) -> list[Example]:
        return [e for e in self.harmful() if e.safe_response]

    def categories(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.harmful():
            if e.category:
                seen.setdefault(e.category, None)
        return list(seen)

    def require(self, what: str, rows: list[Example], method: str, minimum: int = 1) -> list[Example]:
        if len(rows) < minimum:
            raise RealignError(
                f"{method} needs at least {minimum} calibration rows with {what}; {self.source} has {len(rows)}"
            )
        return rows

    def describe(self) -> dict:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "rows": len(self),
            "harmful": len(self.harmful()),
            "benign": len(self.benign()),
            "pairs": len(self.pairs()),
            "categories": self.categories(),
        }


def from_rows(rows: Iterable[dict], source: str = "<memory>") -> Calibration:
    examples = []
    for i, row in enumerate(rows, 1):
        ex = _normalise(row, f"{source}: row {i}")
        if ex is not None:
            examples.append(ex)
    return Calibration(examples, source)


def load_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration JSONL file; errors name the offending line."""
    path = Path(path)
    if not path.is_file():
        raise RealignError(f"calibration file {path} does not exist")
    data = path.read_bytes()
    examples: list[Example] = []
    for where, row in json_lines(decode_utf8(data, path), str(path)):
        ex = _normalise(row, where)
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise RealignError(f"calibration file {path} has no rows")
    return Calibration(examples, str(path), hashlib.sha256(data).hexdigest())


def save_calibration(examples: Iterable[Example], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for e in examples:
            f.write(json.dumps({k: v for k, v in asdict(e).items() if v is not None}) + "\n")
    tmp.replace(path)
