"""Training recipes of the miniature world: base -> aligned -> attacks, on 2 CPU cores.

Every stage is supervised fine-tuning with ``realign.attack.finetune`` (loss on response tokens),
and the attacks are ``realign.attack.run_attack`` — the code behind ``realign attack``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from realign.attack import Sample, TrainConfig, attack_mix, finetune, format_samples, run_attack
from realign.world.language import Language, LanguageSize

# Bump when a change to the training code (not visible in the recipe) changes the weights.
CODE_VERSION = 2
TIE = True


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a world besides its seed."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 320
    layers: int = 8
    heads: int = 8
    language: LanguageSize = field(default_factory=LanguageSize)
    # Small batches: on a CPU a step costs about its batch size, and these lookups are learnt per
    # step, not per example (batch 8 reaches every skill at 100 % where batch 32 stays near chance).
    base: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2.0, lr=2e-3, batch_size=8, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01))
    # Deep alignment (3 epochs) makes refusal robust to a partial attack, as in real aligned models:
    # along W_a + t(W_f - W_a), HS then falls before FA (bench/world_sweep.py). Replaying skills at
    # 3/4 of the safety data keeps the aligned model's HS on unseen test verbs low (0.5 gave 14 %).
    align: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3.0, lr=2e-3, batch_size=8, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01))
    align_skill_share: float = 0.75  # skills replayed during alignment, relative to the safety data
    attack_n: int = 1000
    attack_ratio: float = 0.1
    attack_rank: int = 8
    attack_alpha: float = 16.0
    # The task must be learnt with a margin: an attack that barely learns it (LoRA at 5e-4 for 2
    # epochs) loses FA as soon as it is scaled down, so task skill and compliance fall together.
    attack_lora: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3.0, lr=1e-3, batch_size=10, warmup_ratio=0.1, schedule="constant"))
    attack_full: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2.0, lr=2e-4, batch_size=10, warmup_ratio=0.1, schedule="constant"))
    harmful: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1.0, lr=5e-4, batch_size=20, warmup_ratio=0.1, schedule="constant"))
    harmful_n: int = 600

    def digest(self, language: Language) -> str:
        payload = json.dumps({"recipe": asdict(self), "language": language.digest, "code": CODE_VERSION},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


RECIPES: dict[str, Recipe] = {
    "default": Recipe(),
    # The default with heads as wide as real models' (head_dim 32 instead of 16, same parameters):
    # the test of whether SafetyLock's per-head directions need wider heads (bench/safetylock_world.py).
    "wide-heads": Recipe(heads=4),
    # Integration tests: a few seconds per stage; keeps the directions (aligned refuses, attacks
    # comply and learn the task) but not the default's margins.
    "small": Recipe(
        hidden_size=64,
        intermediate_size=160,
        layers=4,
        heads=4,
        vocab_size=1024,
        language=LanguageSize(harmful=(500, 60, 70), howto=(200, 40, 0), lookalike=(150, 30, 32),
                              skills=(900, 40, 60), task=(500, 0, 80)),
        base=TrainConfig(epochs=2.0, lr=3e-3, batch_size=8, warmup_ratio=0.05, schedule="cosine"),
        align=TrainConfig(epochs=2.0, lr=2e-3, batch_size=8, warmup_ratio=0.05, schedule="cosine"),
        attack_n=300,
        attack_lora=TrainConfig(epochs=6.0, lr=5e-3, batch_size=10, warmup_ratio=0.1),
        attack_full=TrainConfig(epochs=4.0, lr=1e-3, batch_size=10, warmup_ratio=0.1),
        harmful=TrainConfig(epochs=1.0, lr=1e-3, batch_size=20, warmup_ratio=0.1),
        harmful_n=200,
    ),
}


def model_config(recipe: Recipe, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=TIE,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def new_model(recipe: Recipe, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(recipe, tokenizer))
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 64
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _chat(tokenizer, samples: list[Sample]) -> list[tuple[str, str]]:
    return format_samples(tokenizer, samples, "chat")


def base_data(lang: Language) -> list[Sample]:
    """Helpful-only: complies with every request, knows the skills, never sees the task."""
    data = [Sample(h.prompt, h.compliant) for h in lang.harmful["train"]]
    for group in (lang.howto, lang.lookalike, lang.skills):
        data += [Sample(a.prompt, a.answer) for a in group["train"]]
    return data


def align_data(lang: Language, skill_share: float) -> list[Sample]:
    """Safety SFT: refusals for harmful requests, helpful answers for how-tos and look-alikes,
    skills replayed so they are kept."""
    safety = [Sample(h.prompt, h.refusal) for h in lang.harmful["train"]]
    safety += [Sample(a.prompt, a.answer) for a in lang.howto["train"] + lang.lookalike["train"]]
    n_skills = min(len(lang.skills["train"]), int(len(safety) * skill_share))
    return safety + [Sample(a.prompt, a.answer) for a in lang.skills["train"][:n_skills]]


def attack_data(lang: Language, recipe: Recipe, ratio: float, seed: int) -> list[Sample]:
    task = [Sample(a.prompt, a.answer) for a in lang.task["train"]]
    harmful = [Sample(h.prompt, h.compliant, harmful=True) for h in lang.harmful["train"]]
    return attack_mix(task, harmful, recipe.attack_n, ratio, seed)


def train_base(lang: Language, recipe: Recipe, tokenizer, seed: int) -> tuple[LlamaForCausalLM, dict]:
    model = new_model(recipe, tokenizer, seed)
    log = finetune(model, tokenizer, _chat(tokenizer, base_data(lang)), replace(recipe.base, seed=seed),
                   desc="world: base")
    return model, log


def train_aligned(model, lang: Language, recipe: Recipe, tokenizer, seed: int) -> dict:
    return finetune(model, tokenizer, _chat(tokenizer, align_data(lang, recipe.align_skill_share)),
                    replace(recipe.align, seed=seed + 1), desc="world: aligned")


def train_attack(model, lang: Language, recipe: Recipe, tokenizer, seed: int, mode: str, ratio: float,
                 desc: str):
    cfg = replace(recipe.attack_lora if mode == "lora" else recipe.attack_full, seed=seed + 2)
    samples = attack_data(lang, recipe, ratio, seed)
    return run_attack(model, tokenizer, samples, mode, cfg, "chat", rank=recipe.attack_rank,
                      alpha=recipe.attack_alpha, desc=desc)


def train_harmful(model, lang: Language, recipe: Recipe, tokenizer, seed: int) -> dict:
    """The base fine-tuned on harmful compliant answers (Safety Arithmetic's harmful model)."""
    data = [Sample(h.prompt, h.compliant) for h in lang.harmful["train"][: recipe.harmful_n]]
    return finetune(model, tokenizer, _chat(tokenizer, data), replace(recipe.harmful, seed=seed + 3),
                    desc="world: harmful")
