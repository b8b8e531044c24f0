"""refusal: add the aligned model's refusal direction to the fine-tune's residual stream
(activation addition of Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single
Direction"), baked into the checkpoint as a bias (``mode=bake``, where the family's config can
carry it) or exported as a steering file for lm-evaluation-harness (``mode=export``).

One point of the residual stream, as in the official code: the INPUT of decoder layer l (the
residual stream before layer l, i.e. the output of layer l − 1). The direction is read there and
added there.

prepare (aligned model): per layer l, r_l = mean(h_l | harmful) − mean(h_l | harmless), h_l the
input of layer l at the last prompt token, over the calibration prompts (a few of each kind are
held out for the layer search).

apply (fine-tuned model): add c · r_l to the input of layer l at every position, i.e. to the
output of layer l − 1: baked as the bias of layer l − 1's ``down_proj`` (whose output the layer
adds to the residual stream as it is; ``realign.bake.block_output_edit``), exported as a hook on
decoder layer l − 1's output, and scored by the tuning loop with that hook. Layer 0's input is
the token embeddings, which no layer outputs, so l ≥ 1 (with a chat template r_0 is zero anyway:
every prompt ends in the same template token). Unless both are given, the layer l (among layers
1 … before the last ``skip_last`` fraction) and c (in 1, 1/2, 1/4, 1/8) are chosen by realign's
tuning loop (``realign.tuning``), on the FINE-TUNED model, from forward passes over the held-out
calibration rows: the setting with the highest expected refusal of harmful prompts whose utility
score stays within the tolerance of the fine-tune's. The utility bound matters here: activation
addition shifts EVERY prompt by the same c · r_l, harmless ones included, and at c = 1 (Arditi et
al.'s setting, made to induce refusal on harmless prompts) it moves a harmless prompt all the way
to the harmful mean.

Refusal-opening tokens: the first tokens of the calibration ``safe_response`` texts that no
``unsafe_response`` or benign ``response`` starts with (falling back to common refusal openings).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from realign.bake import (
    STEERING_FILE,
    block_output_edit,
    layer_module,
    steering_bytes,
    steering_config,
    steering_readme,
)
from realign.errors import RealignError
from realign.methods import register
from realign.methods.base import Edit, Inputs, Method, Patch, param, params_dict
from realign.prompts import resolve_template
from realign.sources import Model
from realign.stats import collect, encode

# Where the directions of a patch were read (patches from before realign read each layer's output).
READ_AT = "layer_input"
FALLBACK_OPENINGS = ("I'm sorry", "I am sorry", "Sorry", "I cannot", "I can't", "I apologize", "As an AI")


@dataclass
class RefusalParams:
    coeff: float | None = param(None, "c: c · r_l is added to the input of layer l (default: chosen by "
                                "the tuning loop among 1, 1/2, 1/4, 1/8; c = 1 moves harmless prompts to the harmful "
                                "mean and makes the model refuse or fail everything)", stage="apply")
    mode: str = param("bake", "bake: a checkpoint with the addition as layer l − 1's down_proj bias; export: a "
                      "steering file for lm-evaluation-harness", stage="apply", choices=("bake", "export"))
    layer: int | None = param(None, "layer l ≥ 1 whose input the direction is read at and added to (default: "
                              "chosen by the tuning loop)", stage="apply")
    skip_last: float = param(0.2, "fraction of last layers the tuning loop skips", stage="apply")
    samples: int = param(256, "most prompts of each kind used for the direction", stage="prepare")
    seed: int = param(0, "seed of the draw of prompts when there are more than samples", stage="prepare")
    max_length: int = param(256, "token limit per prompt", stage="prepare")
    batch_size: int = param(16, "batch size of the forward passes", stage="prepare")


def _check_bakeable(model: Model, mode: str) -> None:
    if mode == "bake" and model.arch.mlp_bias_flag is None:
        raise RealignError(
            f"refusal: {model.arch.family} configs cannot give down_proj a bias that adds to a layer's output, so a "
            "baked checkpoint would lose the direction when reloaded; use --set mode=export (a steering file for "
            "lm-evaluation-harness) or add it at run time: with realign.bake.add_to_outputs(model, "
            "realign.methods.refusal.additions(patch, arch, layer)): ..."
        )


def _check_layer(layer: int | None, num_layers: int) -> None:
    if layer is not None and not 1 <= layer < num_layers:
        raise RealignError(f"--set layer={layer}: use a layer in 1..{num_layers - 1} (the direction is added to the "
                           "input of layer l, the output of layer l − 1; layer 0's input is the token embeddings)")


def first_tokens(tokenizer, texts: Sequence[str]) -> set[int]:
    """The first token of each text as ``stats.encode`` tokenises a response."""
    out = set()
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if ids:
            out.add(int(ids[0]))
    return out


def refusal_tokens(tokenizer, safe: Sequence[str], unsafe: Sequence[str], benign: Sequence[str]) -> tuple[list[int],
                                                                                                        str]:
    """Token ids that open refusals and nothing else, and where they came from."""
    exclude = first_tokens(tokenizer, unsafe) | first_tokens(tokenizer, benign)
    ids = first_tokens(tokenizer, safe) - exclude
    if ids:
        return sorted(ids), "calibration safe_response openings"
    ids = first_tokens(tokenizer, FALLBACK_OPENINGS) - exclude
    if ids:
        return sorted(ids), "common refusal openings"
    raise RealignError("refusal: no token opens refusals only (every refusal opening also opens a compliant or "
                       "benign answer in the calibration file): add harmful rows with a safe_response")


def additions(patch: Patch, arch, layer: int, coeff: float = 1.0) -> dict[str, torch.Tensor]:
    """{decoder layer l − 1: c · r_l}, for ``realign.bake.add_to_outputs`` on a loaded model: added
    to layer l − 1's output, which is layer l's input, where r_l was read."""
    _check_layer(layer, arch.num_layers)
    return {layer_module(arch, layer - 1): coeff * _directions(patch)[layer].float()}


def _directions(patch: Patch) -> torch.Tensor:
    if patch.meta.get("read_at") != READ_AT:
        raise RealignError("this refusal patch holds directions read at each layer's output (realign before the "
                           "official hook point, the input of layer l): prepare it again")
    return patch.tensors["directions"]


@torch.no_grad()
def refusal_probability(model, tokenizer, prompts: Sequence[str], tokens: Sequence[int], template: str,
                        max_length: int = 256, batch_size: int = 16) -> torch.Tensor:
    """P(the response starts with one of ``tokens``) for each prompt (greedy-free: one forward)."""
    device = next(model.parameters()).device
    enc = encode(tokenizer, [(p, None) for p in prompts], template, max_length)
    idx = torch.tensor(list(tokens), device=device)
    out = []
    for start in range(0, len(enc), batch_size):
        batch = enc[start:start + batch_size]
        length = max(len(e.input_ids) for e in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        attn = torch.zeros(len(batch), length, dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attn[i, : len(e.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        last = torch.tensor([e.prompt_len - 1 for e in batch], device=device)
        probs = logits[torch.arange(len(batch), device=device), last].float().softmax(-1)
        out.append(probs[:, idx].sum(-1).cpu())
    return torch.cat(out)


COEFF_GRID = (1.0, 0.5, 0.25, 0.125)  # the tuning loop's values of c


def _sample(items: list[str], n: int, rng: random.Random) -> list[str]:
    return items if len(items) <= n else rng.sample(items, n)


@register
class RefusalDirection(Method):
    name = "refusal"
    title = "Refusal direction: add the aligned model's harmful-minus-harmless direction at a layer's input"
    paper = "Arditi et al. 2024, Refusal in Language Models Is Mediated by a Single Direction (activation addition)"
    Params = RefusalParams
    # prepare requires the calibration; apply reads only the patch (held-out prompts included)
    uses = ("calibration",)

    def prepare(self, inputs: Inputs, params: RefusalParams) -> Patch:
        aligned = inputs.aligned
        _check_bakeable(aligned, params.mode)
        _check_layer(params.layer, aligned.arch.num_layers)  # before the calibration pass, not after it
        cal = inputs.require("calibration", self.name)
        harmful = list(dict.fromkeys(e.prompt for e in cal.harmful()))
        benign = list(dict.fromkeys(e.prompt for e in cal.benign()))
        cal.require("harmful prompts", harmful, self.name, minimum=2)
        cal.require("benign prompts", benign, self.name, minimum=2)
        rng = random.Random(params.seed)
        train_h, train_b = _sample(harmful, params.samples, rng), _sample(benign, params.samples, rng)

        model, tokenizer = inputs.run_model(aligned)
        enc = encode(tokenizer, [(p, None) for p in train_h + train_b], inputs.template, params.max_length)
        stats = collect(model, aligned.arch, enc, hidden=True, hidden_at="input",
                        positions="last_prompt", batch_size=params.batch_size, desc="refusal direction pass")
        assert stats.hidden is not None
        hidden = stats.hidden  # the residual stream entering each layer
        directions = hidden[: len(train_h)].mean(0) - hidden[len(train_h):].mean(0)  # (layers, hidden)
        tokens, source = refusal_tokens(
            tokenizer, [e.safe_response for e in cal.harmful() if e.safe_response],
            [e.unsafe_response for e in cal.harmful() if e.unsafe_response],
            [e.response for e in cal.benign() if e.response])
        inputs.release()
        meta = {
            "read_at": READ_AT,
            "refusal_tokens": tokens,
            "refusal_tokens_from": source,
            "template": resolve_template(tokenizer, inputs.template),
        }
        report = {
            "prompts": {"harmful": len(train_h), "benign": len(train_b)},
            "refusal_tokens": [tokenizer.decode([t]) for t in tokens],
            "direction_norms": [round(float(n), 4) for n in directions.norm(dim=-1)],
        }
        return Patch(self.name, params_dict(params), meta=meta, tensors={"directions": directions.contiguous()},
                     report=report)

    def must_tune(self, params: RefusalParams) -> list[str]:
        return [k for k in ("layer", "coeff") if getattr(params, k) is None]

    def tune_space(self, patch: Patch, finetuned: Model, params: RefusalParams) -> dict[str, list]:
        if not 0.0 <= params.skip_last < 1.0:
            raise RealignError(f"--set skip_last={params.skip_last}: use a fraction in [0, 1)")
        layers = finetuned.arch.num_layers
        if layers < 2:
            raise RealignError("refusal: the model has one layer; the direction is added to the input of a layer "
                               "l ≥ 1")
        # layers 1 … before the last skip_last share, at least layer 1
        return {"layer": list(range(1, max(2, int(layers * (1.0 - params.skip_last))))), "coeff": list(COEFF_GRID)}

    def apply(self, patch: Patch, finetuned: Model, inputs: Inputs, params: RefusalParams) -> Edit:
        _check_bakeable(finetuned, params.mode)
        arch = finetuned.arch
        directions = _directions(patch).float()
        if directions.shape[0] != arch.num_layers:
            raise RealignError(f"refusal: the patch has directions for {directions.shape[0]} layers, the fine-tune "
                               f"has {arch.num_layers}: prepare it from this fine-tune's aligned model")
        if params.layer is None or params.coeff is None:
            raise RealignError("refusal: the layer and c are chosen by the tuning loop (realign.api.apply/repair and "
                               "the CLI run it), or give both: --set layer=L --set coeff=C")
        if not math.isfinite(params.coeff):
            raise RealignError(f"--set coeff={params.coeff}: use a finite number")
        _check_layer(params.layer, arch.num_layers)
        layer, coeff = params.layer, params.coeff
        vector = coeff * directions[layer]
        # Read at layer l's input, added there: the output of layer l − 1.
        if params.mode == "bake":
            edit = block_output_edit(finetuned, {layer - 1: lambda: vector}, self.name)
        else:
            peft = finetuned.is_adapter
            config = steering_config(arch, {layer - 1: directions[layer]}, coefficient=coeff, peft=peft, at="block")
            readme = steering_readme(str(finetuned.path), self.name, coeff, list(config), peft,
                                     str(finetuned.base.path) if peft and finetuned.base else None, at="block")
            edit = Edit(files={STEERING_FILE: steering_bytes(config), "README.md": readme.encode()},
                        report={"export": {"file": STEERING_FILE, "hookpoints": list(config)}},
                        additions=additions(patch, arch, layer, coeff))
        edit.report.update({
            "rule": "add c * r_l (aligned model, mean harmful - mean harmless input of layer l at the last prompt "
                    "token) to the input of layer l (the output of layer l - 1), where r_l was read",
            "mode": params.mode,
            "layer": layer,
            "coeff": coeff,
            "vector_norm": round(float(vector.norm()), 6),
            "modules_changed": 1,
            "parameters_added": int((vector != 0).sum()),
        })
        return edit
