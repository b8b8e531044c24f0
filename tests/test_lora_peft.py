"""realign reads a LoRA adapter exactly as PEFT loads it: for each adapter_config.json field, a real
adapter saved by PEFT on a tiny model, realign's dense view against PeftModel's logits (float32,
max difference < 1e-4), or a one-line refusal naming the field (CLI: exit ≠ 0, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from typer.testing import CliRunner

from realign import api
from realign.cli import app
from realign.errors import RealignError
from realign.sources import load_model

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 3, 7, 11, 20, 4, 30, 8]])  # rows 3, 5, 7 are the trainable tokens below
TOKENS = [3, 5, 7]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("peft-bases")
    made: dict[tuple[str, bool], Path] = {}

    def get(family: str, tied: bool) -> Path:
        if (family, tied) not in made:
            made[(family, tied)] = save_tiny(root / f"{family}-{int(tied)}", family=family, seed=11,
                                             tie_word_embeddings=tied)
        return made[(family, tied)]
    return get  # type: ignore[return-value]


def save_adapter(base: Path, out: Path, seed: int = 0, **config) -> Path:
    """A real PEFT adapter: every trainable tensor (factors, lora_B biases, saved modules, token
    rows) moved away from its initial value, so that each one shows in the logits."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config.setdefault("target_modules", ["q_proj", "v_proj", "o_proj", "down_proj"])
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def dense_logits(adapter: Path, base: Path) -> torch.Tensor:
    """A fresh transformers model holding realign's dense view: every tensor from Model.get, the
    config with the view's updates."""
    from transformers import AutoConfig, AutoModelForCausalLM

    view = load_model(adapter, base=base)
    config = AutoConfig.from_pretrained(base)
    for key, value in view.config_updates.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict({n: view.get(n) for n in view.tensor_names}, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), missing
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_same_model(adapter: Path, base: Path) -> None:
    want, got = peft_logits(base, adapter), dense_logits(adapter, base)
    plain = dense_logits_of_base(base)
    assert (want - plain).abs().max() > 1e-2, "the adapter must change the model for the test to mean anything"
    assert (want - got).abs().max() < 1e-4, float((want - got).abs().max())


def dense_logits_of_base(base: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=IDS).logits


# ----------------------------------------------------------------------------- the matrix: honoured
HONOURED = {
    # pattern keys are regular expressions matched at a dotted suffix; PEFT takes the FIRST match
    "alpha_pattern_regex": ("llama", False, {"alpha_pattern": {r"layers\.0\.self_attn\.(q|v)_proj": 32}}),
    "rank_pattern_regex": ("llama", False, {"rank_pattern": {r".*\.1\.mlp\.down_proj": 2}, "alpha_pattern": {
        r".*\.1\.mlp\.down_proj": 16}}),
    # (PEFT writes adapter_config.json with sorted keys: the order here is the order PEFT loads them in)
    "overlapping_keys_first_wins": ("llama", False, {"rank_pattern": {"layers.0.self_attn.q_proj": 2, "q_proj": 8},
                                                     "alpha_pattern": {"0.self_attn.q_proj": 2, "q_proj": 24}}),
    "use_rslora": ("llama", False, {"use_rslora": True, "r": 4, "lora_alpha": 6}),
    "lora_bias": ("qwen2", False, {"lora_bias": True, "target_modules": ["q_proj", "k_proj", "v_proj"]}),
    "bias_all": ("qwen2", False, {"bias": "all", "target_modules": ["q_proj", "v_proj"]}),
    "bias_lora_only": ("qwen2", False, {"bias": "lora_only", "target_modules": ["q_proj", "v_proj"]}),
    "modules_to_save_untied_head": ("llama", False, {"modules_to_save": ["lm_head"]}),
    "modules_to_save_tied_head": ("llama", True, {"modules_to_save": ["lm_head"]}),
    "modules_to_save_tied_embeddings": ("llama", True, {"modules_to_save": ["embed_tokens"]}),
    "modules_to_save_tied_embeddings_ensure_tying": ("llama", True, {"modules_to_save": ["embed_tokens"],
                                                                     "ensure_weight_tying": True}),
    "modules_to_save_gemma_head": ("gemma", True, {"modules_to_save": ["lm_head"]}),
    "trainable_tokens_untied": ("llama", False, {"trainable_token_indices": TOKENS}),
    "trainable_tokens_tied": ("llama", True, {"trainable_token_indices": TOKENS}),
    "trainable_tokens_by_module": ("llama", False, {"trainable_token_indices": {"embed_tokens": TOKENS}}),
    "lora_on_embeddings_untied": ("llama", False, {"target_modules": ["embed_tokens", "q_proj"]}),
    "lora_on_embeddings_tied": ("llama", True, {"target_modules": ["embed_tokens", "q_proj"]}),
}


@pytest.mark.parametrize("case", sorted(HONOURED))
def test_dense_view_equals_peft(bases, tmp_path, case):
    family, tied, config = HONOURED[case]
    base = bases(family, tied)
    adapter = save_adapter(base, tmp_path / case, **config)
    assert_same_model(adapter, base)


def test_a_dense_checkpoint_written_from_the_view_is_the_peft_model(bases, tmp_path):
    """The writer emits what the view adds (an untied head, lora_bias biases, token rows) and the
    config it needs: the written checkpoint reloads in transformers as PEFT's model."""
    from transformers import AutoModelForCausalLM

    for case in ("modules_to_save_tied_head", "lora_bias", "trainable_tokens_untied"):
        family, tied, config = HONOURED[case]
        base = bases(family, tied)
        adapter = save_adapter(base, tmp_path / case, **config)
        out = tmp_path / f"{case}-out"
        api.repair("resta", aligned=base, finetuned=adapter, out=out, base=base, params={"beta": 0.0},
                   output="checkpoint")
        with torch.no_grad():
            written = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits
        assert (written - peft_logits(base, adapter)).abs().max() < 1e-4, case


# ----------------------------------------------------------------------------- the matrix: refused
def _edit_config(adapter: Path, **changes) -> Path:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


REFUSED = {
    # field: (family, tied, PEFT config to save it with, or None: a plain adapter whose config is then edited)
    "use_dora": ({"use_dora": True}, None),
    "layer_replication": ({"layer_replication": [[0, 2], [1, 2]]}, None),
    "init_lora_weights": ({"init_lora_weights": "pissa"}, None),
    "alora_invocation_tokens": ({"alora_invocation_tokens": [5, 6]}, None),
    "lora_bias": ({"lora_bias": True}, None),  # on a Llama: its projections have no bias to merge into
    "fan_in_fan_out": (None, {"fan_in_fan_out": True}),
    "use_qalora": (None, {"use_qalora": True}),
    "target_parameters": (None, {"target_parameters": ["self_attn.q_proj.weight"]}),
    "peft_type": (None, {"peft_type": "IA3"}),
    "a_field_realign_does_not_know": (None, {"a_field_realign_does_not_know": {"x": 1}}),
}


def make_refused(base: Path, dst: Path, field: str) -> Path:
    saved, edits = REFUSED[field]
    adapter = save_adapter(base, dst, **(saved or {}))
    return _edit_config(adapter, **(edits or {}))


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_fields_realign_cannot_honour_are_refused_in_one_line(bases, tmp_path, field):
    base = bases("llama", False)
    adapter = make_refused(base, tmp_path / "adapter", field)
    with pytest.raises(RealignError) as err:
        load_model(adapter, base=base)
    msg = str(err.value)
    assert "\n" not in msg and field.replace("peft_type", "IA3") in msg, msg
    # the CLI: one line, exit ≠ 0, nothing written
    out = tmp_path / "out"
    r = runner.invoke(app, ["repair", "revert", "-a", str(base), "-f", str(adapter), "--finetuned-base", str(base),
                            "-o", str(out)])
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output and not out.exists()


def test_a_tensor_realign_does_not_know_is_refused(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    base = bases("llama", False)
    adapter = save_adapter(base, tmp_path / "a")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2, 2)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(RealignError, match="lora_C"):
        load_model(adapter, base=base)


def test_factors_of_another_rank_than_the_config_gives_are_refused(bases, tmp_path):
    """PEFT could not load them, and their scale would be wrong."""
    base = bases("llama", False)
    adapter = _edit_config(save_adapter(base, tmp_path / "a"), rank_pattern={"o_proj": 8})
    with pytest.raises(RealignError, match="rank-4 factors but adapter_config.json gives it r = 8"):
        load_model(adapter, base=base)


def test_eval_of_a_lora_bias_adapter_is_not_a_traceback(bases, tmp_path):
    """realign eval merges adapters with PEFT: over projections with biases it runs (and computes
    PEFT's model); over projections without, PEFT's merge would raise, and realign refuses in one line."""
    from realign.compute import load_model as load_for_running

    data = tmp_path / "harmful.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}", "is_safe": False}) + "\n" for i in range(3)))
    biased = save_tiny(tmp_path / "biased", seed=12, attention_bias=True)  # a Llama with q/k/v/o biases
    adapter = save_adapter(biased, tmp_path / "biased-lora", lora_bias=True, target_modules=["q_proj", "o_proj"])
    model, _tok = load_for_running(str(adapter), device="cpu", dtype="float32")
    assert_same_model(adapter, biased)
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - peft_logits(biased, adapter)).abs().max() < 1e-4
    refused = save_adapter(bases("llama", False), tmp_path / "llama", lora_bias=True)
    for evaluated, ok in ((adapter, True), (refused, False)):
        out = tmp_path / f"{evaluated.name}.json"
        r = runner.invoke(app, ["eval", str(evaluated), "-o", str(out), "--suite", "harmful", "--data",
                                f"harmful={data}", "--limit", "2", "--device", "cpu", "--template", "raw",
                                "--judge", "keywords"])
        assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
        if ok:
            assert r.exit_code == 0 and out.exists(), r.output
        else:
            lines = [line for line in r.output.strip().splitlines() if line.strip()]
            assert r.exit_code != 0 and len(lines) == 1 and "lora_bias" in lines[0], r.output
            assert not out.exists()


def test_realign_adapter_outputs_keep_their_exact_keys_first(tiny_models, tmp_path):
    """A full-rank adapter output names its modules exactly in rank/alpha_pattern, before the
    fine-tune's own (PEFT takes the first matching key): PEFT loads it, with realign's logits."""
    from realign.writer import full_rank_adapter, write_adapter

    lora = tmp_path / "lora"
    shutil.copytree(tiny_models["lora"], lora)
    _edit_config(lora, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2},
                 base_model_name_or_path=str(tiny_models["aligned"]))
    ft = load_model(lora)
    name = "model.layers.0.self_attn.q_proj.weight"
    edit = full_rank_adapter(ft, {name.removesuffix(".weight"): (name, *ft.shape(name))},
                             {name: lambda w: w * 0.5})
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(out, {**edit["config"], "base_model_name_or_path": str(tiny_models["aligned"])},
                  dict(edit["tensors"]))
    assert list(edit["config"]["rank_pattern"])[0] == name.removesuffix(".weight")
    view = load_model(out)
    assert torch.allclose(view.get(name), ft.get(name) * 0.5, atol=1e-5)
    assert (peft_logits(tiny_models["aligned"], out) - dense_logits(out, tiny_models["aligned"])).abs().max() < 1e-4
