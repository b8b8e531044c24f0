"""The refusal-direction baseline: the direction, the layer search and the baked bias against direct
computations on the tiny models; the direction is read and added at the same point (the input of
layer l); refusal on families whose config cannot carry the bias."""

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
from realign.errors import RealignError
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


def layer_inputs(model, tok, prompt: str) -> list[torch.Tensor]:
    """The residual stream entering each decoder layer (its input), at every position."""
    ids = tok(format_prompt(tok, prompt, "auto"))["input_ids"]
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"])[0].double()), with_kwargs=True) for layer in model.model.layers]
    model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return seen


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
    # r_l = mean over the harmful − mean over the benign prompts prepare sees (the held-out rows are the
    # tuning's), of the input of layer l at the last prompt token
    seen, heldout = split_heldout(cal)
    assert heldout is not None and not {e.prompt for e in heldout.examples} & {e.prompt for e in seen.examples}
    aligned = AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]).eval()
    hh = [torch.stack([h[-1] for h in layer_inputs(aligned, tok, e.prompt)]) for e in seen.harmful()]
    hb = [torch.stack([h[-1] for h in layer_inputs(aligned, tok, e.prompt)]) for e in seen.benign()]
    direct = torch.stack(hh).mean(0) - torch.stack(hb).mean(0)
    assert torch.allclose(patch.tensors["directions"].double(), direct, atol=1e-5)

    # no layer given: the tuning loop chooses it among the layers ≥ 1 (skip_last=0), c fixed as given
    ft = AutoModelForCausalLM.from_pretrained(tiny_models["finetuned"]).eval()
    coeff = 4.0
    result = api.apply(tmp_path / "patch", tiny_models["finetuned"], tmp_path / "out",
                       params={"skip_last": 0.0, "coeff": coeff}, device="cpu")
    tuning = result.report["tuning"]
    assert [row["setting"] for row in tuning["candidates"]] == [{"layer": 1}]
    best = result.report["layer"]
    assert tuning["chosen"] == {"layer": best} and result.report["coeff"] == coeff

    # the baked checkpoint reloads with stock transformers and equals the fine-tune with c·r_l added to
    # the output of layer l − 1
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["mlp_bias"] is True
    repaired = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([tok(format_prompt(tok, "w10 w11 w99 w5", "auto"))["input_ids"]])
    h = added(ft, f"model.layers.{best - 1}", coeff * direct[best].float())
    want = ft(input_ids=ids).logits
    h.remove()
    assert torch.allclose(repaired(input_ids=ids).logits, want, atol=1e-4)
    assert not torch.allclose(ft(input_ids=ids).logits, want, atol=1e-4)  # the addition does something
    assert result.report["totals"]["parameters_changed"] == 0 and result.report["parameters_added"] == 32
    # The zero gate/up/down biases the config needs are written but not counted as edits.
    assert result.report["totals"]["parameters_added"] == 32 and result.report["totals"]["tensors_added"] == 6


@torch.no_grad()
def test_the_direction_is_read_and_added_at_the_same_point(tiny_models, tmp_path):
    """The hook point of the official code: r_l is read at the input of layer l, and c·r_l is added to
    that same tensor, at every position (the earlier layers' inputs are unchanged): in the baked
    checkpoint and with the hooks the tuning loop and the export use."""
    from transformers import AutoModelForCausalLM

    from realign.bake import add_to_outputs
    from realign.methods.refusal import additions

    tiny = save_tiny(tmp_path / "tiny3", layers=3)  # layers 1 and 2 can both take the direction
    cal = calibration()
    patch = api.prepare("refusal", tiny, calibration=cal, device="cpu")
    tok = load_tokenizer(load_model(tiny))
    ft = AutoModelForCausalLM.from_pretrained(tiny).eval()
    arch = load_model(tiny).arch
    prompt = "w10 w11 w99 w5 w60"
    plain = layer_inputs(ft, tok, prompt)
    for layer, coeff in ((1, 0.5), (2, 2.0)):
        r = patch.tensors["directions"][layer].double()
        api.repair("refusal", tiny, tiny, tmp_path / f"l{layer}", calibration=cal, device="cpu",
                   params={"layer": layer, "coeff": coeff})
        baked = layer_inputs(AutoModelForCausalLM.from_pretrained(tmp_path / f"l{layer}").eval(), tok, prompt)
        with add_to_outputs(ft, additions(patch, arch, layer, coeff)):
            hooked = layer_inputs(ft, tok, prompt)
        for got in (baked, hooked):
            for l_read in range(layer):
                assert torch.allclose(got[l_read], plain[l_read], atol=1e-6)  # nothing earlier moves
            # the tensor r_l was read from is the one that moves, by c·r_l at every position
            assert torch.allclose(got[layer] - plain[layer], (coeff * r).expand_as(plain[layer]), atol=1e-5)


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
        down0 = f.get_tensor("model.layers.0.mlp.down_proj.bias")  # layer 1's input is layer 0's output
        down1 = f.get_tensor("model.layers.1.mlp.down_proj.bias")
        gate0 = f.get_tensor("model.layers.0.mlp.gate_proj.bias")
    assert torch.allclose(down0, 2 * patch.tensors["directions"][1], atol=1e-6)
    assert not down1.any() and not gate0.any()

    def one_line(result, *fragments):
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert all(f in lines[0] for f in fragments), lines[0]

    one_line(runner.invoke(app, ["repair", "refusal", "-a", str(tiny_models["aligned"]), "-f",
                                 str(tiny_models["finetuned"]), "-o", str(tmp_path / "x")]), "--calibration")
    one_line(runner.invoke(app, ["repair", "refusal", "-a", str(tiny_models["aligned"]), "-f",
                                 str(tiny_models["finetuned"]), "-c", str(cal), "--set", "layer=7", "--device", "cpu",
                                 "-o", str(tmp_path / "x")]), "layer=7")
    one_line(runner.invoke(app, ["repair", "refusal", "-a", str(tiny_models["aligned"]), "-f",
                                 str(tiny_models["finetuned"]), "-c", str(cal), "--set", "layer=0", "--set", "coeff=1",
                                 "--device", "cpu", "-o", str(tmp_path / "x")]), "layer=0", "embeddings")
    mistral = save_tiny(tmp_path / "mistral", "mistral")  # no config flag for a down_proj bias
    one_line(runner.invoke(app, ["repair", "refusal", "-a", str(mistral), "-f", str(mistral), "-c", str(cal), "-o",
                                 str(tmp_path / "x")]), "mistral", "down_proj a bias", "mode=export")
    assert not (tmp_path / "x").exists()
    # where no bias can be baked, the export carries the direction for lm-evaluation-harness
    res = api.repair("refusal", mistral, mistral, tmp_path / "export", calibration=cal, device="cpu",
                     params={"mode": "export", "coeff": 3.0})
    steer = torch.load(tmp_path / "export" / "steering.pt", weights_only=True)
    mpatch = api.prepare("refusal", mistral, calibration=cal, device="cpu", params={"mode": "export"})
    layer = res.report["layer"]
    entry = steer[f"layers.{layer - 1}"]  # the output of layer l − 1 is the input of layer l
    assert list(steer) == [f"layers.{layer - 1}"] and entry["steering_coefficient"] == 3.0
    assert torch.allclose(entry["steering_vector"], mpatch.tensors["directions"][layer], atol=1e-6)
    assert not list((tmp_path / "export").glob("*.safetensors"))
    # a patch whose directions were read at each layer's output (before the official hook point)
    from realign.methods import get_method
    from realign.methods.base import Patch, build_params

    old = Patch("refusal", mpatch.params, {k: v for k, v in mpatch.meta.items() if k != "read_at"}, mpatch.tensors)
    m = get_method("refusal")
    with pytest.raises(RealignError, match="prepare it again"):
        m.apply(old, load_model(mistral), None, build_params(m.Params, {"mode": "export", "layer": 1, "coeff": 1.0}))
