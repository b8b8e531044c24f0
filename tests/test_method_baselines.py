"""Baselines (safelora, resta, antidote, hdr): each rule against a direct computation on the tiny
models, SafeLoRA on an adapter == SafeLoRA on the merged weights, CLI and input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, perturbed_copy
from safetensors import safe_open
from typer.testing import CliRunner

from realign import api
from realign.calibration import from_rows
from realign.cli import app
from realign.errors import RealignError
from realign.sources import load_model

runner = CliRunner()
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def linear_names(sd: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in sd if n.startswith("model.layers.") and n.endswith(".weight") and
            any(f".{r}." in n for r in ROLES)]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """The tiny models plus: the LoRA fine-tune merged into a full checkpoint, and a 'harmful' model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("baselines")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]),
                                       tiny_models["lora"]).merge_and_unload()
    merged.save_pretrained(root / "lora-merged")
    make_tokenizer(root / "lora-merged")
    harmful = perturbed_copy(tiny_models["base"], root / "harmful", seed=7, scale=0.1)
    return {**tiny_models, "lora-merged": root / "lora-merged", "harmful": harmful}


# ----------------------------------------------------------------------------- safelora
def direct_safelora(w_a, w_b, w_f):
    """C materialised explicitly: (projected ΔW, cosine)."""
    v = (w_a - w_b).double()
    c = v @ v.T / torch.linalg.norm(v)
    d = (w_f - w_a).double()
    cd = c @ d
    cos = float((cd * d).sum() / (cd.norm() * d.norm()))
    return cd, cos


def test_safelora_threshold_and_topk_match_direct(world, tmp_path):
    a, b, f = (tensors_of(world[k]) for k in ("aligned", "base", "finetuned"))
    names = linear_names(a)
    direct = {n: direct_safelora(a[n], b[n], f[n]) for n in names}
    cosines = sorted(c for _d, c in direct.values())
    tau = (cosines[6] + cosines[7]) / 2  # half the modules below: both branches are exercised
    res = api.repair("safelora", world["aligned"], world["finetuned"], tmp_path / "thr", base=world["base"],
                     params={"mode": "threshold", "tau": tau})
    out = tensors_of(tmp_path / "thr")
    assert res.output == "checkpoint" and res.report["modules_changed"] == 7
    for n in names:
        cd, cos = direct[n]
        assert res.report["cosine"][n.removesuffix(".weight")] == pytest.approx(cos, abs=1e-5)
        expected = (a[n].double() + cd).float() if cos < tau else f[n]
        assert torch.allclose(out[n], expected, atol=1e-5), n
    for n in set(out) - set(names):
        assert torch.equal(out[n], f[n]), n  # nothing else is touched
    assert res.report["totals"]["tensors_changed"] == 7

    res = api.repair("safelora", world["aligned"], world["finetuned"], tmp_path / "topk", base=world["base"],
                     params={"mode": "topk", "k": 3})
    lowest = sorted(names, key=lambda n: direct[n][1])[:3]
    assert sorted(res.report["projected_modules"]) == sorted(n.removesuffix(".weight") for n in lowest)
    out = tensors_of(tmp_path / "topk")
    for n in names:
        expected = (a[n].double() + direct[n][0]).float() if n in lowest else f[n]
        assert torch.allclose(out[n], expected, atol=1e-5), n


def test_safelora_official_default_and_rounded_threshold(world, tmp_path):
    """Spec (the official code): by default the k = 10 lowest-cosine modules are projected; the
    threshold test is cos ≤ tau after rounding cos to 5 decimals (strict: cos < tau, unrounded)."""
    from realign.methods.safelora import passes

    a, b, f = (tensors_of(world[k]) for k in ("aligned", "base", "finetuned"))
    names = linear_names(a)
    direct = {n.removesuffix(".weight"): direct_safelora(a[n], b[n], f[n])[1] for n in names}
    res = api.repair("safelora", world["aligned"], world["finetuned"], tmp_path / "default", base=world["base"])
    assert res.report["mode"] == "topk" and res.report["k"] == 10
    assert sorted(res.report["projected_modules"]) == sorted(sorted(direct, key=direct.get)[:10])
    assert passes(0.5, 0.5, "official") and not passes(0.5, 0.5, "strict")  # ≤, not <
    assert passes(0.123454, 0.12345, "official") and not passes(0.123454, 0.12345, "strict")  # rounded down
    assert not passes(0.123456, 0.12345, "official")  # rounds up to 0.12346
    # a module whose cosine rounds down onto tau is projected by the official rule only: reported to 6
    # decimals, a last digit in 1..4 means the cosine itself lies strictly between tau and tau + 0.5e-5
    reported = res.report["cosine"]
    module = next(m for m, c in reported.items() if round(c * 1e6) % 10 in (1, 2, 3, 4))
    tau = math.floor(reported[module] * 1e5) / 1e5
    runs = {rule: api.repair("safelora", world["aligned"], world["finetuned"], tmp_path / rule, base=world["base"],
                             params={"mode": "threshold", "tau": tau, "threshold_rule": rule})
            for rule in ("official", "strict")}
    official, strict = (set(runs[r].report["projected_modules"]) for r in ("official", "strict"))
    assert module in official and module not in strict and strict < official
    assert runs["official"].report["threshold_rule"] == "official"
    with pytest.raises(RealignError, match="k=-1"):
        api.repair("safelora", world["aligned"], world["finetuned"], tmp_path / "bad", base=world["base"],
                   params={"k": -1})


def test_safelora_on_adapter_equals_safelora_on_merged(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = api.repair("safelora", world["aligned"], world["lora-merged"], tmp_path / "dense", base=world["base"],
                        params={"mode": "threshold", "tau": 0.0})
    cosines = sorted(merged.report["cosine"].values())
    tau = (cosines[6] + cosines[7]) / 2
    dense = api.repair("safelora", world["aligned"], world["lora-merged"], tmp_path / "dense2", base=world["base"],
                       params={"mode": "threshold", "tau": tau})
    ad = api.repair("safelora", world["aligned"], world["lora"], tmp_path / "adapter", base=world["base"],
                    params={"mode": "threshold", "tau": tau})
    assert ad.output == "adapter" and (tmp_path / "adapter" / "adapter_config.json").exists()
    assert ad.report["edits"] == "lora_factors" and dense.report["edits"] == "dense"
    assert sorted(ad.report["projected_modules"]) == sorted(dense.report["projected_modules"])
    assert len(ad.report["projected_modules"]) == 7
    for m, c in dense.report["cosine"].items():
        assert ad.report["cosine"][m] == pytest.approx(c, abs=1e-4)
    # only the projected B factors changed: 7 modules × (out_dim × r) entries at most
    assert 0 < ad.report["totals"]["adapter_parameters_changed"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["aligned"]),
                                         tmp_path / "adapter").merge_and_unload().state_dict()
    want = tensors_of(tmp_path / "dense2")
    for n in linear_names(want):
        assert torch.allclose(reloaded[n], want[n], atol=1e-5), n
    # the same fine-tune written as a checkpoint is the same model again
    ck = api.repair("safelora", world["aligned"], world["lora"], tmp_path / "ck", base=world["base"],
                    params={"mode": "threshold", "tau": tau}, output="checkpoint")
    assert ck.output == "checkpoint"
    got = tensors_of(tmp_path / "ck")
    for n in linear_names(want):
        assert torch.allclose(got[n], want[n], atol=1e-5), n
    # B ← C·B for a projected module, A untouched
    module = ad.report["projected_modules"][0]
    lora = load_model(world["lora"])
    a_f, b_f, _s = lora.lora_factors(module + ".weight")
    v = (tensors_of(world["aligned"])[module + ".weight"] - tensors_of(world["base"])[module + ".weight"]).double()
    ad_t = tensors_of(tmp_path / "adapter")
    key_b = next(k for k in ad_t if k.endswith(f"{module}.lora_B.weight"))
    key_a = next(k for k in ad_t if k.endswith(f"{module}.lora_A.weight"))
    assert torch.allclose(ad_t[key_b].double(), v @ v.T @ b_f.double() / torch.linalg.norm(v), atol=1e-6)
    assert torch.equal(ad_t[key_a], a_f)


# ----------------------------------------------------------------------------- resta
def test_resta_rule_and_dare(world, tmp_path):
    a, b, f, u = (tensors_of(world[k]) for k in ("aligned", "base", "finetuned", "harmful"))
    res = api.repair("resta", world["aligned"], world["finetuned"], tmp_path / "r", base=world["base"])
    out = tensors_of(tmp_path / "r")
    assert res.report["unaligned_model"] == "base" and res.report["scope"] == "all"
    for n in out:
        assert torch.allclose(out[n], f[n] + 0.5 * (a[n] - b[n]), atol=1e-6), n
    # --unaligned takes precedence over the base; scope=linear leaves the rest alone
    res = api.repair("resta", world["aligned"], world["finetuned"], tmp_path / "u", base=world["base"],
                     unaligned=world["harmful"], params={"beta": 0.25, "scope": "linear"})
    out = tensors_of(tmp_path / "u")
    lin = set(linear_names(out))
    assert res.report["unaligned_model"] == "unaligned" and res.report["linear_modules_edited"] == 14
    for n in out:
        expected = f[n] + 0.25 * (a[n] - u[n]) if n in lin else f[n]
        assert torch.allclose(out[n], expected, atol=1e-6), n
    # DARE: every entry of ΔW is dropped or rescaled by 1/(1-d), about d of them dropped, seeded
    d = 0.3
    api.repair("resta", world["aligned"], world["finetuned"], tmp_path / "d1", base=world["base"],
               params={"dare": d, "beta": 0.0, "seed": 5})
    api.repair("resta", world["aligned"], world["finetuned"], tmp_path / "d2", base=world["base"],
               params={"dare": d, "beta": 0.0, "seed": 5})
    o1, o2 = tensors_of(tmp_path / "d1"), tensors_of(tmp_path / "d2")
    dropped = total = 0
    for n in o1:
        assert torch.equal(o1[n], o2[n]), n
        delta, got = f[n] - a[n], o1[n] - a[n]
        is_dropped = got.abs() < 1e-7
        kept_ok = torch.isclose(got, delta / (1 - d), atol=1e-5)
        assert bool((is_dropped | kept_ok).all()), n
        dropped += int((is_dropped & (delta.abs() > 1e-6)).sum())
        total += int((delta.abs() > 1e-6).sum())
    assert abs(dropped / total - d) < 0.02


# ----------------------------------------------------------------------------- hdr
def test_hdr_rule_per_tensor_top_keep(world, tmp_path):
    b, f, h = (tensors_of(world[k]) for k in ("base", "finetuned", "harmful"))
    res = api.repair("hdr", world["aligned"], world["finetuned"], tmp_path / "h", base=world["base"],
                     harmful=world["harmful"])
    out = tensors_of(tmp_path / "h")
    assert res.report["lambda"] == 3.0 and res.report["keep"] == 0.1
    for n in out:
        tau = (h[n] - b[n]).reshape(-1)
        k = math.ceil(0.1 * tau.numel())
        order = torch.argsort(tau.abs(), descending=True)
        trimmed = torch.zeros_like(tau)
        trimmed[order[:k]] = tau[order[:k]]
        expected = f[n] - 3.0 * trimmed.reshape(f[n].shape)
        assert torch.allclose(out[n], expected, atol=1e-6), n
        assert int((out[n] != f[n]).sum()) <= k
    assert res.report["totals"]["tensors_changed"] == len(out)


# ----------------------------------------------------------------------------- antidote
def _calibration():
    rows = []
    g = torch.Generator().manual_seed(11)
    for _i in range(6):
        words = torch.randint(4, 90, (9,), generator=g).tolist()
        rows.append({"prompt": " ".join(f"w{w}" for w in words[:4]), "kind": "harmful",
                     "unsafe_response": " ".join(f"w{w}" for w in words[4:]), "safe_response": "w1 w2"})
    rows.append({"prompt": "w3 w4", "kind": "benign", "response": "w5"})
    rows.append({"prompt": "w3 w9 w4", "kind": "benign", "response": "w5 w6"})
    rows.append({"prompt": "w6 w7", "kind": "harmful", "safe_response": "w8"})  # no unsafe response: unused
    return from_rows(rows)


def _direct_input_sqnorms(finetuned: Path, cal) -> dict[str, torch.Tensor]:
    """Run the fine-tuned model one example at a time; sum of squared inputs of every linear module."""
    from transformers import AutoModelForCausalLM

    from realign.compute import load_tokenizer
    from realign.prompts import format_prompt

    model = AutoModelForCausalLM.from_pretrained(finetuned).eval()
    tok = load_tokenizer(load_model(finetuned))
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[name] = sq.get(name, 0) + (x ** 2).sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for e in cal.harmful():
            if e.unsafe_response:
                ids = tok(format_prompt(tok, e.prompt, "auto"))["input_ids"] + tok(
                    e.unsafe_response, add_special_tokens=False)["input_ids"]
                model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return sq


def _zero_top(w: torch.Tensor, col_sq: torch.Tensor, fraction: float) -> torch.Tensor:
    score = w.abs() * col_sq.sqrt()[None, :]
    k = int(w.shape[1] * fraction)
    order = torch.argsort(score, dim=1, descending=True)[:, :k]
    return w.clone().scatter_(1, order, 0.0)


def test_antidote_matches_direct_wanda(world, tmp_path):
    cal = _calibration()
    res = api.repair("antidote", world["aligned"], world["finetuned"], tmp_path / "a", calibration=cal,
                     params={"fraction": 0.25}, device="cpu")
    out = tensors_of(tmp_path / "a")
    f = tensors_of(world["finetuned"])
    assert res.report["calibration_rows"] == 6 and res.report["modules_changed"] == 14
    sq = _direct_input_sqnorms(world["finetuned"], cal)
    for n in linear_names(f):
        k = int(f[n].shape[1] * 0.25)
        expected = _zero_top(f[n].double(), sq[n.removesuffix(".weight")], 0.25).float()
        assert torch.allclose(out[n], expected, atol=1e-6), n
        assert int((out[n] == 0).sum(1).min()) >= k
    for n in set(out) - set(linear_names(f)):
        assert torch.equal(out[n], f[n])


def test_antidote_update_target_prunes_the_finetune_update(world, tmp_path):
    """target=update: Wanda scores of dW = W_f - W_a; the top entries per row go back to W_a."""
    cal = _calibration()
    res = api.repair("antidote", world["aligned"], world["finetuned"], tmp_path / "u", calibration=cal,
                     params={"fraction": 0.25, "target": "update"}, device="cpu")
    assert res.report["target"] == "update"
    out = tensors_of(tmp_path / "u")
    f, a = tensors_of(world["finetuned"]), tensors_of(world["aligned"])
    sq = _direct_input_sqnorms(world["finetuned"], cal)
    reverted = 0
    for n in linear_names(f):
        delta = f[n].double() - a[n].double()
        expected = (a[n].double() + _zero_top(delta, sq[n.removesuffix(".weight")], 0.25)).float()
        assert torch.allclose(out[n], expected, atol=1e-6), n
        reverted += int(((out[n] == a[n]) & (f[n] != a[n])).sum())
        # the weights themselves are not zeroed: only updates are removed
        assert int((out[n] == 0).sum()) <= int((f[n] == 0).sum()) + int((a[n] == 0).sum())
    assert reverted > 0
    for n in set(out) - set(linear_names(f)):
        assert torch.equal(out[n], f[n])


# ----------------------------------------------------------------------------- CLI and errors
def test_cli_repair_and_missing_inputs(world, tmp_path):
    a, f, b = world["aligned"], world["finetuned"], world["base"]
    out = tmp_path / "cli"
    r = runner.invoke(app, [str(x) for x in ("repair", "resta", "-a", a, "-f", f, "--base", b, "--set",
                                             "beta=0.2", "--set", "scope=linear", "-o", out)])
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "realign.json").read_text())
    assert prov["method"] == "resta" and prov["parameters"]["beta"] == 0.2
    assert prov["report"]["totals"]["tensors_changed"] == 14
    got, fa, aa, ba = tensors_of(out), tensors_of(f), tensors_of(a), tensors_of(b)
    n = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(got[n], fa[n] + 0.2 * (aa[n] - ba[n]), atol=1e-6)

    def run(*args):
        return runner.invoke(app, [str(x) for x in args])

    assert_one_line_error(run("repair", "hdr", "-a", a, "-f", f, "--base", b, "-o", tmp_path / "x"),
                          "hdr needs --harmful")
    assert_one_line_error(run("repair", "safelora", "-a", a, "-f", f, "-o", tmp_path / "x"), "safelora needs --base")
    assert_one_line_error(run("repair", "resta", "-a", a, "-f", f, "-o", tmp_path / "x"), "--unaligned", "--base")
    assert_one_line_error(run("repair", "antidote", "-a", a, "-f", f, "-o", tmp_path / "x"), "--calibration")
    assert_one_line_error(run("repair", "resta", "-a", a, "-f", f, "--base", b, "--set", "dare=1.5", "-o",
                              tmp_path / "x"), "dare")
    assert_one_line_error(run("repair", "safelora", "-a", a, "-f", f, "--base", b, "--mode", "nope", "-o",
                              tmp_path / "x"), "mode")
    cal = tmp_path / "benign.jsonl"
    cal.write_text('{"prompt": "w1", "kind": "benign", "response": "w2"}\n')
    assert_one_line_error(run("repair", "antidote", "-a", a, "-f", f, "-c", cal, "-o", tmp_path / "x"),
                          "unsafe_response")
    assert not (tmp_path / "x").exists()


def test_prepare_then_apply_matches_repair(world, tmp_path):
    patch = api.prepare("safelora", world["aligned"], tmp_path / "patch", base=world["base"])
    assert patch.method == "safelora"
    api.apply(tmp_path / "patch", world["finetuned"], tmp_path / "applied", params={"mode": "topk", "k": 4})
    api.repair("safelora", world["aligned"], world["finetuned"], tmp_path / "repaired", base=world["base"],
               params={"mode": "topk", "k": 4})
    x, y = tensors_of(tmp_path / "applied"), tensors_of(tmp_path / "repaired")
    assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(RealignError, match="needs --harmful"):
        api.repair("hdr", world["aligned"], world["finetuned"], tmp_path / "no", base=world["base"])


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("method", ["safelora", "resta", "hdr", "refusal"])
def test_each_output_tensor_reads_only_its_own_inputs(world, tmp_path, monkeypatch, method):
    """Streaming: apply reads at most one module's tensors at a time, and the transform of a tensor
    reads only the same-named tensors of the input models (never a whole model)."""
    from realign.api import _make_inputs
    from realign.methods import get_method
    from realign.methods.base import build_params
    from realign.sources import TensorStore

    m = get_method(method)
    given = {"refusal": {"layer": 1, "coeff": 0.5}, "safelora": {"mode": "topk", "k": 3}}
    p = build_params(m.Params, given.get(method))
    cal = _calibration()
    inputs, _ = _make_inputs(m, world["aligned"], world["base"], cal, world["harmful"], None, "auto", "cpu", "auto",
                             False)
    ft = load_model(world["finetuned"])
    patch = m.prepare(inputs, p)
    reads: list[str] = []
    original = TensorStore.get
    monkeypatch.setattr(TensorStore, "get", lambda self, name: (reads.append(name), original(self, name))[1])
    edit = m.apply(patch, ft, inputs, p)
    # before writing: reads come module by module (each name read in one contiguous run per model)
    runs = [n for i, n in enumerate(reads) if i == 0 or reads[i - 1] != n]
    assert len(set(runs)) == len(set(reads)) and len(reads) <= 4 * len(set(reads))
    assert edit.transforms or edit.added
    for name, fn in edit.transforms.items():
        old = original(ft.weights, name)
        reads.clear()
        fn(old)
        assert set(reads) <= {name}, (name, set(reads))
    for name, added in edit.added.items():
        reads.clear()
        added.produce()
        assert not reads, name
