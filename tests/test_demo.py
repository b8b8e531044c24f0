"""`realign demo` end to end on the small world: rows, files, table, plot, one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner


def test_demo_writes_rows_table_and_plot(small_world, tmp_path):
    from realign.cli import app

    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--world", str(small_world.root), "--size", "small",
                                 "--methods", "revert,nlsr", "--limit", "8", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "summary.json").read_text())
    names = [row["name"] for row in rows]
    assert names[:5] == ["base", "aligned", "attacked-lora", "attacked-full", "benign-lora"]
    # revert has nothing to tune: one row per attack; nlsr: the paper's default and the tuned setting
    assert names[5:] == ["revert (attacked-lora)", "revert (attacked-full)", "nlsr (attacked-lora)",
                         "nlsr tuned (attacked-lora)", "nlsr (attacked-full)", "nlsr tuned (attacked-full)"]
    for row in rows:
        assert {"name", "hs", "fa", "over_refusal"} <= set(row)
        assert 0.0 <= row["hs"] <= 100.0 and 0.0 <= row["fa"] <= 100.0
    by_name = {row["name"]: row for row in rows}
    # revert is the aligned model again: same answers, same scores.
    for target in ("attacked-lora", "attacked-full"):
        assert by_name[f"revert ({target})"]["hs"] == by_name["aligned"]["hs"]
        assert by_name[f"revert ({target})"]["fa"] == by_name["aligned"]["fa"]
        assert by_name[f"nlsr ({target})"]["params_changed_pct"] > 0
    for target in ("attacked-lora", "attacked-full"):
        tuned = by_name[f"nlsr tuned ({target})"]
        assert tuned["setting"].startswith("prune_rate=") and by_name[f"nlsr ({target})"]["setting"] == ""
        report = json.loads((out / "repaired" / f"nlsr-tuned-{target}" / "realign.json").read_text())["report"]
        assert report["tuning"]["utility_rows"] == "task" and any(r["chosen"] for r in report["tuning"]["candidates"])
    assert (out / "hs_vs_fa.png").stat().st_size > 1000
    assert "| nlsr (attacked-full) |" in (out / "summary.md").read_text()
    assert (out / "results" / "nlsr-attacked-lora.json").is_file()


def test_demo_unknown_method_is_one_line(small_world, tmp_path):
    from realign.cli import app

    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--world", str(small_world.root),
                                 "--size", "small", "--methods", "nope"])
    assert r.exit_code == 2 and "unknown method 'nope'" in r.output
