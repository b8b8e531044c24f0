"""Model references (hub id@revision, BASE+ADAPTER), adapters that name their base portably, and
model cards a hub accepts. The hub is a local cache laid out as huggingface_hub lays it out, read
offline (no network here); stock PEFT reloads outputs in a fresh process from another directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from realign import api
from realign.errors import RealignError
from realign.sources import load_model, split_ref

REPO = "realign-test/tiny-aligned"
COMMIT = "a" * 40
V1 = "b" * 40


@pytest.fixture()
def hub(tiny_models, tmp_path, monkeypatch):
    """An offline hub cache holding the tiny aligned model at main and at tag v1."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    for commit in (COMMIT, V1):
        shutil.copytree(tiny_models["aligned"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_split_ref_reads_id_at_revision_and_leaves_paths_alone(tmp_path):
    assert split_ref("org/name@v1.0") == ("org/name", "v1.0")
    assert split_ref("org/name") == ("org/name", None)
    weird = tmp_path / "dir@2"
    weird.mkdir()
    assert split_ref(str(weird)) == (str(weird), None)
    with pytest.raises(RealignError, match="id@revision"):
        split_ref("org/name@")


def test_hub_ids_and_revisions_resolve_from_the_cache(hub):
    main, tagged = load_model(REPO), load_model(f"{REPO}@v1")
    assert main.path.name == COMMIT and (main.hub_id, main.revision) == (REPO, None)
    assert tagged.path.name == V1 and (tagged.hub_id, tagged.revision) == (REPO, "v1")


def test_base_plus_adapter_is_an_adapter_on_that_base(tiny_models):
    m = load_model(f"{tiny_models['aligned']}+{tiny_models['lora']}")
    ref = load_model(tiny_models["lora"], base=tiny_models["aligned"])
    assert m.is_adapter and m.base.path == Path(tiny_models["aligned"]).resolve()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m.get(name), ref.get(name))
    with pytest.raises(RealignError, match="BASE\\+ADAPTER"):
        load_model(f"+{tiny_models['lora']}")


def _lora_on(base_ref: str, directory: Path) -> Path:
    """A PEFT adapter whose config names ``base_ref``."""
    src = json.loads((directory / "adapter_config.json").read_text())
    src["base_model_name_or_path"] = base_ref
    (directory / "adapter_config.json").write_text(json.dumps(src))
    return directory


def test_an_adapter_on_a_hub_base_is_written_with_the_hub_id_and_reloads_with_stock_peft(hub, tiny_models, tmp_path):
    adapter = _lora_on(f"{REPO}", Path(shutil.copytree(tiny_models["lora"], tmp_path / "lora")))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["revision"] = "v1"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = api.repair("safelora", f"{REPO}@v1", adapter, out, base=tiny_models["base"], params={"mode": "threshold",
                                                                                        "tau": 2.0})
    assert res.output == "adapter"
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["revision"]) == (REPO, "v1")
    card = (out / "README.md").read_text()
    assert f"base_model: {REPO}" in card and "library_name: peft" in card and str(tmp_path) not in card
    # stock PEFT, another process, another working directory: the hub id resolves through the cache
    ours = load_model(out)
    code = (
        "import torch, sys; from peft import AutoPeftModelForCausalLM\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        "ids = torch.tensor([[1, 5, 9, 13, 2]])\n"
        "torch.save(m(ids).logits, sys.argv[1])\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "peft.pt")], cwd=elsewhere, env=env, check=True)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(ours.base.path).eval()
    with torch.no_grad():
        for name, p in dense.named_parameters():
            p.copy_(ours.get(name))
        mine = dense(torch.tensor([[1, 5, 9, 13, 2]])).logits
    assert (torch.load(tmp_path / "peft.pt") - mine).abs().max() < 1e-4


def test_an_adapter_on_a_local_base_names_it_relative_to_the_output(tiny_models, tmp_path):
    tree = tmp_path / "tree"
    aligned = Path(shutil.copytree(tiny_models["aligned"], tree / "models" / "aligned"))
    out = tree / "repairs" / "out"
    api.repair("safelora", aligned, f"{aligned}+{tiny_models['lora']}", out, base=tiny_models["base"],
               params={"mode": "threshold", "tau": 2.0})
    written = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == "../../models/aligned"
    prov = json.loads((out / "realign.json").read_text())
    assert prov["report"]["base_model"]["path"] == str(aligned.resolve())
    # moved together, they still load: realign resolves the base against the adapter directory
    shutil.move(tree, tmp_path / "moved")
    assert load_model(tmp_path / "moved" / "repairs" / "out").base.path == (tmp_path / "moved" / "models" /
                                                                            "aligned").resolve()


def test_model_card_metadata_parameters_and_shares(tiny_models, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "revert"
    api.repair("revert", tiny_models["aligned"], tiny_models["finetuned"], out)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "realign" in card.data.tags
    assert card.data.base_model is None  # a local fine-tune: no hub id to name
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and str(Path(tiny_models["aligned"]).parent) not in text
    totals = json.loads((out / "realign.json").read_text())["report"]["totals"]
    assert 0 < totals["percent_of_linear_weights"] <= 100 and 0 < totals["percent_changed"] <= 100
    out2 = tmp_path / "nlsr"
    api.repair("nlsr", tiny_models["aligned"], tiny_models["finetuned"], out2, base=tiny_models["base"],
               calibration=_calibration(tmp_path))
    assert "= `None`" not in (out2 / "README.md").read_text()


def _calibration(tmp_path: Path) -> Path:
    rows = [{"prompt": f"w10 w{20 + i}", "kind": "harmful", "safe_response": "w1 w2 w3", "unsafe_response": "w4 w5"}
            for i in range(6)]
    path = tmp_path / "cal.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
