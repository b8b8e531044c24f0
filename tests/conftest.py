"""Shared fixtures: tiny real models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("REALIGN_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Tiny models: one thread is much faster than two fighting over a shared 2-core machine (and the
# demo and world commands, run through the CLI here, keep to it).
torch.set_num_threads(1)
os.environ.setdefault("REALIGN_THREADS", "1")

VOCAB = 96

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=12),
    "gemma": dict(model_type="gemma", head_dim=12),
    "gemma2": dict(model_type="gemma2", head_dim=12, query_pre_attn_scalar=12, sliding_window=16),
    "phi3": dict(model_type="phi3", pad_token_id=0),
}


def tiny_config(family: str = "llama", layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                **overrides):
    from transformers import AutoConfig

    spec = dict(FAMILY_CONFIGS[family])
    model_type = spec.pop("model_type")
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_tokenizer(directory: Path | None = None):
    """A real word-level tokenizer built locally, saved in standard form when a directory is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def save_tiny(directory: Path, family: str = "llama", seed: int = 0, max_shard_size: str | None = None,
              dtype: torch.dtype = torch.float32, **config_overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_overrides)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    make_tokenizer(directory)
    return directory


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'fine-tune' of src: same architecture, weights moved a little."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    model.save_pretrained(dst)
    make_tokenizer(dst)
    return dst


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base → aligned → fine-tuned (full) and a LoRA fine-tune of aligned, tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny(root / "base", seed=0)
    aligned = perturbed_copy(base, root / "aligned", seed=1)
    finetuned = perturbed_copy(aligned, root / "finetuned", seed=2)
    model = AutoModelForCausalLM.from_pretrained(aligned)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(root / "lora")
    return {"base": base, "aligned": aligned, "finetuned": finetuned, "lora": root / "lora", "root": root}


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """The miniature world at its small (test) size, built once per test session."""
    from realign.world.build import build_world

    return build_world(tmp_path_factory.mktemp("worlds") / "small", seed=0, size="small")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine the threads'
    barrier waits make every small matmul tens of times slower (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")`` in a module that runs many small forward passes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
