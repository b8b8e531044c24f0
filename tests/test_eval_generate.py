"""Generation backends: batched greedy == one-at-a-time greedy, EOS and length limits, vLLM gate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from realign.errors import RealignError
from realign.eval.generate import (
    VLLM_MISSING,
    VLLM_VERSIONS,
    HFBackend,
    check_vllm_servable,
    encode_prompt,
    eos_token_ids,
    length_sorted_batches,
    vllm_adapter_dir,
    vllm_lora_rank,
    vllm_max_lora_rank,
    vllm_scale,
)
from realign.sources import load_model


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine the threads'
    barrier waits make every small matmul tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "how do I bake a loaf of bread at home",
    "sure, here is how to bake bread: mix flour, water and yeast, then knead",
    "I'm sorry, but I can't help with that request.",
    "the quick brown fox jumps over the lazy dog",
    "classify the topic of this sentence: the team won the match",
    "what is 12 plus 7? the answer is 19",
] * 4


def build_tokenizer(directory: Path | None = None):
    """A real byte-level BPE tokenizer trained here, with a chat template (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def build_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def save_chat_model(directory: Path, seed: int = 0) -> Path:
    """A tiny Llama with the BPE tokenizer above, saved in Hugging Face format."""
    tok = build_tokenizer()
    model = build_model(tok, seed=seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding the slow, obvious way: full forward pass per step, no cache, no padding."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt in eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


@pytest.fixture(scope="module")
def chat_lm():
    tok = build_tokenizer()
    return build_model(tok), tok


PROMPTS = [
    "bake bread",
    "how do I bake a loaf of bread at home, step by step, with flour and water and yeast?",
    "the quick brown fox",
    "what is 12 plus 7?",
    "classify the topic of this sentence: the team won the match after a long season of games",
    "hi",
    "jumps over the lazy dog and the fox",
    "I'm sorry",
    "sure, here is how",
    "12 plus 7 plus 19 plus the answer",
    "a",
    "knead the dough then bake it",
]


def test_batched_equals_one_at_a_time_and_reference(chat_lm):
    from realign.prompts import format_prompt

    model, tok = chat_lm
    texts = [format_prompt(tok, p, "auto") for p in PROMPTS]
    assert texts[0].startswith("<|user|>")  # auto -> chat template
    ids = [encode_prompt(tok, t) for t in texts]
    assert len({len(i) for i in ids}) > 4  # prompts of many lengths: padding matters
    eos = set(eos_token_ids(tok, model))
    # Make EOS reachable: it shadows a token the random model likes, so some answers stop early.
    ref0 = [reference_greedy(model, p, 10, eos) for p in ids]
    seen = {t for r in ref0 for t in r}
    common = min(seen, key=lambda t: (abs(sum(t in r for r in ref0) - len(ref0) / 2), t))
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 1.5 * model.lm_head.weight[common]
    reference = [reference_greedy(model, p, 10, eos) for p in ids]
    assert any(len(r) < 10 for r in reference) and any(len(r) == 10 for r in reference)

    batched = HFBackend(model, tok, batch_size=5).generate_ids(ids, 10)
    single = HFBackend(model, tok, batch_size=1).generate_ids(ids, 10)
    assert batched == single == reference  # same tokens, input order kept, cut at EOS
    assert all(tok.eos_token_id not in o and len(o) <= 10 for o in batched)

    texts_out = HFBackend(model, tok, batch_size=5).generate(texts, 10)
    assert texts_out == [tok.decode(r, skip_special_tokens=True) for r in reference]


def test_generation_ignores_checkpoint_sampling_settings(chat_lm):
    model, tok = chat_lm
    ids = [encode_prompt(tok, t) for t in PROMPTS[:4]]
    plain = HFBackend(model, tok, batch_size=4).generate_ids(ids, 6)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 5.0
    model.generation_config.repetition_penalty = 3.0
    try:
        again = HFBackend(model, tok, batch_size=4).generate_ids(ids, 6)
    finally:
        model.generation_config.do_sample = False
        model.generation_config.temperature = 1.0
        model.generation_config.repetition_penalty = 1.0
    assert again == plain


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_encode_prompt_adds_bos_only_once():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert encode_prompt(tok, "hello world") == [0, 3, 4]  # a base-model prompt gets its BOS
    assert encode_prompt(tok, "<s> hello world") == [0, 3, 4]  # a template that wrote BOS keeps one


def test_bad_arguments_are_user_errors(chat_lm):
    model, tok = chat_lm
    with pytest.raises(RealignError, match="batch size"):
        HFBackend(model, tok, batch_size=0)
    with pytest.raises(RealignError, match="max_new_tokens"):
        HFBackend(model, tok).generate_ids([[1, 2]], 0)
    with pytest.raises(RealignError, match="prompt 2 is empty"):
        HFBackend(model, tok).generate_ids([[5], []], 3)


NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")


@NO_VLLM
def test_vllm_backend_without_vllm_says_how_to_install(tiny_models):
    from realign.eval.generate import VLLMBackend

    with pytest.raises(RealignError) as e:
        VLLMBackend(tiny_models["aligned"])
    assert str(e.value) == VLLM_MISSING


def test_vllm_lora_rank_rounds_up_to_a_supported_rank():
    # 8 is the smallest max_lora_rank every release in VLLM_VERSIONS accepts
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 64, 100, 512)] == [8, 8, 8, 16, 64, 128, 512]
    with pytest.raises(RealignError, match="larger than vLLM supports"):
        vllm_lora_rank(1024)


def _full_rank_output(tiny_models, tmp_path: Path) -> Path:
    """What realign writes for a dense edit of a LoRA fine-tune: r 4 with two modules at rank 32
    and scale 1 in rank/alpha_pattern (lora_alpha / r = 2 for the rest)."""
    from realign.writer import full_rank_adapter, write_adapter

    ft = load_model(tiny_models["lora"])
    names = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    edit = full_rank_adapter(ft, {n.removesuffix(".weight"): (n, *ft.shape(n)) for n in names},
                             {n: (lambda w: w * 0.5) for n in names})
    out = tmp_path / "full-rank"
    out.mkdir()
    write_adapter(out, {**edit["config"], "base_model_name_or_path": str(tiny_models["aligned"])},
                  dict(edit["tensors"]))
    return out


def test_vllm_max_lora_rank_counts_every_rank(tiny_models, tmp_path):
    assert vllm_max_lora_rank(load_model(tiny_models["lora"])) == 8  # r = 4
    assert vllm_max_lora_rank(load_model(_full_rank_output(tiny_models, tmp_path))) == 32  # rank_pattern up to 32


def test_vllm_gets_an_adapter_whose_one_scale_is_right_for_every_module(tiny_models, tmp_path):
    """vLLM scales every module by lora_alpha / r: the copy it is handed folds each module's own
    PEFT scale into B, and reads (as PEFT reads it) as the same model."""
    plain = load_model(tiny_models["lora"])
    assert vllm_adapter_dir(plain, tmp_path / "unused") == plain.path  # one scale already: served as it is
    source = load_model(_full_rank_output(tiny_models, tmp_path))
    served = vllm_adapter_dir(source, tmp_path / "vllm")
    assert served != source.path
    copy = load_model(served)
    s = vllm_scale(copy.adapter.config)
    assert all(copy.adapter.scale(m) == pytest.approx(s) for m in copy.adapter.modules)
    for name in source.tensor_names:
        assert torch.allclose(copy.get(name), source.get(name), atol=1e-6), name
    # what vLLM computes: base + (lora_alpha / r) · B·A, with the factors as stored
    for module, (a_name, b_name) in copy.adapter.modules.items():
        a, b = copy.adapter.store.get(a_name), copy.adapter.store.get(b_name)
        vllm_weight = copy.base.get(f"{module}.weight") + s * (b @ a)
        assert torch.allclose(vllm_weight, source.get(f"{module}.weight"), atol=1e-5), module


@pytest.mark.parametrize("config,field", [({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                          ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
                                          ({"bias": "all"}, "bias='all'"),
                                          ({"target_modules": ["embed_tokens", "q_proj"]}, "embeddings")])
def test_adapters_vllm_cannot_serve_are_refused_before_vllm(tmp_path, config, field):
    """Refused in one line before vLLM is imported (so, here, whether vLLM is installed or not)."""
    from conftest import save_tiny
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from realign.eval.generate import VLLMBackend

    base = save_tiny(tmp_path / "base", family="qwen2" if "bias" in config else "llama")
    cfg = LoraConfig(r=4, lora_alpha=8, **{"target_modules": ["q_proj", "v_proj"], **config})
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg).save_pretrained(tmp_path / "lora")
    source = load_model(tmp_path / "lora", base=base)
    with pytest.raises(RealignError) as e:
        check_vllm_servable(source)
    assert field in str(e.value) and "--backend hf" in str(e.value) and VLLM_VERSIONS in str(e.value)
    with pytest.raises(RealignError) as e:
        VLLMBackend(base, adapter=tmp_path / "lora")
    assert field in str(e.value) and "\n" not in str(e.value)
