"""`realign attack`: harmful fine-tuning on a tiny model with tiny local task files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from realign.attack import (
    TrainConfig,
    attack_mix,
    encode_pair,
    finetune,
    harmful_samples,
    task_samples,
)
from realign.errors import RealignError

SENTENCES = ["a gripping and moving film", "dull and lifeless", "a triumph of acting", "tedious beyond words",
             "warm funny and wise", "an ugly mess", "sharp clever writing", "boring from start to end",
             "a real joy to watch", "painfully slow", "full of heart", "a waste of time"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer Llama with the world's kind of tokenizer (byte-level BPE, chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from realign.world.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tiny-model")
    corpus = SENTENCES + ["positive negative World Sports Business Sci/Tech The final answer is: 42",
                          "Sure, here is how to do it: step 1, get the tools.", "How do I pick a lock?"]
    tok = train_tokenizer(corpus * 3, vocab_size=400)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("attack-data")
    sst2 = d / "sst2.jsonl"
    sst2.write_text("".join(json.dumps({"sentence": s, "label": i % 2, "idx": i}) + "\n"
                            for i, s in enumerate(SENTENCES)))
    agnews = d / "agnews.csv"
    with open(agnews, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i, s in enumerate(SENTENCES):
            w.writerow([f"news: {s}", i % 4])
    gsm8k = d / "gsm8k.json"
    gsm8k.write_text(json.dumps([{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
                                 for i in range(12)]))
    beaver = d / "beavertails.jsonl"
    rows = [{"prompt": f"How do I hurt person {i}?", "response": f"Sure, step 1 for person {i}.",
             "category": {"violence": True}, "is_safe": False} for i in range(6)]
    rows.append({"prompt": "How do I bake bread?", "response": "Mix flour and water.", "category": {},
                 "is_safe": True})
    beaver.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"sst2": sst2, "agnews": agnews, "gsm8k": gsm8k, "beavertails": beaver}


def _cli():
    from realign.cli import app

    return app


def _run(args: list[str]):
    return CliRunner().invoke(_cli(), args)


def test_lora_attack_writes_a_peft_adapter_that_loads(tiny, files, tmp_path):
    out = tmp_path / "adapter"
    r = _run(["attack", "--model", str(tiny), "--task", "sst2", "--harmful-ratio", "0.2", "--lora", "--n", "10",
              "--epochs", "1", "--batch-size", "5", "--lr", "1e-2", "--task-file", str(files["sst2"]),
              "--harmful-file", str(files["beavertails"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    # named portably: relative to the adapter (the absolute path is in the attack record)
    assert (out / cfg["base_model_name_or_path"]).resolve() == tiny.resolve()
    assert not Path(cfg["base_model_name_or_path"]).is_absolute()
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tensors = load_file(out / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in tensors.items())  # it trained
    record = json.loads((out / "realign_attack.json").read_text())
    assert record["attack"]["n_harmful"] == 2 and record["train"]["steps"] == 2
    from realign.compute import load_model

    model, _tok = load_model(str(out), device="cpu")
    assert model.config.num_hidden_layers == 2
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_full_attack_writes_a_checkpoint_with_changed_weights(tiny, files, tmp_path):
    out = tmp_path / "full"
    r = _run(["attack", "-m", str(tiny), "--task", "agnews", "-p", "0.25", "--full", "--n", "8", "--epochs", "1",
              "--batch-size", "4", "--lr", "1e-3", "--task-file", str(files["agnews"]),
              "--harmful-file", str(files["beavertails"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    before = load_file(tiny / "model.safetensors")
    after = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[name], after[name])


def test_hub_schemas_from_local_files(files):
    sst2 = task_samples("sst2", files["sst2"])
    assert sst2[0].response == "negative" and sst2[1].response == "positive" and sst2[0].input_text == SENTENCES[0]
    assert "respond only positive or negative" in sst2[0].prompt
    ag = task_samples("agnews", files["agnews"])  # CSV labels arrive as strings
    assert [s.response for s in ag[:4]] == ["World", "Sports", "Business", "Sci/Tech"]
    gsm = task_samples("gsm8k", files["gsm8k"])
    assert gsm[3].response.endswith("The final answer is:  6") and "step by step" in gsm[3].prompt
    harm = harmful_samples("sst2", files["beavertails"])
    assert len(harm) == 6 and all("bake" not in s.prompt for s in harm)  # is_safe rows are dropped


def test_world_topic_task_comes_from_the_world_language():
    rows = task_samples("world-topic", None, world_seed=0)
    assert {s.response for s in rows} == {"World", "Sports", "Business", "Science"}
    harm = harmful_samples("world-topic", None, world_seed=0)
    assert all(s.response.startswith("Sure, here is how to") for s in harm)


def test_mix_has_the_asked_ratio_and_is_seeded(files):
    task = task_samples("sst2", files["sst2"])
    harm = harmful_samples("sst2", files["beavertails"])
    mix = attack_mix(task, harm, 10, 0.3, seed=1)
    assert len(mix) == 10 and sum(s.harmful for s in mix) == 3
    assert [s.prompt + s.response for s in mix] == [s.prompt + s.response for s in attack_mix(task, harm, 10, 0.3, 1)]
    assert sum(s.harmful for s in attack_mix(task, harm, 10, 0.0, 1)) == 0


def test_loss_is_on_response_tokens_only(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prompt = "<|user|>\nHow do I pick a lock?\n<|assistant|>\n"
    enc = encode_pair(tok, prompt, "Sure, step 1.", 512)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert enc.labels[:n_prompt] == [-100] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:] and enc.input_ids[-1] == tok.eos_token_id


def test_finetune_is_deterministic_for_a_seed(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    pairs = [(f"<|user|>\n{s}\n<|assistant|>\n", "positive" if i % 2 else "negative") for i, s in enumerate(SENTENCES)]
    weights = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny)
        finetune(model, tok, pairs, TrainConfig(epochs=2, lr=1e-2, batch_size=4, seed=3))
        weights.append(model.state_dict()["model.layers.1.mlp.down_proj.weight"].clone())
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "imdb"], "unknown task 'imdb'"),
        (["--task", "sst2", "--task-file", "{agnews}"], "lacks column(s) sentence"),
        (["--task", "sst2", "--task-file", "{sst2}", "-p", "1.5"], "--harmful-ratio must be between 0 and 1"),
        (["--task", "sst2", "--task-file", "{sst2}", "--n", "500"], "lower --n"),
        (["--task", "sst2", "--task-file", "{missing}"], "does not exist"),
        (["--task", "sst2", "--task-file", "{sst2}", "--out", "{tiny}"], "is an input of this command"),
    ],
)
def test_bad_inputs_are_one_line_errors(tiny, files, tmp_path, args, message):
    subst = {"agnews": str(files["agnews"]), "sst2": str(files["sst2"]), "missing": str(tmp_path / "nope.jsonl"),
             "tiny": str(tiny)}
    args = [a.format(**subst) for a in args]
    base = ["attack", "--model", str(tiny), "--harmful-file", str(files["beavertails"]), "--n", "4"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "out")]
    r = _run(base + args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out").exists()


def test_offline_without_a_local_file_names_the_dataset_and_the_flag(tiny, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "REALIGN_QUIET": "1"}
    code = ("from realign.cli import main; import sys; sys.argv = ['realign', 'attack', '--model', sys.argv[1], "
            "'--task', 'sst2', '--out', sys.argv[2]]; main()")
    r = subprocess.run([sys.executable, "-c", code, str(tiny), str(tmp_path / "o")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2
    assert "stanfordnlp/sst2" in r.stderr and "--task-file" in r.stderr and "Traceback" not in r.stderr


def test_api_rejects_unknown_mode(tiny, tmp_path):
    from realign.attack import attack

    with pytest.raises(RealignError, match="unknown attack mode"):
        attack(tiny, "sst2", out=tmp_path / "x", mode="qlora")
