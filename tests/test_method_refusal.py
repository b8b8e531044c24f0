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
    for i in range(12):  # 12 of each kind: 2 are held out for the tuning loop
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
def test_direction_tuned_layer_and_bake_match_direct(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from realign.tuning import split_heldout

    cal = calibration()
    patch = api.prepare("refusal", tiny_models["aligned"], tmp_path / "patch", calibration=cal, device="cpu")
    meta = patch.meta
    tok = load_tokenizer(load_model(tiny_models["aligned"]))
    assert meta["refusal_tokens"] == tok("w1", add_special_tokens=False)["input_ids"]  # the refusal opening only
    # r_l = mean over the harmful − mean over the benign prompts prepare sees (the held-out rows are the tuning's)
    seen, heldout = split_heldout(cal)
    assert heldout is not None and not {e.prompt for e in heldout.examples} & {e.prompt for e in seen.examples}
    aligned = AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]).eval()
    hh = [torch.stack(last_hidden(aligned, tok, e.prompt)) for e in seen.harmful()]
    hb = [torch.stack(last_hidden(aligned, tok, e.prompt)) for e in seen.benign()]
    direct = torch.stack(hh).mean(0) - torch.stack(hb).mean(0)
    assert torch.allclose(patch.tensors["directions"].double(), direct, atol=1e-5)

    # no layer given: the tuning loop chooses it among every layer (skip_last=0), c fixed as given
    ft = AutoModelForCausalLM.from_pretrained(tiny_models["finetuned"]).eval()
    coeff = 4.0
    result = api.apply(tmp_path / "patch", tiny_models["finetuned"], tmp_path / "out",
                       params={"skip_last": 0.0, "coeff": coeff}, device="cpu")
    tuning = result.report["tuning"]
    assert [row["setting"] for row in tuning["candidates"]] == [{"layer": 0}, {"layer": 1}]
    best = result.report["layer"]
    assert tuning["chosen"] == {"layer": best} and result.report["coeff"] == coeff

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


def test_apply_without_the_tuning_loop_needs_layer_and_coeff(tiny_models):
    from realign.methods import get_method
    from realign.methods.base import build_params

    m = get_method("refusal")
    p = build_params(m.Params, {"layer": 1})
    assert m.must_tune(p) == ["coeff"]
    with pytest.raises(Exception, match="chosen by the tuning loop"):
        m.apply(api.prepare("refusal", tiny_models["aligned"], calibration=calibration(), device="cpu"),
                load_model(tiny_models["finetuned"]), None, p)


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
    assert prov["report"]["layer"] == 1 and "tuning" not in prov["report"]
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
