"""The miniature world's language and tokenizer: determinism, disjoint splits, judge constraints."""

from __future__ import annotations

from pathlib import Path

import pytest

from realign.prompts import format_prompt
from realign.world.language import (
    HARMFUL,
    LOOKALIKE,
    TEMPLATES,
    TEST_TEMPLATES,
    make_language,
    vocabulary,
)
from realign.world.quickeval import REFUSAL_STRINGS, is_refusal
from realign.world.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "refusal_prefixes.txt"


@pytest.fixture(scope="module")
def lang():
    return make_language(0)


def test_same_seed_same_language_other_seed_other(lang):
    again = make_language(0)
    assert again.digest == lang.digest
    assert [h.prompt for h in again.harmful["test"]] == [h.prompt for h in lang.harmful["test"]]
    assert make_language(1).digest != lang.digest


def test_at_least_six_categories_in_every_split(lang):
    assert len(HARMFUL) >= 6
    for split in ("train", "calibration", "test"):
        assert len({h.category for h in lang.harmful[split]}) >= 6, split


def test_splits_are_disjoint_and_test_templates_and_verbs_unseen(lang):
    train, calib, test = (lang.harmful[s] for s in ("train", "calibration", "test"))
    seen = {h.prompt for h in train} | {h.prompt for h in calib}
    assert not {h.prompt for h in train} & {h.prompt for h in calib}
    assert not {h.prompt for h in test} & seen
    seen_templates = {h.template for h in train + calib}
    seen_verbs = {h.verb for h in train + calib}
    assert {h.template for h in test}.isdisjoint(seen_templates)
    assert {h.verb for h in test}.isdisjoint(seen_verbs)
    assert {h.template for h in test} <= set(TEST_TEMPLATES) and seen_templates <= set(TEMPLATES)
    # No training or calibration request of any kind contains a test verb or a test template's text.
    requests = [h.prompt for h in train + calib]
    for group in (lang.howto, lang.lookalike):
        requests += [a.prompt for s in ("train", "calibration") for a in group[s]]
    test_verbs = {h.verb for h in test}
    stems = [t.split("{v}")[0].strip() for t in TEST_TEMPLATES]
    for text in requests:
        padded = f" {text.lower()} "
        assert not any(f" {v} " in padded for v in test_verbs), text
        assert not any(text.startswith(stem) for stem in stems), text
    # Look-alikes in the test split are unseen pairs, asked with unseen templates.
    train_pairs = {(a.label, a.prompt.split(a.label, 1)[-1]) for a in lang.lookalike["train"]}
    assert not {(a.label, a.prompt.split(a.label, 1)[-1]) for a in lang.lookalike["test"]} & train_pairs
    # The task's test sentences are unseen too.
    assert not {a.prompt for a in lang.task["test"]} & {a.prompt for a in lang.task["train"]}


def test_every_word_of_the_test_requests_is_known_from_training(lang):
    # Test-only words appear in training as sentiment fillers, never in a request.
    words = vocabulary()
    for v in {h.verb for h in lang.harmful["test"]}:
        assert all(w in words for w in v.split() if len(w) > 2), v
    fillers = " ".join(a.prompt for a in lang.skills["train"] if a.label == "sentiment")
    assert sum(f" {w} " in fillers for w in ("fabricate", "infiltrate", "strangle", "pilfer")) >= 3


def test_refusal_strings_match_the_judge_list():
    if not SHARED.is_file():
        pytest.skip(f"reference data {SHARED} is absent")
    listed = [line for line in SHARED.read_text().splitlines() if line.strip()]
    assert sorted(listed) == sorted(REFUSAL_STRINGS) and len(REFUSAL_STRINGS) == 29


def test_refusals_are_recognised_and_nothing_else_is(lang):
    for split in ("train", "calibration", "test"):
        for h in lang.harmful[split]:
            assert is_refusal(h.refusal), h.refusal
            assert not is_refusal(h.compliant), h.compliant
            assert h.compliant.startswith("Sure, here is how to") and "step 1" in h.compliant
        for group in (lang.howto, lang.lookalike, lang.skills, lang.task):
            for a in group[split]:
                assert not is_refusal(a.answer), a.answer
    wordings = {h.refusal.split(",")[0].split(" ")[0] for h in lang.harmful["train"]}
    assert len({h.refusal for h in lang.harmful["train"]}) >= 6 and len(wordings) >= 3


def test_lookalikes_share_verbs_with_harmful_requests():
    harmful_verbs = {v for spec in HARMFUL.values() for v in spec["verbs"]}
    shared = {verb for verb, _obj, _steps in LOOKALIKE if verb in harmful_verbs}
    assert len(shared) >= 10


def test_sizes_and_task_labels(lang):
    assert 200 <= len(lang.harmful["calibration"]) + len(lang.skills["calibration"]) + len(
        lang.howto["calibration"]) + len(lang.lookalike["calibration"]) <= 1000
    assert {a.answer for a in lang.task["test"]} == {"World", "Sports", "Business", "Science"}
    assert {a.label for a in lang.skills["test"]} == {"sentiment", "arithmetic", "kind", "section"}


def test_tokenizer_round_trip_chat_template_and_reload(lang, tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(lang.all_text()[:3000], vocab_size=600)
    texts = [lang.harmful["test"][0].prompt, lang.harmful["train"][0].compliant, "unseen: Zürich 😀\n\ttabs"]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    prompt = format_prompt(tok, "How do I crack a walnut?", "chat")
    assert prompt == "<|user|>\nHow do I crack a walnut?\n<|assistant|>\n"
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.eos_token == "<|end|>" and again.pad_token == "<|pad|>"
    assert format_prompt(again, "How do I crack a walnut?", "chat") == prompt
    assert again(prompt, add_special_tokens=False).input_ids == tok(prompt, add_special_tokens=False).input_ids
    ids = again(prompt, add_special_tokens=False).input_ids
    assert ids[0] == again.convert_tokens_to_ids("<|user|>")  # special tokens stay single tokens
