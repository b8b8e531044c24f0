"""Presets: the numbers of a published evaluation setting, kept as data (``data/presets.json``).

A preset fixes, per suite kind, the number of new tokens, per suite the number of items (the first
N, in dataset order; ``null`` = all), and how SST-2 answers are matched. It may also name the
suites it runs when none are given (``suites``), its default judge (``judge``: an explicit judge
overrides it) and judges reported alongside (``also_judges``). Results files record the preset name
and its settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from realign.errors import RealignError

DEFAULT_PRESET = "booster"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    max_new_tokens: dict[str, int]
    items: dict[str, int | None] = field(default_factory=dict)
    sst2_match: str = "exact"
    suites: tuple[str, ...] = ()
    judge: str | None = None
    also_judges: tuple[str, ...] = ()

    def tokens_for(self, kind: str) -> int:
        return int(self.max_new_tokens.get(kind, self.max_new_tokens.get("task", 200)))

    def items_for(self, suite: str) -> int | None:
        return self.items.get(suite)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=1)
def _raw() -> dict[str, dict[str, Any]]:
    text = resources.files("realign.eval").joinpath("data/presets.json").read_text(encoding="utf-8")
    return json.loads(text)


def available_presets() -> list[str]:
    return list(_raw())


def get_preset(name: str = DEFAULT_PRESET) -> Preset:
    raw = _raw()
    if name not in raw:
        raise RealignError(f"unknown preset {name!r}: use one of {', '.join(raw)}")
    spec = raw[name]
    return Preset(name=name, description=spec.get("description", ""), max_new_tokens=dict(spec["max_new_tokens"]),
                  items=dict(spec.get("items", {})), sst2_match=spec.get("sst2_match", "exact"),
                  suites=tuple(spec.get("suites", ())), judge=spec.get("judge"),
                  also_judges=tuple(spec.get("also_judges", ())))


__all__ = ["Preset", "get_preset", "available_presets", "DEFAULT_PRESET"]
