"""The refusal-direction baseline: the direction, the layer search and the baked bias against direct
computations on the tiny models; refusal on families whose config cannot carry an o_proj bias."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny
from safetensors import safe_open
from typer.testing import CliRunner

from realign import api
from realign.calibration import from_rows
from realign.cli import app
from realign.compute import load_tokenizer
from realign.prompts import format_prompt
from realign.sources import load_model

runner = CliRunner()


def calibration():
    rows = []
    for i in range(8):
        rows.append({"prompt": f"w10 w11 w{20 + i} w{40 + 2 * i}", "kind": "harmful", "safe_response": "w1 w2",
                     "unsafe_response": "w3 w4 w5"})
        rows.append({"prompt": f"w60 w{70 + i} w{61 + i % 3}", "kind": "benign", "response": "w6 w7"})
    return from_rows(rows)


def last_hidden(model, tok, prompt: str) -> list[torch.Tensor]:
    """Each layer's residual output at the last prompt token; the last layer's read BEFORE the final
    norm (transformers' last hidden state is normalised, not the residual stream)."""
    ids = tok(format_prompt(tok, prompt, "auto"))["input_ids"]
    seen = []
    h = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, -1].double()))
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h.remove()
    assert not torch.allclose(out.hidden_states[-1][0, -1].double(), seen[0])  # the norm does change it
    return [h[0, -1].double() for h in out.hidden_states[1:-1]] + seen


def p_refuse(model, tok, prompts, tokens) -> torch.Tensor:
    out = []
    for p in prompts:
        ids = tok(format_prompt(tok, p, "auto"))["input_ids"]
        probs = model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(-1)
        out.append(probs[tokens].sum())
    return torch.stack(out)


def added(model, module: str, vec: torch.Tensor):
    return model.get_submodule(module).register_forward_hook(lambda _m, _a, out: out + vec.to(out.dtype))


@torch.no_grad()
def test_direction_search_and_bake_match_direct(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    cal = calibration()
    patch = api.prepare("refusal", tiny_models["aligned"], tmp_path / "patch", calibration=cal, device="cpu",
                        params={"validation": 3})
    meta = patch.meta
    assert len(meta["validation_harmful"]) == 3 and len(meta["validation_benign"]) == 3
    tok = load_tokenizer(load_model(tiny_models["aligned"]))
    assert meta["refusal_tokens"] == tok("w1", add_special_tokens=False)["input_ids"]  # the refusal opening only
    # r_l = mean over held-in harmful − mean over held-in benign, at the last prompt token
    aligned = AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]).eval()
    harm = [e.prompt for e in cal.harmful() if e.prompt not in meta["validation_harmful"]]
    ben = [e.prompt for e in cal.benign() if e.prompt not in meta["validation_benign"]]
    hh = [torch.stack(last_hidden(aligned, tok, p)) for p in harm]
    hb = [torch.stack(last_hidden(aligned, tok, p)) for p in ben]
    direct = torch.stack(hh).mean(0) - torch.stack(hb).mean(0)
    assert torch.allclose(patch.tensors["directions"].double(), direct, atol=1e-5)

    # the search: every layer a candidate (skip_last=0), scored by hand with plain hooks
    ft = AutoModelForCausalLM.from_pretrained(tiny_models["finetuned"]).eval()
    coeff = 4.0
    result = api.apply(tmp_path / "patch", tiny_models["finetuned"], tmp_path / "out",
                       params={"skip_last": 0.0, "coeff": coeff}, device="cpu")
    search = result.report["search"]
    assert search["candidates"] == [0, 1]
    scores = {}
    for layer in (0, 1):
        h = added(ft, f"model.layers.{layer}.self_attn.o_proj", coeff * direct[layer].float())
        ph = p_refuse(ft, tok, meta["validation_harmful"], meta["refusal_tokens"])
        pb = p_refuse(ft, tok, meta["validation_benign"], meta["refusal_tokens"])
        h.remove()
        scores[layer] = float(ph.mean() - pb.mean())
        assert search["per_layer"][str(layer)]["score"] == pytest.approx(scores[layer], abs=1e-5)
    best = max(scores, key=scores.get)
    assert result.report["layer"] == best and result.report["layer_chosen_by"] == "validation search"
    assert result.report["coeff"] == coeff and result.report["coeff_chosen_by"] == "given"

    # the baked checkpoint reloads with stock transformers and equals the hooked fine-tune
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["attention_bias"] is True
    repaired = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([tok(format_prompt(tok, "w10 w11 w99 w5", "auto"))["input_ids"]])
    h = added(ft, f"model.layers.{best}.self_attn.o_proj", coeff * direct[best].float())
    want = ft(input_ids=ids).logits
    h.remove()
    assert torch.allclose(repaired(input_ids=ids).logits, want, atol=1e-4)
    assert not torch.allclose(ft(input_ids=ids).logits, want, atol=1e-4)  # the addition does something
    assert result.report["totals"]["parameters_changed"] == 0 and result.report["parameters_added"] == 32
    # The zero q/k/v biases the config needs are written but not counted as edits.
    assert result.report["totals"]["parameters_added"] == 32 and result.report["totals"]["tensors_added"] > 1


@torch.no_grad()
def test_default_coefficient_is_the_largest_the_benign_answers_tolerate(tiny_models, tmp_path):
    """c = 1 moves harmless prompts onto the harmful mean; the default c is the largest grid value
    whose addition raises the held-out benign answers' loss by at most utility_tolerance."""
    from transformers import AutoModelForCausalLM

    from realign.methods.refusal import COEFF_GRID

    cal = calibration()
    patch = api.prepare("refusal", tiny_models["aligned"], calibration=cal, device="cpu", params={"validation": 3})
    # the random tiny model's direction is small and harmless to its answers; the world's is as large
    # as the residual stream and breaks them at c = 1. Stand in for that with a large direction that
    # does hurt the benign answers here (the search does not look at where a direction came from)
    patch.tensors["directions"] = patch.tensors["directions"] * -200
    answers = patch.meta["validation_benign_answers"]
    assert [a[0] for a in answers] == patch.meta["validation_benign"] and all(a[1] == "w6 w7" for a in answers)
    ft = AutoModelForCausalLM.from_pretrained(tiny_models["finetuned"]).eval()
    tok = load_tokenizer(load_model(tiny_models["aligned"]))
    direction = patch.tensors["directions"][1].float()

    def loss(coeff: float) -> float:  # mean token loss of the benign answers, computed directly
        h = added(ft, "model.layers.1.self_attn.o_proj", coeff * direction)
        total, n = 0.0, 0
        for prompt, answer in answers:
            p = tok(format_prompt(tok, prompt, "auto"))["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"]
            logp = ft(input_ids=torch.tensor([p + a])).logits[0].double().log_softmax(-1)
            total -= float(sum(logp[len(p) - 1 + i, t] for i, t in enumerate(a)))
            n += len(a)
        h.remove()
        return total / n

    base = loss(0.0)
    tol = (loss(1.0) - base) / 4  # a tolerance that c = 1 breaks, so the search has to step down
    assert tol > 0
    result = api.apply(patch, tiny_models["finetuned"], tmp_path / "out",
                       params={"layer": 1, "utility_tolerance": tol}, device="cpu")
    c = result.report["coeff"]
    assert result.report["coeff_chosen_by"].startswith("validation search") and c < 1.0
    tried = result.report["search"]["per_layer"]["1"]["benign_loss_rise"]
    assert c in COEFF_GRID or c == 0.0
    for g in COEFF_GRID:
        if g > c:  # every larger c was tried and rejected
            assert loss(g) - base > tol and tried[f"{g:.4g}"] == pytest.approx(loss(g) - base, abs=1e-4)
    if c:
        assert loss(c) - base <= tol + 1e-6
    assert result.report["vector_norm"] == pytest.approx(c * float(direction.norm()), rel=1e-5)


def test_given_layer_through_cli_and_refusals(tiny_models, tmp_path):
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"prompt": e.prompt, "kind": e.kind, "safe_response": e.safe_response,
                                         "unsafe_response": e.unsafe_response, "response": e.response})
                             for e in calibration().examples) + "\n")
    out = tmp_path / "cli"
    r = runner.invoke(app, [str(x) for x in ("repair", "refusal", "-a", tiny_models["aligned"], "-f",
                                             tiny_models["lora"], "-c", cal, "--set", "layer=1", "--set",
                                             "coeff=2", "--device", "cpu", "-o", out)])
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "realign.json").read_text())
    assert prov["report"]["layer"] == 1 and prov["report"]["layer_chosen_by"] == "given"
    patch = api.prepare("refusal", tiny_models["aligned"], calibration=cal, device="cpu")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        bias1 = f.get_tensor("model.layers.1.self_attn.o_proj.bias")
        bias0 = f.get_tensor("model.layers.0.self_attn.o_proj.bias")
        q0 = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    assert torch.allclose(bias1, 2 * patch.tensors["directions"][1], atol=1e-6)
    assert not bias0.any() and not q0.any()

    def one_line(result, *fragments):
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert all(f in lines[0] for f in fragments), lines[0]

    one_line(runner.invoke(app, ["repair", "refusal", "-a", str(tiny_models["aligned"]), "-f",
                                 str(tiny_models["finetuned"]), "-o", str(tmp_path / "x")]), "--calibration")
    one_line(runner.invoke(app, ["repair", "refusal", "-a", str(tiny_models["aligned"]), "-f",
                                 str(tiny_models["finetuned"]), "-c", str(cal), "--set", "layer=7", "--device", "cpu",
                                 "-o", str(tmp_path / "x")]), "layer=7")
    mistral = save_tiny(tmp_path / "mistral", "mistral")  # no config flag for an o_proj bias
    one_line(runner.invoke(app, ["repair", "refusal", "-a", str(mistral), "-f", str(mistral), "-c", str(cal), "-o",
                                 str(tmp_path / "x")]), "mistral", "o_proj a bias", "mode=export")
    assert not (tmp_path / "x").exists()
    # where no bias can be baked, the export carries the direction for lm-evaluation-harness
    res = api.repair("refusal", mistral, mistral, tmp_path / "export", calibration=cal, device="cpu",
                     params={"mode": "export", "coeff": 3.0})
    steer = torch.load(tmp_path / "export" / "steering.pt", weights_only=True)
    mpatch = api.prepare("refusal", mistral, calibration=cal, device="cpu", params={"mode": "export"})
    layer = res.report["layer"]
    entry = steer[f"layers.{layer}.self_attn.o_proj"]
    assert list(steer) == [f"layers.{layer}.self_attn.o_proj"] and entry["steering_coefficient"] == 3.0
    assert torch.allclose(entry["steering_vector"], mpatch.tensors["directions"][layer], atol=1e-6)
    assert not list((tmp_path / "export").glob("*.safetensors"))
