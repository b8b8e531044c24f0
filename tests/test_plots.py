"""The HS-vs-FA plot and the compare table, as a person reads them."""

from __future__ import annotations

import json

from rich.console import Console

from realign.eval.compare import _point, rich_table
from realign.plots import Point, hs_fa_plot


def test_a_repaired_model_is_coloured_by_method_and_shaped_by_target(tmp_path):
    model = tmp_path / "nlsr-tuned-attacked-lora"
    model.mkdir()
    (model / "realign.json").write_text(json.dumps({
        "method": "nlsr", "inputs": {"finetuned": {"ref": "/w/attacked-lora"}},
        "report": {"tuning": {"improved": True}}}))
    repaired = _point({"model": str(model), "name": "r", "fa": 90.0, "hs": 10.0})
    assert (repaired.method, repaired.target, repaired.tuned) == ("nlsr", "attacked-lora", True)
    reference = _point({"model": str(tmp_path / "aligned"), "name": "aligned", "fa": 0.0, "hs": 1.0})
    assert reference.method is None and reference.label == "aligned"


def test_the_plot_is_written_with_every_kind_of_point(tmp_path):
    points = [Point(0, 100, "base"), Point(100, 99, "attacked-lora"),
              Point(90, 40, "x", method="fgsn", target="attacked-lora"),
              Point(92, 30, "y", method="fgsn", target="attacked-full", tuned=True),
              Point(0, 1, "z", method="revert", target="attacked-lora")]
    out = hs_fa_plot(points, tmp_path / "p.png", "t")
    assert out.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*.tmp"))


def test_compare_wraps_long_names_instead_of_cutting_them():
    name = "safedelta-tuned-attacked-lora-with-a-very-long-run-name-0123456789"
    rows = [{"name": name, "model": "m", "preset": "world", "judge": "keywords", "hs": 1.0, "fa": 2.0,
             "over_refusal": None, "skills": None, "per_suite": {}}]
    console = Console(width=80, record=True)
    console.print(rich_table(rows))
    text = console.export_text()
    first_cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert "…" not in text and "".join(first_cells) == name  # the header row is drawn with ┃
