"""Baked checkpoints and the servers that load them: per family in the architecture map, a bake is
written only where every targeted server (transformers, vLLM) applies it, the report says which
server does what, and the refusal is one line naming the family, the server and the ways out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_tokenizer
from typer.testing import CliRunner

from realign import api, bake
from realign.archs import FAMILIES, arch_from_config
from realign.cli import app
from realign.errors import RealignError
from realign.methods import REGISTRY
from realign.methods.base import Edit, Inputs, Method, Patch, param
from realign.serving import SERVE_CHOICES, SERVERS, SUPPORT, bake_support
from realign.sources import Model, load_model

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
# tiny configs for every family of the architecture map (Gemma-likes need head_dim ≠ hidden/heads)
EXTRA = {"qwen3": {"head_dim": 12}, "gemma": {"head_dim": 12},
         "gemma2": {"head_dim": 12, "query_pre_attn_scalar": 12, "sliding_window": 16},
         "gemma3_text": {"head_dim": 12, "query_pre_attn_scalar": 12, "sliding_window": 16},
         "mistral": {"sliding_window": None}, "phi3": {"pad_token_id": 0}}


def save_family(directory: Path, family: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **EXTRA.get(family, {}))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def vectors_of(model: Model) -> dict[int, object]:
    g = torch.Generator().manual_seed(5)
    vecs = {0: torch.randn(model.arch.hidden_size, generator=g), 1: torch.randn(model.arch.hidden_size, generator=g)}
    return {layer: (lambda v=v: v.clone()) for layer, v in vecs.items()}


@dataclass
class _Params:
    serve: str = param("all", "servers", stage="apply", choices=SERVE_CHOICES)


class _BakeO(Method):
    """A throwaway method: baked o_proj additions at layers 0 and 1, for the servers asked."""

    name = "_serve_test"
    title = "test"
    Params = _Params

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: _Params) -> Edit:
        return bake.o_bias_edit(finetuned, vectors_of(finetuned), self.name, serve=params.serve)


@pytest.fixture
def method():
    REGISTRY[_BakeO.name] = _BakeO
    yield _BakeO.name
    REGISTRY.pop(_BakeO.name, None)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def hooked_logits(src: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    vecs = {f"model.layers.{layer}.self_attn.o_proj": f() for layer, f in vectors_of(load_model(src)).items()}
    with bake.add_to_outputs(ref, vecs):
        return logits(ref)


def test_the_table_covers_the_architecture_map_and_agrees_with_its_config_flags():
    assert set(SUPPORT) == set(FAMILIES)
    for family, spec in FAMILIES.items():
        assert bake_support(family, "o_proj")["transformers"] == (spec["o_bias_flag"] is not None), family
        assert bake_support(family, "down_proj")["transformers"] == (spec.get("mlp_bias_flag") is not None), family
        for projection in ("o_proj", "down_proj"):
            support = bake_support(family, projection)
            assert set(support) == set(SERVERS)
            assert support["transformers"] or not support["vllm"], "vLLM keeps no bias transformers cannot load"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_o_proj_bake_per_family(tmp_path, method, family):
    from transformers import AutoModelForCausalLM

    src = save_family(tmp_path / "src", family)
    support = bake_support(family, "o_proj")
    out = tmp_path / "out"
    if not support["transformers"]:  # no config can carry the bias: refused whatever the servers
        for serve in SERVE_CHOICES:
            with pytest.raises(RealignError) as err:
                api.repair(method, aligned=src, finetuned=src, out=out, params={"serve": serve})
            msg = str(err.value)
            assert "\n" not in msg and family in msg and "export" in msg and "hooks" in msg
        assert not out.exists()
        return
    if not support["vllm"]:  # transformers keeps it, vLLM would serve the model without it
        with pytest.raises(RealignError) as err:
            api.repair(method, aligned=src, finetuned=src, out=out)
        msg = str(err.value)
        assert "\n" not in msg and family in msg and "vllm" in msg and "vLLM builds" in msg
        assert "mode=export" in msg and "hooks" in msg and "--set serve=transformers" in msg
        with pytest.raises(RealignError, match="vllm"):
            api.repair(method, aligned=src, finetuned=src, out=out, params={"serve": "vllm"})
        assert not out.exists()
        result = api.repair(method, aligned=src, finetuned=src, out=out, params={"serve": "transformers"})
        servers = result.report["bake"]["servers"]
        assert servers["transformers"] == "applies the bake" and servers["vllm"].startswith("does NOT")
        assert "WITHOUT the bake" in (out / "README.md").read_text()  # the model card says it
    else:
        result = api.repair(method, aligned=src, finetuned=src, out=out)
        assert result.report["bake"]["servers"] == {s: "applies the bake" for s in SERVERS}
        assert "WITHOUT" not in (out / "README.md").read_text()
    arch = arch_from_config(json.loads((out / "config.json").read_text()))
    assert json.loads((out / "config.json").read_text())[arch.o_bias_flag] is True
    baked = logits(AutoModelForCausalLM.from_pretrained(out).eval())
    assert torch.allclose(baked, hooked_logits(src), atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_down_proj_bake_per_family(tmp_path, family):
    """The refusal baseline's bake (a down_proj bias): written only where both servers keep it."""
    model = load_model(save_family(tmp_path / "src", family))
    support = bake_support(family, "down_proj")
    if not all(support.values()):
        with pytest.raises(RealignError) as err:
            bake.block_output_edit(model, vectors_of(model), "refusal")
        assert "\n" not in str(err.value) and family in str(err.value) and "export" in str(err.value)
        return
    edit = bake.block_output_edit(model, vectors_of(model), "refusal")
    assert edit.report["bake"]["servers"] == {s: "applies the bake" for s in SERVERS}


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path, method):
    src = save_family(tmp_path / "src", "qwen3")
    out = tmp_path / "out"
    r = runner.invoke(app, ["repair", method, "-a", str(src), "-f", str(src), "-o", str(out)])
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "qwen3" in lines[0], r.output
    assert not out.exists()
    r = runner.invoke(app, ["repair", method, "-a", str(src), "-f", str(src), "-o", str(out),
                            "--set", "serve=transformers"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "realign.json").read_text())["report"]["bake"]["servers"]["vllm"].startswith("does NOT")
