"""The tuning loop: held-out rows, candidates, the choice rule, scores against direct computation,
in-memory application equal to what the writer writes, determinism, and --task-data errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from realign import api
from realign.calibration import from_rows, load_calibration
from realign.cli import app
from realign.compute import load_model as run_model
from realign.compute import load_tokenizer
from realign.errors import RealignError
from realign.methods import get_method
from realign.methods.base import build_params
from realign.prompts import format_prompt
from realign.sources import load_model
from realign.tuning import (
    MIN_GAIN,
    Scorer,
    Scores,
    TuneOptions,
    applied,
    candidates,
    choose,
    read_task_data,
    split_heldout,
)

runner = CliRunner()


def rows(n: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"prompt": f"w10 w11 w{20 + i} w{40 + 2 * i}", "kind": "harmful", "safe_response": "w1 w2 w8",
                    "unsafe_response": "w3 w4 w5", "category": "c"})
        out.append({"prompt": f"w60 w{70 + i} w{61 + i % 3}", "kind": "benign", "response": "w6 w7"})
    return out


@pytest.fixture()
def cal_file(tmp_path) -> Path:
    path = tmp_path / "cal.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# ----------------------------------------------------------------------------- held-out rows
def test_heldout_rows_are_disjoint_deterministic_and_only_from_large_groups():
    cal = from_rows(rows(12))
    seen, held = split_heldout(cal)
    again = split_heldout(from_rows(rows(12)))[1]
    assert held is not None and [e.prompt for e in held.examples] == [e.prompt for e in again.examples]
    assert len(held.harmful()) == 2 and len(held.benign()) == 2  # ⌊0.2 × 12⌋ of each group
    assert not {e.prompt for e in held.examples} & {e.prompt for e in seen.examples}
    assert len(seen) + len(held) == len(cal)
    small_seen, small_held = split_heldout(from_rows(rows(6)))  # groups under 10 prompts are not split
    assert small_held is None and len(small_seen) == 12


# ----------------------------------------------------------------------------- candidates and choice
def test_candidates_put_the_default_first_and_respect_the_budget():
    space = {"beta": [0.5, 0.25, 1.0, 2.0]}
    assert candidates(space, {"beta": 0.5}, 10) == [{"beta": 0.5}, {"beta": 0.25}, {"beta": 1.0}, {"beta": 2.0}]
    assert candidates(space, {"beta": 0.5}, 2) == [{"beta": 0.5}, {"beta": 0.25}]
    assert candidates(space, {"beta": 3.0}, 10)[0] == {"beta": 3.0}  # a user's default is tried first
    grid = candidates({"layer": [0, 1, 2], "coeff": [1.0, 0.5]}, {"layer": None, "coeff": None}, 4)
    assert len(grid) == 4 and grid[0] == {"layer": 0, "coeff": 1.0}  # no default: the grid, thinned evenly


def scores(safety: float, utility: float, openings: float | None = None) -> Scores:
    return Scores(safety=safety, utility=utility, utility_loss=1.0, benign_openings=openings, margin_first=None,
                  margin_per_token=None, benign_loss=None, task_loss=None)


def row(safety: float, utility: float, changed: int, openings: float | None = None) -> dict:
    return {"safety": safety, "utility": utility, "parameters_changed": changed, "benign_openings": openings}


def test_choice_rule_on_a_constructed_table():
    base = scores(0.10, 1.0)
    table = [row(0.50, 0.95, 100), row(0.90, 0.50, 10), row(0.5004, 0.99, 40), row(0.30, 1.0, 1)]
    index, why = choose(table, base, tolerance=0.1)
    # 0.9 costs too much utility; 0.5 and 0.5004 tie at 3 decimals: fewer parameters changed wins
    assert index == 2 and "ties" in why
    assert choose(table, base, tolerance=0.6)[0] == 1  # a looser tolerance admits the safest
    # nothing better than doing nothing: no choice, and the reason says so
    index, why = choose([row(0.10 + MIN_GAIN / 2, 1.0, 5), row(0.05, 1.0, 1)], base, 0.1)
    assert index is None and "raises the safety score" in why
    index, why = choose([row(0.9, 0.2, 5)], base, 0.1)
    assert index is None and "utility" in why
    # exact ties everywhere: the earlier candidate (the default comes first)
    assert choose([row(0.5, 1.0, 7), row(0.5, 1.0, 7)], base, 0.1)[0] == 0
    # the benign answers' openings bound the choice as the utility does (over-refusal shows there)
    guarded = scores(0.10, 1.0, openings=0.8)
    table = [row(0.9, 1.0, 5, openings=0.5), row(0.6, 1.0, 5, openings=0.75)]
    assert choose(table, guarded, 0.1)[0] == 1 and choose(table, guarded, 0.5)[0] == 0


# ----------------------------------------------------------------------------- scores
@torch.no_grad()
def test_safety_and_utility_scores_match_direct_computation(tiny_models):
    model, tok = run_model(tiny_models["finetuned"], device="cpu")
    held = from_rows(rows(3))
    task = [("w30 w31", "w32 w33 w34"), ("w35", "w36")]
    options = TuneOptions(first_tokens=2)
    s = Scorer(tok, "auto", held, task, options).score(model)

    def logps(prompt: str, response: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = tok(format_prompt(tok, prompt, "auto"))["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([p + r])).logits[0].double().log_softmax(-1)
        steps = [logits[len(p) - 1 + i] for i in range(len(r))]
        return torch.stack([s[t] for s, t in zip(steps, r, strict=True)]), torch.stack([s.max() for s in steps])

    p_refuse = []
    for e in held.harmful():
        safe, best = logps(e.prompt, e.safe_response)  # one wording only: every row refuses the same way
        p_refuse.append(math.exp(float((safe[:2] - best[:2]).sum())))
    assert s.safety == pytest.approx(sum(p_refuse) / len(p_refuse), abs=1e-5)
    lp = [logps(p, r) for p, r in task]
    tokens = sum(len(x[0]) for x in lp)
    assert s.task_loss == pytest.approx(-sum(float(x[0].sum()) for x in lp) / tokens, abs=1e-5)
    greedy = sum(int((x[0] == x[1]).sum()) for x in lp)
    assert s.utility == pytest.approx(greedy / tokens)  # task rows given: they count


# ----------------------------------------------------------------------------- in memory = written
@pytest.mark.parametrize(("method", "extra"), [("resta", {}), ("fgsn", {"layers": "0-1"}), ("refusal", {}),
                                               ("nlsr", {"sparsity": 0.5})])
def test_the_chosen_candidate_in_memory_equals_the_written_model_bit_for_bit(tiny_models, cal_file, tmp_path,
                                                                             method, extra):
    kwargs = {"base": tiny_models["base"], "unaligned": tiny_models["base"]}
    m = get_method(method)
    kwargs = {k: v for k, v in kwargs.items() if k in m.needs or k in m.uses}
    out = tmp_path / "out"
    res = api.repair(method, tiny_models["aligned"], tiny_models["finetuned"], out, calibration=cal_file,
                     params=dict(extra), tune=TuneOptions(fallback="default", budget=4), device="cpu", **kwargs)
    tuning = res.report["tuning"]
    assert len(tuning["candidates"]) <= 4 + TuneOptions().refine and tuning["chosen"] is not None
    prov = json.loads((out / "realign.json").read_text())
    for key, value in tuning["chosen"].items():  # the chosen setting is recorded like any parameter
        assert prov["parameters"][key] == value
    # the same edit, applied in memory as the loop applies it
    inputs, _ = api._make_inputs(m, tiny_models["aligned"], kwargs.get("base"), cal_file, None,
                                 kwargs.get("unaligned"), "auto", "cpu", "auto", False)
    patch = m.prepare(inputs, build_params(m.Params, dict(extra)))
    ft = load_model(tiny_models["finetuned"])
    p = build_params(m.Params, {**patch.params, **tuning["chosen"]})
    model, _ = run_model(ft, device="cpu")
    written = tensors(out)
    with applied(model, ft, m.apply(patch, ft, inputs, p)):
        state = dict(model.named_parameters())
        for name, value in written.items():
            assert torch.equal(state[name].detach().to(value.dtype), value), name
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), run_model(ft, device="cpu")[0].parameters(),
                                                  strict=True))  # restored afterwards


def test_same_inputs_same_choice_and_identical_files(tiny_models, cal_file, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        api.repair("resta", tiny_models["aligned"], tiny_models["finetuned"], out, unaligned=tiny_models["base"],
                   calibration=cal_file, tune=TuneOptions(fallback="default"), device="cpu")
        outs.append(out)
    a, b = (json.loads((o / "realign.json").read_text())["report"]["tuning"] for o in outs)
    assert a["chosen"] == b["chosen"]
    assert [r["safety"] for r in a["candidates"]] == [r["safety"] for r in b["candidates"]]
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


def test_patch_keeps_its_heldout_rows_and_apply_tunes_without_the_calibration_file(tiny_models, cal_file, tmp_path):
    patch_dir = tmp_path / "patch"
    api.prepare("resta", tiny_models["aligned"], patch_dir, unaligned=tiny_models["base"], calibration=cal_file)
    held = load_calibration(patch_dir / "heldout.jsonl")
    expected = split_heldout(load_calibration(cal_file))[1]
    assert {e.prompt for e in held.examples} == {e.prompt for e in expected.examples}
    moved = cal_file.rename(tmp_path / "elsewhere.jsonl")
    assert moved.exists()
    res = api.apply(patch_dir, tiny_models["finetuned"], tmp_path / "out", tune=TuneOptions(fallback="default"),
                    device="cpu")
    assert res.report["tuning"]["held_out"]["harmful"] == 2


def test_no_repairing_candidate_writes_nothing_unless_asked(tiny_models, cal_file, tmp_path):
    # a tolerance of 0 admits only candidates that lose no utility at all; on a random tiny model any edit loses some
    with pytest.raises(RealignError, match="nothing was written"):
        api.repair("resta", tiny_models["aligned"], tiny_models["finetuned"], tmp_path / "none",
                   unaligned=tiny_models["base"], calibration=cal_file, device="cpu",
                   params={}, tune=TuneOptions(tolerance=0.0, budget=2, refine=0))
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- task data through the CLI
@pytest.mark.parametrize(("content", "fragment"), [
    (b'{"prompt": "w1", "response": "w2"}\n{"prompt": "w1"\n', ":2: not valid JSON"),
    (b'{"prompt": "w1", "response": "w2"}\n{"prompt": "w1", "response": 3}\n', ":2: expected an object"),
    (b'["w1", "w2"]\n', ":1: expected an object"),
    (b'{"prompt": "w1", "response": "\xff"}\n', "byte 30 is not UTF-8"),
    (b"\n\n", "has no rows"),
])
def test_bad_task_data_is_a_one_line_error(tiny_models, cal_file, tmp_path, content, fragment):
    data = tmp_path / "task.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    r = runner.invoke(app, ["repair", "resta", "-a", str(tiny_models["aligned"]), "-f", str(tiny_models["finetuned"]),
                            "--unaligned", str(tiny_models["base"]), "-c", str(cal_file), "-o", str(out), "--tune",
                            "--task-data", str(data), "--device", "cpu"])
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.output, r.output
    assert not out.exists() and data.read_bytes() == content


def test_tuning_options_without_tune_and_bad_values_are_refused(tiny_models, cal_file, tmp_path):
    base = ["repair", "resta", "-a", str(tiny_models["aligned"]), "-f", str(tiny_models["finetuned"]),
            "--unaligned", str(tiny_models["base"]), "-c", str(cal_file), "-o", str(tmp_path / "out")]
    for extra, fragment in ((["--task-data", str(cal_file)], "only applies with --tune"),
                            (["--tune", "--tune-budget", "0"], "--tune-budget 0"),
                            (["--tune", "--tune-tolerance", "1.5"], "--tune-tolerance 1.5"),
                            (["--tune", "--tune-fallback", "maybe"], "fallback")):
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2 and fragment in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()


def test_cli_tune_prints_the_table_and_records_the_choice(tiny_models, cal_file, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"w30 w{31 + i}", "response": "w32 w33"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    r = runner.invoke(app, ["repair", "resta", "-a", str(tiny_models["aligned"]), "-f", str(tiny_models["finetuned"]),
                            "--unaligned", str(tiny_models["base"]), "-c", str(cal_file), "-o", str(out), "--tune",
                            "--task-data", str(task), "--tune-fallback", "default", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "tuning resta" in r.output and "beta=0.5" in r.output and "(unrepaired fine-tune)" in r.output
    tuning = json.loads((out / "realign.json").read_text())["report"]["tuning"]
    assert tuning["utility_rows"] == "task" and tuning["held_out"]["task"] + tuning["task_rows_dropped_as_harmful"] == 5
    assert sum(row["chosen"] for row in tuning["candidates"]) == 1


def test_read_task_data_reads_prompt_response_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "extra": 1}\n\n{"prompt": "c", "response": "d"}\n')
    assert read_task_data(path) == [("a", "b"), ("c", "d")]


def test_world_task_rows_are_the_attacks_clean_rows_and_harmful_rows_are_dropped(small_world, tmp_path):
    """On the trained world: the aligned model refuses the attack's harmful prompts, so those task rows
    leave the utility score (large margins only: a different CPU trains a slightly different world)."""
    from realign.tuning import refusing_rows

    clean = read_task_data(small_world.task_data)
    test_prompts = {json.loads(line)["prompt"] for line in (small_world.root / "eval" / "task.jsonl").open()}
    assert clean and not {p for p, _ in clean} & test_prompts  # not the test set
    cal = load_calibration(small_world.calibration)
    harmful = [(e.prompt, e.unsafe_response) for e in cal.harmful()[:20]]
    model, tok = run_model(small_world.aligned, device="cpu")
    flags = refusing_rows(model, tok, "auto", clean[:40] + harmful, cal, None, TuneOptions())
    assert sum(flags[40:]) >= len(harmful) // 2 and sum(flags[:40]) <= 20
    assert load_tokenizer  # the world's tokenizer is a real one (loaded above)
