"""bake: vectors added to attention outputs as hooks, in-memory biases, baked checkpoints (reloaded
with stock transformers) and lm-evaluation-harness steering files — all the same addition."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM

from realign import api, bake
from realign.errors import RealignError
from realign.methods import REGISTRY
from realign.methods.base import Edit, Inputs, Method, Patch
from realign.sources import Model, load_model

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 31, 32, 33, 34, 35, 36]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def o_name(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.o_proj"


def test_output_vector_reads_only_the_nonzero_columns():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    sparse = torch.zeros(40)
    sparse[8:16] = torch.randn(8, generator=g)
    dense = torch.randn(40, generator=g)
    for d in (sparse, dense, torch.zeros(40)):
        assert torch.allclose(bake.output_vector(w, d), w @ d, atol=1e-5)
    assert torch.allclose(bake.output_vector(w.bfloat16(), sparse), w.bfloat16().float() @ sparse, atol=1e-4)
    with pytest.raises(RealignError):
        bake.output_vector(w, torch.ones(12))


def test_input_hooks_output_hooks_and_biases_agree_and_are_removed(tmp_path):
    save_tiny(tmp_path / "m", seed=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    plain = logits(model)
    g = torch.Generator().manual_seed(1)
    disp = {o_name(0): torch.randn(32, generator=g), o_name(1): torch.zeros(32)}
    disp[o_name(1)][8:16] = torch.randn(8, generator=g)
    out_vecs = {n: bake.output_vector(model.get_submodule(n).weight, d) for n, d in disp.items()}
    with bake.add_to_inputs(model, disp):
        via_inputs = logits(model)
    assert torch.equal(logits(model), plain)  # hooks removed
    with bake.add_to_outputs(model, out_vecs):
        via_outputs = logits(model)
    with bake.biased(model, out_vecs):
        assert model.get_submodule(o_name(0)).bias is not None
        via_bias = logits(model)
    assert model.get_submodule(o_name(0)).bias is None  # restored
    assert torch.equal(logits(model), plain)
    assert not torch.allclose(via_inputs, plain, atol=1e-3)
    assert torch.allclose(via_inputs, via_outputs, atol=1e-5)
    assert torch.allclose(via_inputs, via_bias, atol=1e-5)
    with pytest.raises(RealignError, match="no module"):
        with bake.add_to_inputs(model, {"model.layers.9.self_attn.o_proj": torch.zeros(32)}):
            pass


def test_install_biases_adds_to_an_existing_bias_and_restores_it(tmp_path):
    save_tiny(tmp_path / "m", seed=4, attention_bias=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    module = model.get_submodule(o_name(1))
    with torch.no_grad():
        module.bias.copy_(torch.linspace(-1, 1, 32))
    old = module.bias.detach().clone()
    vec = torch.arange(32, dtype=torch.float32)
    restore = bake.install_biases(model, {o_name(1): vec})
    assert torch.allclose(module.bias, old + vec)
    restore()
    assert torch.equal(module.bias, old)


# ----------------------------------------------------------------------------- baked checkpoints
@dataclass
class _VecParams:
    seed: int = 0


class _AddVectors(Method):
    """A throwaway method: adds seeded random vectors at the o_proj outputs of layers 0 and 1."""

    name = "_bake_test"
    title = "test"
    Params = _VecParams

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: _VecParams) -> Edit:
        # transformers only: this file checks reloads in transformers (tests/test_serving.py: per server)
        return bake.o_bias_edit(finetuned, VECTORS_OF(finetuned), self.name, serve="transformers")


def VECTORS_OF(model: Model) -> dict[int, object]:  # noqa: N802 — a constant-like factory
    hidden = model.arch.hidden_size
    g = torch.Generator().manual_seed(5)
    vecs = {0: torch.randn(hidden, generator=g), 1: torch.randn(hidden, generator=g)}
    return {layer: (lambda v=v: v.clone()) for layer, v in vecs.items()}


@pytest.fixture
def vec_method():
    REGISTRY[_AddVectors.name] = _AddVectors
    yield _AddVectors.name
    REGISTRY.pop(_AddVectors.name, None)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("llama", {"attention_bias": True}),
                                              ("gemma", {}), ("qwen3", {})])
def test_baked_checkpoint_reloads_with_the_addition(tmp_path, vec_method, family, overrides):
    src = save_tiny(tmp_path / "src", family=family, seed=6, **overrides)
    if overrides.get("attention_bias"):  # existing o biases must be added to, not replaced
        m = AutoModelForCausalLM.from_pretrained(src)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_()
        m.save_pretrained(src)
    out = tmp_path / "out"
    api.repair(vec_method, aligned=src, finetuned=src, out=out)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True
    baked = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    vecs = {o_name(layer): f() for layer, f in VECTORS_OF(load_model(src)).items()}
    with bake.add_to_outputs(ref, vecs):
        hooked = logits(ref)
    assert torch.allclose(logits(baked), hooked, atol=1e-5)
    assert not torch.allclose(logits(ref), hooked, atol=1e-3)


def test_baked_checkpoint_from_a_lora_finetune(tiny_models, tmp_path, vec_method):
    from peft import PeftModel

    out = tmp_path / "out"
    result = api.repair(vec_method, aligned=tiny_models["aligned"], finetuned=tiny_models["lora"], out=out)
    assert result.output == "checkpoint"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]),
                                       tiny_models["lora"]).merge_and_unload().eval()
    vecs = {o_name(layer): f() for layer, f in VECTORS_OF(load_model(tiny_models["aligned"])).items()}
    with bake.add_to_outputs(merged, vecs):
        hooked = logits(merged)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), hooked, atol=1e-5)


def test_checkpoint_without_the_flag_loses_the_addition(tmp_path, vec_method):
    """What a save that forgets the config flag gives: stock transformers drops the biases."""
    src = save_tiny(tmp_path / "src", seed=7)
    out = tmp_path / "out"
    api.repair(vec_method, aligned=src, finetuned=src, out=out)
    flagless = tmp_path / "flagless"
    shutil.copytree(out, flagless)
    config = json.loads((flagless / "config.json").read_text())
    config["attention_bias"] = False
    (flagless / "config.json").write_text(json.dumps(config))
    reloaded = logits(AutoModelForCausalLM.from_pretrained(flagless).eval())
    assert torch.equal(reloaded, logits(AutoModelForCausalLM.from_pretrained(src).eval()))
    assert not torch.allclose(reloaded, logits(AutoModelForCausalLM.from_pretrained(out).eval()), atol=1e-3)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3"])
def test_families_without_an_o_bias_are_refused_naming_the_alternatives(tmp_path, vec_method, family):
    src = save_tiny(tmp_path / "src", family=family, seed=8)
    with pytest.raises(RealignError) as err:
        api.repair(vec_method, aligned=src, finetuned=src, out=tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and family in msg and "hooks" in msg and "export" in msg
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- lm-eval export
def lm_eval_steer(model, path):
    """lm-evaluation-harness's `steered` model, as it reads a .pt steer file: hookpoints are
    resolved in model.base_model.named_modules(); `add` adds coefficient · vector to the output."""
    config = torch.load(path, weights_only=True)
    hooks = {}
    for hookpoint, info in config.items():
        assert info["action"] == "add" and info["bias"] is None and info["head_index"] is None
        hooks[hookpoint] = info["steering_vector"] * float(info["steering_coefficient"])
    handles = []
    for name, module in model.base_model.named_modules():
        if name in hooks:
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, v=hooks[name]: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v))
    assert len(handles) == len(hooks), f"unresolved hookpoints: {list(hooks)}"
    return handles


def test_steering_file_is_what_lm_eval_reads(tmp_path, tiny_models):
    from peft import PeftModel

    aligned = load_model(tiny_models["aligned"])
    g = torch.Generator().manual_seed(9)
    vecs = {1: torch.randn(32, generator=g), 0: torch.randn(32, generator=g)}
    for peft in (False, True):
        config = bake.steering_config(aligned.arch, vecs, coefficient=2.5, peft=peft)
        path = tmp_path / f"steer{int(peft)}.pt"
        path.write_bytes(bake.steering_bytes(config))
        if peft:
            assert list(config) == ["model.model.layers.0.self_attn.o_proj", "model.model.layers.1.self_attn.o_proj"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]),
                                              tiny_models["lora"]).eval()
        else:
            assert list(config) == ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]
            model = AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]).eval()
        plain = logits(model)
        expected_vecs = {o_name(layer): 2.5 * v for layer, v in vecs.items()}
        with bake.add_to_outputs(model, expected_vecs):
            expected = logits(model)
        handles = lm_eval_steer(model, path)
        steered = logits(model)
        for h in handles:
            h.remove()
        assert torch.allclose(steered, expected, atol=1e-5) and not torch.allclose(steered, plain, atol=1e-3)
    loaded = torch.load(io.BytesIO(bake.steering_bytes(config)), weights_only=True)
    assert isinstance(loaded, dict) and loaded[list(config)[0]]["steering_vector"].dtype == torch.float32


def test_layers_outside_the_model_are_refused(tiny_models):
    model = load_model(tiny_models["aligned"])
    with pytest.raises(RealignError, match="layer 5"):
        bake.o_bias_edit(model, {5: lambda: torch.zeros(32)}, "x")
