"""Architecture map: where each decoder layer's linear weights live, as data.

Methods speak of ``(layer, role)`` — e.g. ``(12, "o")`` — never of a family's tensor names. A role
is one of q, k, v, o, gate, up, down; families with fused projections (Phi-3) expose the fused
module (``qkv``, ``gate_up``) as its own role and say which roles it fuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from realign.errors import RealignError

_LLAMA_LIKE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_PHI3 = {
    "qkv": "self_attn.qkv_proj",
    "o": "self_attn.o_proj",
    "gate_up": "mlp.gate_up_proj",
    "down": "mlp.down_proj",
}

# o_bias_flag: the config key that gives every attention projection (q, k, v, o) a bias, so an
# added o_proj bias survives a reload with stock transformers; None where no config can carry one.
# mlp_bias_flag: the same for the MLP projections (gate, up, down), in families whose decoder
# layer adds down_proj's output to the residual stream as it is (times a constant), so that a
# down_proj bias adds a fixed vector to the layer's output.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"modules": _LLAMA_LIKE, "o_bias_flag": "attention_bias", "mlp_bias_flag": "mlp_bias"},
    "mistral": {"modules": _LLAMA_LIKE, "o_bias_flag": None},
    "qwen2": {"modules": _LLAMA_LIKE, "o_bias_flag": None},
    "qwen3": {"modules": _LLAMA_LIKE, "o_bias_flag": "attention_bias"},
    "gemma": {"modules": _LLAMA_LIKE, "o_bias_flag": "attention_bias"},
    "gemma2": {"modules": _LLAMA_LIKE, "o_bias_flag": "attention_bias"},
    "gemma3_text": {"modules": _LLAMA_LIKE, "o_bias_flag": "attention_bias"},
    "olmo2": {"modules": _LLAMA_LIKE, "o_bias_flag": "attention_bias"},
    "granite": {"modules": _LLAMA_LIKE, "o_bias_flag": "attention_bias", "mlp_bias_flag": "mlp_bias"},
    "phi3": {"modules": _PHI3, "o_bias_flag": None, "fused": {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}},
}
LAYER_PREFIX = "model.layers.{layer}"


def supported_families() -> list[str]:
    return sorted(FAMILIES)


@dataclass(frozen=True)
class Arch:
    """Shapes and tensor locations of one model, read from its config."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    modules: dict[str, str] = field(repr=False)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    o_bias_flag: str | None = None
    mlp_bias_flag: str | None = None

    @property
    def roles(self) -> list[str]:
        return list(self.modules)

    @property
    def num_query_heads_total(self) -> int:
        return self.num_layers * self.num_heads

    def module_name(self, layer: int, role: str) -> str:
        if role not in self.modules:
            raise RealignError(f"{self.family} has no {role!r} projection; it has {', '.join(self.modules)}")
        return f"{LAYER_PREFIX.format(layer=layer)}.{self.modules[role]}"

    def weight_name(self, layer: int, role: str) -> str:
        return self.module_name(layer, role) + ".weight"

    def linear_weights(self, layers: list[int] | None = None) -> list[tuple[int, str, str]]:
        """(layer, role, weight tensor name) for every decoder linear weight, in layer order."""
        chosen = range(self.num_layers) if layers is None else layers
        return [(layer, role, self.weight_name(layer, role)) for layer in chosen for role in self.modules]

    def locate(self, tensor_name: str) -> tuple[int, str] | None:
        """(layer, role) when the tensor is a decoder linear weight, else None."""
        return self._by_name.get(tensor_name)

    @cached_property
    def _by_name(self) -> dict[str, tuple[int, str]]:
        return {name: (layer, role) for layer, role, name in self.linear_weights()}


def _get(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def arch_from_config(config: dict[str, Any]) -> Arch:
    """Read the architecture of a model from its config.json contents."""
    if "text_config" in config and config.get("model_type") not in FAMILIES:
        # Multimodal wrappers nest the language model's config; its weights differ in prefix too.
        raise RealignError(
            f"model type {config.get('model_type')!r} wraps a language model; pass the text-only checkpoint. "
            f"Supported families: {', '.join(supported_families())}"
        )
    family = config.get("model_type")
    if family not in FAMILIES:
        raise RealignError(
            f"unsupported model family {family!r}; supported: {', '.join(supported_families())}"
        )
    spec = FAMILIES[family]
    layers = _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    hidden = _get(config, "hidden_size")
    if not (layers and heads and hidden):
        raise RealignError(f"config of family {family!r} lacks num_hidden_layers/num_attention_heads/hidden_size")
    kv_heads = _get(config, "num_key_value_heads") or heads
    for key, value in (("num_hidden_layers", layers), ("num_attention_heads", heads), ("hidden_size", hidden),
                       ("num_key_value_heads", kv_heads), ("head_dim", _get(config, "head_dim") or 1),
                       ("intermediate_size", _get(config, "intermediate_size") or 1)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 24:
            raise RealignError(f"config of family {family!r}: {key} = {value!r} is not a positive whole number in "
                               "range; is the config.json damaged?")
    if heads % kv_heads:
        raise RealignError(f"config of family {family!r}: {heads} attention heads are not a multiple of {kv_heads} "
                           "key/value heads; is the config.json damaged?")
    # Never assume hidden/heads when the config says otherwise (Gemma, Mistral-Nemo, Qwen3).
    head_dim = _get(config, "head_dim") or hidden // heads
    return Arch(
        family=family,
        num_layers=int(layers),
        num_heads=int(heads),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        intermediate_size=int(_get(config, "intermediate_size") or 0),
        modules=dict(spec["modules"]),
        fused=dict(spec.get("fused", {})),
        o_bias_flag=spec["o_bias_flag"],
        mlp_bias_flag=spec.get("mlp_bias_flag"),
    )
