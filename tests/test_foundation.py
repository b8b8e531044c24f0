"""Foundation: sources, streaming I/O, architecture map, writer, calibration format, CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_CONFIGS, make_tokenizer, save_tiny
from safetensors import safe_open
from typer.testing import CliRunner

from realign import api
from realign.archs import arch_from_config
from realign.calibration import load_calibration
from realign.cli import app
from realign.errors import RealignError
from realign.methods.base import Edit
from realign.sources import load_model
from realign.tensorio import OutTensor, dtype_name, write_sharded

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


# ----------------------------------------------------------------------------- architecture map
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_arch_map_matches_real_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / family, family)
    model = load_model(path)
    arch = model.arch
    torch_model = AutoModelForCausalLM.from_pretrained(path)
    # every mapped weight exists with the shape the head sizes imply
    for layer, role, name in arch.linear_weights():
        assert name in model, name
        assert tuple(torch_model.get_submodule(arch.module_name(layer, role)).weight.shape) == model.shape(name)
    o_in = model.shape(arch.weight_name(0, "o"))[1]
    assert o_in == arch.num_heads * arch.head_dim
    if family in ("qwen3", "gemma", "gemma2"):
        assert arch.head_dim == 12 != arch.hidden_size // arch.num_heads  # read from config, not assumed
    assert arch.num_kv_heads == 2


def test_unknown_family_lists_supported():
    with pytest.raises(RealignError, match="supported: .*llama.*qwen2"):
        arch_from_config({"model_type": "gpt2", "n_layer": 2})


# ----------------------------------------------------------------------------- streaming I/O
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    src = save_tiny(tmp_path / "src", max_shard_size="20KB", dtype=dtype)
    assert (src / "model.safetensors.index.json").exists()
    model = load_model(src)
    copied = [OutTensor(n, dtype_name(model.dtype(n)), model.shape(n), copy_from=model.weights.info(n))
              for n in model.tensor_names]
    produced = [OutTensor(n, dtype_name(model.dtype(n)), model.shape(n), produce=lambda n=n: model.get(n))
                for n in model.tensor_names]
    for name, specs in (("copied", copied), ("produced", produced)):
        out = tmp_path / name
        out.mkdir()
        files = write_sharded(out, specs, max_shard_bytes=30_000)
        assert len(files) > 1 and (out / "model.safetensors.index.json").exists()
        a, b = all_tensors(src), all_tensors(out)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype == dtype
            assert torch.equal(a[k].view(torch.uint8) if a[k].dim() else a[k], b[k].view(torch.uint8) if b[k].dim()
                               else b[k])


def test_lazy_lora_delta_equals_peft_merge(tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]),
                                       tiny_models["lora"]).merge_and_unload().state_dict()
    lazy = load_model(tiny_models["lora"])
    assert lazy.is_adapter and lazy.base is not None
    for name in lazy.tensor_names:
        assert torch.allclose(lazy.get(name), merged[name], atol=1e-6, rtol=0), name
    changed = [n for n in lazy.tensor_names if not torch.equal(lazy.get(n), lazy.base.get(n))]
    assert len(changed) == 2 * 7  # every linear weight of both layers


def test_rslora_and_rank_pattern_scale(tiny_models, tmp_path):
    lora = tmp_path / "rs"
    shutil.copytree(tiny_models["lora"], lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg.update(use_rslora=True, base_model_name_or_path=str(tiny_models["aligned"]))
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    model = load_model(lora)
    assert model.adapter.scale("model.layers.0.self_attn.q_proj") == pytest.approx(8 / math.sqrt(4))


def test_unsupported_adapter_types(tiny_models, tmp_path):
    for key, value, match in (("use_dora", True, "DoRA"), ("peft_type", "IA3", "IA3")):
        bad = tmp_path / key
        shutil.copytree(tiny_models["lora"], bad)
        cfg = json.loads((bad / "adapter_config.json").read_text())
        cfg[key] = value
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(RealignError, match=match):
            load_model(bad)


def test_pickle_refused_without_opt_in(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    pick = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["aligned"])
    model.save_pretrained(pick, safe_serialization=False) if _supports_pickle_save() else _save_bin(model, pick)
    assert not list(pick.glob("*.safetensors"))
    result = run_cli("inspect", pick)
    assert_one_line_error(result, "pickle", "--allow-pickle")
    opened = load_model(pick, allow_pickle=True)
    ref = load_model(tiny_models["aligned"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(opened.get(name), ref.get(name))


def _supports_pickle_save() -> bool:
    return False  # transformers 5 always writes safetensors; write the .bin ourselves


def _save_bin(model, directory: Path) -> None:
    directory.mkdir()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    model.config.save_pretrained(directory)


def test_hub_id_offline_gives_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("inspect", "some-org/not-cached-model")
    assert_one_line_error(result, "some-org/not-cached-model", "HF_HUB_OFFLINE")


# ----------------------------------------------------------------------------- revert, writer
def test_revert_through_cli_loads_with_transformers(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "reverted"
    result = run_cli("repair", "revert", "--aligned", tiny_models["aligned"], "--finetuned",
                     tiny_models["finetuned"], "--base", tiny_models["base"], "--out", out)
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    aligned = AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]).state_dict()
    for k in aligned:
        assert torch.equal(reloaded[k], aligned[k]), k
    prov = json.loads((out / "realign.json").read_text())
    assert prov["method"] == "revert" and prov["version"]
    assert all(len(h) == 64 for h in prov["inputs"]["aligned"]["sha256"].values())
    assert prov["inputs"]["finetuned"]["sha256"]
    assert any("--base was given but revert does not use it" in n for n in prov["report"]["notes"])
    assert (out / "README.md").read_text().startswith("---")
    assert (out / "tokenizer.json").exists()
    assert prov["report"]["totals"]["parameters_changed"] > 0
    # existing output is refused without --force and replaced with it
    again = run_cli("repair", "revert", "-a", tiny_models["aligned"], "-f", tiny_models["finetuned"], "-o", out)
    assert_one_line_error(again, "already exists", "--force")
    forced = run_cli("repair", "revert", "-a", tiny_models["aligned"], "-f", tiny_models["finetuned"], "-o", out,
                     "--force")
    assert forced.exit_code == 0, forced.output


def test_revert_of_lora_finetune_and_prepare_apply(tiny_models, tmp_path):
    patch = tmp_path / "patch"
    r = run_cli("prepare", "revert", "--aligned", tiny_models["aligned"], "--out", patch)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    r = run_cli("apply", patch, "--finetuned", tiny_models["lora"], "--out", out)
    assert r.exit_code == 0, r.output
    a, b = all_tensors(out), all_tensors(tiny_models["aligned"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_write_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    from realign.methods.revert import Revert

    calls = {"n": 0}

    def failing_apply(self, patch, finetuned, inputs, params):
        def boom(old):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return old
        return Edit(transforms={n: boom for n in finetuned.tensor_names})

    monkeypatch.setattr(Revert, "apply", failing_apply)
    out = tmp_path / "never"
    result = run_cli("repair", "revert", "-a", tiny_models["aligned"], "-f", tiny_models["finetuned"], "-o", out)
    assert result.exit_code != 0
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no partial dir left either


def test_inputs_are_never_modified(tiny_models, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in tiny_models["finetuned"].iterdir()}
    api.repair("revert", tiny_models["aligned"], tiny_models["finetuned"], tmp_path / "o")
    assert {p: p.stat().st_mtime_ns for p in tiny_models["finetuned"].iterdir()} == before


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_give_one_line_errors(tiny_models, tmp_path):
    a, f = tiny_models["aligned"], tiny_models["finetuned"]
    assert_one_line_error(run_cli("inspect", tmp_path / "missing"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("inspect", tmp_path / "empty"), "is not a model")
    # an adapter on a base of another shape
    other = save_tiny(tmp_path / "wide", hidden=48, heads=4)
    assert_one_line_error(run_cli("inspect", tiny_models["lora"], "--base", other), "does not fit")
    # aligned and fine-tuned of different shapes
    assert_one_line_error(run_cli("repair", "revert", "-a", a, "-f", other, "-o", tmp_path / "x"), "does not match")
    # unknown family
    weird = tmp_path / "weird"
    shutil.copytree(a, weird)
    cfg = json.loads((weird / "config.json").read_text())
    cfg["model_type"] = "bert"
    (weird / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("inspect", weird), "unsupported model family", "llama")
    # unknown method, bad --set
    assert_one_line_error(run_cli("repair", "nope", "-a", a, "-f", f, "-o", tmp_path / "y"), "unknown method")
    assert_one_line_error(run_cli("repair", "revert", "-a", a, "-f", f, "-o", tmp_path / "z", "--set", "x"),
                          "KEY=VALUE")
    # malformed calibration line
    cal = tmp_path / "cal.jsonl"
    cal.write_text('{"prompt": "a", "kind": "harmful"}\n{"prompt": "b", "kind": "evil"}\n')
    assert_one_line_error(run_cli("repair", "revert", "-a", a, "-f", f, "-c", cal, "-o", tmp_path / "w"),
                          "cal.jsonl:2", "kind")
    cal.write_text('{"prompt": "a", "kind": "harmful"}\n{not json\n')
    assert_one_line_error(run_cli("repair", "revert", "-a", a, "-f", f, "-c", cal, "-o", tmp_path / "w"),
                          "cal.jsonl:2", "JSON")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- inspect, calibration
def test_inspect_reports_model_and_adapter(tiny_models):
    result = run_cli("inspect", tiny_models["lora"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["family"] == "llama" and info["layers"] == 2 and info["head_dim"] == 8
    assert info["adapter"]["r"] == 4 and info["adapter"]["modules"] == 14
    assert info["parameters"] == sum(p.numel() for p in _torch_params(tiny_models["aligned"]))


def _torch_params(path):
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(path).parameters())


def test_calibration_formats(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        {"prompt": "p1", "kind": "harmful", "safe_response": "I cannot", "unsafe_response": "Sure", "category": "x"},
        {"prompt": "p2", "kind": "benign", "response": "ok"},
        {"prompt": "p3", "chosen": "no", "rejected": "yes"},
        {"prompt": "p4", "response_0": "a", "response_1": "b", "is_response_0_safe": False,
         "is_response_1_safe": True},
        {"prompt": "p5", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
         "is_response_1_safe": True},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cal = load_calibration(path)
    assert len(cal) == 4 and len(cal.pairs()) == 3 and len(cal.benign()) == 1
    assert cal.pairs()[2].safe_response == "b" and cal.categories() == ["x"]
    path.write_text(json.dumps({"prompt": "p", "kind": "benign", "safe_response": "no"}) + "\n")
    with pytest.raises(RealignError, match=r"c.jsonl:1"):
        load_calibration(path)


def test_prompt_templates(tmp_path):
    from realign.prompts import format_prompt

    tok = make_tokenizer()
    assert "### Instruction:\nhello" in format_prompt(tok, "hello", "auto")  # no chat template → alpaca
    assert format_prompt(tok, "hello", "Q: {prompt}\nA:") == "Q: hello\nA:"
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }}{% endfor %} w1"
    assert format_prompt(tok, "hello", "auto") == "<s> hello w1"
    with pytest.raises(RealignError, match="template"):
        format_prompt(tok, "hello", "nonsense")


def test_console_script_error_is_one_line_and_nonzero(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "realign.cli", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_adapter_output_written_as_peft_adapter(tiny_models, tmp_path):
    """A method whose result is an adapter is written in PEFT's format and loads with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from realign.methods.revert import Revert
    from realign.sources import load_model as open_model

    lora = open_model(tiny_models["lora"])

    def adapter_apply(self, patch, finetuned, inputs, params):
        tensors = {n: finetuned.adapter.store.get(n) * 0.5 if "lora_B" in n else finetuned.adapter.store.get(n)
                   for n in finetuned.adapter.store.names}
        return Edit(adapter={"config": finetuned.adapter.config, "tensors": tensors}, dense=False)

    original = Revert.apply
    Revert.apply = adapter_apply
    try:
        result = api.repair("revert", tiny_models["aligned"], lora, tmp_path / "ad")
    finally:
        Revert.apply = original
    assert result.output == "adapter" and (tmp_path / "ad" / "adapter_config.json").exists()
    halved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["aligned"]),
                                       tmp_path / "ad").merge_and_unload().state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    expected = lora.base.get(name) + 0.5 * lora.adapter.delta(name.removesuffix(".weight"))
    assert torch.allclose(halved[name], expected, atol=1e-6)
    assert result.report["totals"]["adapter_parameters_changed"] > 0


def test_prefetched_keeps_order_bounds_lookahead_and_raises_in_the_caller():
    import threading

    from realign.tensorio import prefetched

    started: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            started.append(i)
        if i == 7:
            raise RealignError("seven")
        return i * i

    got = []
    for i, sq in prefetched(range(7), load, ahead=1):
        assert max(started) <= i + 1  # never more than one item ahead of the caller
        got.append((i, sq))
    assert got == [(i, i * i) for i in range(7)]
    with pytest.raises(RealignError, match="seven"):
        list(prefetched(range(10), load))


def test_threads_are_the_cores_nobody_else_uses():
    from realign.compute import pick_threads

    assert pick_threads(load=0.0, cores=2) == 2
    assert pick_threads(load=1.1, cores=2) == 1  # another process keeps a core busy
    assert pick_threads(load=7.0, cores=2) == 1 and pick_threads(load=0.2, cores=16) == 16
