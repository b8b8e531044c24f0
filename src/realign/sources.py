"""Model sources: one notion of "a model" — a local Hugging Face directory, a hub id, or a PEFT
LoRA adapter on top of one — with lazy, tensor-by-tensor access to its weights.

``Model.get(name)`` returns one tensor with its stored dtype. For a LoRA adapter it returns the
tensor of the dense model PEFT builds: ``W + s·B·A`` per module (``s = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA, r and alpha resolved from rank_pattern/alpha_pattern by
PEFT's own rule), ``lora_bias``, ``modules_to_save``, ``trainable_token_indices`` and LoRA on the
embeddings included; what realign cannot honour is refused (``LoraAdapter.open``). Methods thus
see every fine-tune as dense weights without loading the whole model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from realign.archs import Arch, arch_from_config
from realign.errors import RealignError
from realign.tensorio import TensorInfo, read_header, read_tensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ADAPTER_PREFIX = "base_model.model."
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


# ----------------------------------------------------------------------------- tensor stores
class TensorStore:
    """The tensors of one checkpoint directory: single-file or sharded safetensors (or, with the
    user's explicit opt-in, pickle files)."""

    def __init__(self, directory: Path, prefix: str = "model", allow_pickle: bool = False):
        self.directory = directory
        self.allow_pickle = allow_pickle
        self.infos: dict[str, TensorInfo] = {}
        self._pickled: dict[str, Path] = {}
        self._pickle_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.metadata: dict[str, str] = {}
        index = directory / f"{prefix}.safetensors.index.json"
        single = directory / f"{prefix}.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise RealignError(f"{index} is not a valid safetensors index ({e})") from None
            for file in sorted(set(weight_map.values())):
                if not (directory / file).exists():
                    raise RealignError(f"{index} names shard {file}, which is missing from {directory}")
                infos, meta = read_header(directory / file)
                self.infos.update(infos)
                self.metadata.update(meta)
        elif single.exists():
            self.infos, self.metadata = read_header(single)
        else:
            pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
            if not pickles:
                raise RealignError(f"{directory} has no {prefix}.safetensors weights")
            if not allow_pickle:
                raise RealignError(
                    f"{directory} holds only pickle weights ({pickles[0].name}), which can run code when loaded: "
                    "convert them to safetensors, or pass --allow-pickle if you trust the file"
                )
            for p in pickles:
                for name in self._load_pickle(p):
                    self._pickled[name] = p

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if self._pickle_cache and self._pickle_cache[0] == path:
            return self._pickle_cache[1]
        # weights_only even after opt-in: tensors are all we want from the file.
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — torch's refusal is many lines; the user needs one
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RealignError(f"{path}: torch refused to read it as plain tensors ({first[:160]}); realign loads "
                               "pickle files with weights_only=True only: convert it to safetensors") from None
        if not isinstance(tensors, dict):
            raise RealignError(f"{path} is not a state dict")
        self._pickle_cache = (path, tensors)
        return tensors

    @property
    def names(self) -> list[str]:
        return list(self.infos) + list(self._pickled)

    def __contains__(self, name: str) -> bool:
        return name in self.infos or name in self._pickled

    def info(self, name: str) -> TensorInfo | None:
        return self.infos.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.infos:
            return self.infos[name].shape
        return tuple(self._load_pickle(self._pickled[name])[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if name in self.infos:
            return self.infos[name].torch_dtype
        return self._load_pickle(self._pickled[name])[name].dtype

    def get(self, name: str) -> torch.Tensor:
        if name in self.infos:
            return read_tensor(self.infos[name])
        if name in self._pickled:
            return self._load_pickle(self._pickled[name])[name].clone()
        raise RealignError(f"tensor {name} is not in {self.directory}")

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self.infos.values()} | set(self._pickled.values()))


# ----------------------------------------------------------------------------- LoRA
# What PEFT saves, by tensor name (an optional ".<adapter name>" part comes from old PEFT releases).
_LORA_FACTOR = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_LORA_B_BIAS = re.compile(r"^(.*)\.lora_B(?:\.[^.]+)?\.bias$")
_LORA_EMBEDDING = re.compile(r"^(.*)\.lora_embedding_([AB])(?:\.[^.]+)?$")
_TOKEN_ROWS = re.compile(r"^(.*)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
# Parts of a saved name that PEFT's wrappers add around the module they wrap.
_WRAPPER_PARTS = (".modules_to_save.default", ".modules_to_save", ".base_layer", ".original_module")

# LoraConfig fields that change what an adapter computes in ways realign cannot express as merged
# weights, with why; a truthy value is refused.
_REFUSED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA rescales each column of the merged weight by a learned magnitude; realign reads plain LoRA "
                "only (merge it into a full checkpoint first)",
    "fan_in_fan_out": "it stores weights transposed (Conv1D), which no supported family has",
    "layer_replication": "it repeats decoder layers, so the adapted model has another depth than its base",
    "target_parameters": "it adapts raw parameters (MoE experts), not the linear modules realign edits",
    "use_qalora": "QALoRA pools each LoRA layer's input (GPTQ models only)",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, so no merged weight equals it",
    "velora_config": "it is a LoRA variant (VeLoRA) realign does not read",
    "monteclora_config": "it is a LoRA variant (MonteCLoRA) realign does not read",
    "use_bdlora": "it is a LoRA variant (block-diagonal LoRA) realign does not read",
    "arrow_config": "Arrow routes between several adapters per token, so no merged weight equals it",
    "kasa_config": "KaSA inserts learned singular values between A and B and truncates the base weight",
}
# Initialisations that rewrite the base weights when PEFT loads the adapter (W_res = W - s·B0·A0):
# the served model is not W + s·B·A.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Fields that do not change the merged function (which modules carry LoRA is read from the tensors),
# or that realign honours below.
_KNOWN_FIELDS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "bias", "modules_to_save",
    "trainable_token_indices", "lora_bias", "ensure_weight_tying", "init_lora_weights", "runtime_config",
    "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "qalora_group_size", *_REFUSED_FIELDS,
})


def _refuse_config(directory: Path, config: dict[str, Any]) -> None:
    """One-line refusals for every LoraConfig field realign cannot honour."""
    where = f"adapter {directory}"
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise RealignError(f"{where} is {peft_type}; realign handles LoRA adapters only")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise RealignError(f"{where}: r = {rank!r} in adapter_config.json; a LoRA rank is an integer ≥ 1")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise RealignError(f"{where}: lora_alpha = {alpha!r} in adapter_config.json is not a number")
    for key, why in _REFUSED_FIELDS.items():
        if config.get(key):
            raise RealignError(f"{where}: adapter_config.json sets {key}={config[key]!r}, which realign cannot "
                               f"honour: {why}")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            why = ("PEFT rewrites the base weights with the initial factors when it loads this adapter, so the "
                   "served model is not base + s·B·A; convert it to plain LoRA with PEFT's save_pretrained("
                   "path_initial_model_for_weight_conversion=...)")
        else:
            why = "realign does not know what it does to the loaded model"
        raise RealignError(f"{where}: adapter_config.json sets init_lora_weights={init!r}: {why}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise RealignError(f"{where}: {key} in adapter_config.json is a {type(config[key]).__name__}, "
                               "not a mapping of module patterns to values")
    unknown = sorted(k for k, v in config.items() if k not in _KNOWN_FIELDS and v not in (None, False, [], {}, ""))
    if unknown:
        _refuse_unknown_fields(where, config, unknown)


def _refuse_unknown_fields(where: str, config: dict[str, Any], keys: list[str]) -> None:
    """Fields this realign does not know: harmless only where they hold the installed PEFT's default
    and PEFT does not call them a LoRA variant."""
    import dataclasses

    from peft import LoraConfig

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    for key in keys:
        f = fields.get(key)
        if f is not None and not f.metadata.get("is_lora_variant"):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if config[key] == default:
                continue
        raise RealignError(f"{where}: adapter_config.json sets {key}={config[key]!r}, which realign does not know "
                           "how to honour (it may change what the adapter computes): merge the adapter into a full "
                           "checkpoint with PEFT and pass that")


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any, where: str, key: str) -> Any:
    """PEFT's own resolution of a rank_pattern/alpha_pattern entry for ``module``: the keys are
    regular expressions, matched at a dotted suffix of the module name, and the FIRST matching
    key wins (``peft.utils.other.get_pattern_key``)."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    try:
        found = get_pattern_key(list(patterns), module)
    except re.error as e:
        raise RealignError(f"{where}: a {key} key in adapter_config.json is not a valid regular expression "
                           f"({e})") from None
    return patterns.get(found, default)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, read the way PEFT loads it: per-module factors and scale, biases of
    ``lora_B`` (``lora_bias``), whole tensors that replace the base's (``modules_to_save``,
    ``bias="all"/"lora_only"``), LoRA on embeddings, and replaced embedding rows
    (``trainable_token_indices``). Tensors are read lazily."""

    directory: Path
    config: dict[str, Any]
    store: TensorStore
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # linear module -> (A name, B name)
    full_tensors: dict[str, str] = field(default_factory=dict)  # model tensor -> adapter tensor replacing it
    biases: dict[str, str] = field(default_factory=dict)  # linear module -> its lora_B bias (lora_bias=True)
    embeddings: dict[str, tuple[str, str]] = field(default_factory=dict)  # embedding -> (lora_embedding_A, _B)
    token_rows: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # module -> (new rows, token ids)

    @classmethod
    def open(cls, directory: Path, allow_pickle: bool = False) -> LoraAdapter:
        config = read_json_object(directory / "adapter_config.json")
        _refuse_config(directory, config)
        store = TensorStore(directory, prefix="adapter_model", allow_pickle=allow_pickle)
        adapter = cls(directory, config, store)
        adapter._index()
        adapter._check_ranks()
        return adapter

    def _index(self) -> None:
        where = f"adapter {self.directory}"
        parts: dict[str, dict[str, str]] = {}
        emb_parts: dict[str, dict[str, str]] = {}
        for name in self.store.names:
            if m := _LORA_FACTOR.match(name):
                parts.setdefault(m.group(1).removeprefix(ADAPTER_PREFIX), {})[m.group(2)] = name
            elif m := _LORA_B_BIAS.match(name):
                self.biases[m.group(1).removeprefix(ADAPTER_PREFIX)] = name
            elif m := _LORA_EMBEDDING.match(name):
                emb_parts.setdefault(m.group(1).removeprefix(ADAPTER_PREFIX), {})[m.group(2)] = name
            elif m := _TOKEN_ROWS.match(name):
                module = m.group(1).removeprefix(ADAPTER_PREFIX)
                self.token_rows[module] = (name, self._token_ids(module))
            elif "lora_magnitude_vector" in name:
                raise RealignError(f"{where} has {name}: it is DoRA, which realign does not read (merge it first)")
            elif name.startswith(ADAPTER_PREFIX) and "lora_" not in name and "token_adapter" not in name:
                # modules_to_save (and bias="all"/"lora_only") tensors replace the base tensor outright.
                target = name.removeprefix(ADAPTER_PREFIX)
                for part in _WRAPPER_PARTS:
                    target = target.replace(part, "")
                self.full_tensors[target] = name
            else:
                raise RealignError(f"{where} holds tensor {name}, which is not a PEFT LoRA tensor realign knows: "
                                   "merge the adapter into a full checkpoint with PEFT and pass that")
        for found, kind in ((parts, "LoRA pair"), (emb_parts, "embedding LoRA pair")):
            for module, ab in found.items():
                if set(ab) != {"A", "B"}:
                    raise RealignError(f"{where} has an incomplete {kind} for {module}")
        self.modules = {module: (ab["A"], ab["B"]) for module, ab in parts.items()}
        self.embeddings = {module: (ab["A"], ab["B"]) for module, ab in emb_parts.items()}
        if self.biases and not self.config.get("lora_bias"):
            raise RealignError(f"{where} holds lora_B biases but adapter_config.json does not set lora_bias: PEFT "
                               "would not load them")
        stray = sorted(set(self.biases) - set(self.modules))
        if stray:
            raise RealignError(f"{where} has a lora_B bias for {stray[0]} but no LoRA factors there")

    def _token_ids(self, module: str) -> list[int]:
        """The token ids whose rows ``module``'s trainable-tokens tensor holds, from the config
        (a list targets the input embeddings; a mapping names modules by suffix, as PEFT matches them)."""
        where = f"adapter {self.directory}"
        spec = self.config.get("trainable_token_indices")
        ids: Any = None
        if isinstance(spec, list):
            ids = spec
        elif isinstance(spec, dict):
            # PEFT wraps the modules whose name ends with a key; the first such key gives the ids
            ids = next((v for k, v in spec.items() if isinstance(k, str) and module.endswith(k)), None)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                             for i in ids):
            raise RealignError(f"{where} holds new token rows for {module} but trainable_token_indices in "
                               f"adapter_config.json gives no list of token ids for it ({spec!r})")
        return list(ids)

    def _check_ranks(self) -> None:
        """Factors must have the rank PEFT gives their module (else PEFT cannot load them, and the
        scale realign would use is not the one they were trained with)."""
        where = f"adapter {self.directory}"
        for module, (a_name, b_name) in self.modules.items():
            a, b = self.store.shape(a_name), self.store.shape(b_name)
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise RealignError(f"{where}: {module} has LoRA factors {list(b)}·{list(a)}, which do not multiply")
            if a[0] != self.rank(module):
                raise RealignError(f"{where}: {module} has rank-{a[0]} factors but adapter_config.json gives it "
                                   f"r = {self.rank(module)} (r and rank_pattern, resolved as PEFT resolves them)")
        for module, (a_name, b_name) in self.embeddings.items():
            a, b = self.store.shape(a_name), self.store.shape(b_name)
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] != self.rank(module):
                raise RealignError(f"{where}: {module} has embedding LoRA factors {list(b)}·{list(a)}, which do not "
                                   f"fit r = {self.rank(module)}")
        for module, (rows, ids) in self.token_rows.items():
            shape = self.store.shape(rows)
            if len(shape) != 2 or shape[0] != len(ids):
                raise RealignError(f"{where}: {rows} holds {list(shape)} but trainable_token_indices names "
                                   f"{len(ids)} tokens for {module}")

    def rank(self, module: str) -> int:
        return int(_pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", 8),
                                  f"adapter {self.directory}", "rank_pattern"))

    def alpha(self, module: str) -> float:
        return float(_pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8),
                                    f"adapter {self.directory}", "alpha_pattern"))

    def scale(self, module: str) -> float:
        """PEFT's scaling of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA, with r and alpha
        taken from rank_pattern/alpha_pattern as PEFT resolves them."""
        rank, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) with delta = s · B @ A, or None when the adapter does not touch the module."""
        if module not in self.modules:
            return None
        a_name, b_name = self.modules[module]
        return self.store.get(a_name), self.store.get(b_name), self.scale(module)

    def delta(self, module: str) -> torch.Tensor | None:
        """The update of ``module``'s weight: s·B·A for a linear module, PEFT's (s·B·A)ᵀ for an
        embedding (its A is r × vocabulary, B is hidden × r), or None."""
        if module in self.embeddings:
            a_name, b_name = self.embeddings[module]
            return self.scale(module) * (self.store.get(b_name).float() @ self.store.get(a_name).float()).T
        f = self.factors(module)
        if f is None:
            return None
        a, b, s = f
        return s * (b.float() @ a.float())

    def bias_delta(self, module: str) -> torch.Tensor | None:
        """s·b with b the lora_B bias (lora_bias=True): PEFT adds it to the module's output."""
        if module not in self.biases:
            return None
        return self.scale(module) * self.store.get(self.biases[module]).float()

    @property
    def all_ranks(self) -> list[int]:
        """Every rank of the adapter: r, each rank_pattern value and each module's factors."""
        ranks = [int(self.config.get("r", 8))]
        ranks += [int(v) for v in (self.config.get("rank_pattern") or {}).values()]
        ranks += [self.store.shape(a)[0] for a, _ in self.modules.values()]
        ranks += [self.store.shape(a)[0] for a, _ in self.embeddings.values()]
        return ranks

    @property
    def base_ref(self) -> str | None:
        return self.config.get("base_model_name_or_path")


# The input embeddings and the output layer of every supported family.
EMBEDDINGS = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether transformers ties the output layer to the input embeddings for this config (the
    family's default where config.json does not say)."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    from transformers import AutoConfig

    try:
        return bool(AutoConfig.for_model(str(config.get("model_type"))).tie_word_embeddings)
    except (ValueError, KeyError, AttributeError):
        return False


# ----------------------------------------------------------------------------- models
@dataclass
class Model:
    """A model to read weights from: a full checkpoint, or a LoRA adapter over a base model."""

    ref: str
    path: Path
    config: dict[str, Any]
    store: TensorStore | None = None  # full checkpoints
    adapter: LoraAdapter | None = None  # adapters
    base: Model | None = None  # the model an adapter sits on
    # Config keys whose values the dense view of an adapter differs in from its base's config.json
    # (e.g. tie_word_embeddings=False when the adapter gives the output layer weights of its own).
    config_updates: dict[str, Any] = field(default_factory=dict)
    # Tensors the dense view has and the base checkpoint does not -> the base tensor they start from.
    added: dict[str, str] = field(default_factory=dict, repr=False)
    # Where it came from when that was the hub: the id (and the revision asked for), which outputs
    # name instead of the local cache path.
    hub_id: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.adapter is not None and self.base is not None:
            self._fit_adapter(self.adapter, self.base)

    def _fit_adapter(self, ad: LoraAdapter, base: Model) -> None:
        """Check the adapter against its base and work out the dense model PEFT builds from them."""
        where = f"adapter {self.path}"
        names = base.weights
        for module in ad.biases:
            if f"{module}.bias" not in names:
                raise RealignError(
                    f"{where}: lora_bias=True adds a bias to {module}, which has none in its base: PEFT itself "
                    "cannot merge such an adapter, and realign reads every adapter as merged weights (retrain "
                    "without lora_bias)")
        tied = ties_embeddings(base.config) and HEAD not in names
        head_module = HEAD.removesuffix(".weight")
        if tied and head_module in ad.modules:
            raise RealignError(f"{where} puts LoRA on {head_module}, whose weight its base ties to the input "
                               "embeddings: realign does not read such adapters (merge it with PEFT first)")
        for target, tensor in ad.full_tensors.items():
            if target not in names and not (tied and target == HEAD):
                raise RealignError(f"{where} holds {tensor}, which replaces {target}, a tensor its base does not "
                                   "have (pass the right base model)")
            want = names.shape(EMBEDDINGS if target == HEAD and tied else target)
            if tuple(ad.store.shape(tensor)) != tuple(want):
                raise RealignError(f"{where}: {tensor} is {list(ad.store.shape(tensor))} but {target} is "
                                   f"{list(want)} in the base (a resized vocabulary?): pass the right base model")
        for module in [*ad.embeddings, *ad.token_rows]:
            if f"{module}.weight" not in names and not (tied and f"{module}.weight" == HEAD):
                raise RealignError(f"{where} changes {module}, which its base does not have (pass the right base "
                                   "model)")
        for module, (rows, ids) in ad.token_rows.items():
            vocab, width = names.shape(EMBEDDINGS if f"{module}.weight" == HEAD and tied else f"{module}.weight")
            if max(ids) >= vocab or ad.store.shape(rows)[1] != width:
                raise RealignError(f"{where}: trainable_token_indices names token {max(ids)} of {module}, whose "
                                   f"base is {vocab}x{width}, with rows of width {ad.store.shape(rows)[1]}")
        if tied:
            self._untie_if_needed(ad)

    def _untie_if_needed(self, ad: LoraAdapter) -> None:
        """Over tied embeddings, PEFT gives the output layer weights of its own when the adapter
        replaces it (modules_to_save=["lm_head"]), or changes the input embeddings without tying the
        change to the output layer (modules_to_save / LoRA on embed_tokens without
        ensure_weight_tying): the dense model then has a separate lm_head.weight."""
        embed_module, head_module = EMBEDDINGS.removesuffix(".weight"), HEAD.removesuffix(".weight")
        own_head = HEAD in ad.full_tensors or head_module in ad.token_rows
        replaced = EMBEDDINGS in ad.full_tensors or embed_module in ad.embeddings
        rows = embed_module in ad.token_rows
        # PEFT ties these changes to the output layer: trainable tokens whenever the weights are tied,
        # a replaced or LoRA'd embedding only with ensure_weight_tying.
        follows = (not replaced or bool(ad.config.get("ensure_weight_tying"))) and (replaced or rows)
        if own_head or ((replaced or rows) and not follows):
            self.added[HEAD] = EMBEDDINGS
            self.config_updates["tie_word_embeddings"] = False
            self.config = {**self.config, **self.config_updates}

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def allow_pickle(self) -> bool:
        """Whether the user opted in to pickle weights when this model was opened."""
        return self.weights.allow_pickle

    @cached_property
    def arch(self) -> Arch:
        return arch_from_config(self.config)

    @property
    def weights(self) -> TensorStore:
        """The dense checkpoint whose tensor names this model exposes (an adapter's dense view may
        add a few: ``added``)."""
        return self.store if self.store is not None else self.base.weights  # type: ignore[union-attr]

    @property
    def tensor_names(self) -> list[str]:
        names = self.weights.names
        return names + [n for n in self.added if n not in self.weights]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.weights.shape(self.added.get(name, name))

    def dtype(self, name: str) -> torch.dtype:
        return self.weights.dtype(self.added.get(name, name))

    def __contains__(self, name: str) -> bool:
        return name in self.weights or name in self.added

    @property
    def adapter_tensors(self) -> set[str]:
        """The dense tensors whose values the adapter changes or adds (empty for a full checkpoint)."""
        ad = self.adapter
        if ad is None:
            return set()
        return ({f"{m}.weight" for m in [*ad.modules, *ad.embeddings, *ad.token_rows]} | set(ad.full_tensors)
                | {f"{m}.bias" for m in ad.biases} | set(self.added))

    def get(self, name: str) -> torch.Tensor:
        """One tensor, dense, in its stored dtype (adapters merged in float32, then cast back),
        computed as PEFT computes the adapted model."""
        if self.adapter is None:
            assert self.store is not None
            return self.store.get(name)
        ad, dtype = self.adapter, self.dtype(name)
        if name in ad.full_tensors:
            value = ad.store.get(ad.full_tensors[name])
        else:
            value = self.base.get(self.added.get(name, name))  # type: ignore[union-attr]
        module, _, kind = name.rpartition(".")
        delta = ad.delta(module) if kind == "weight" else ad.bias_delta(module) if kind == "bias" else None
        if delta is not None:
            if delta.shape != value.shape:
                raise RealignError(
                    f"adapter {self.path} does not fit its base: {name} is {list(value.shape)} in the base "
                    f"but the LoRA update is {list(delta.shape)}"
                )
            value = value.float() + delta
        if kind == "weight" and module in ad.token_rows:
            rows, ids = ad.token_rows[module]
            # PEFT's TrainableTokens: the listed rows are replaced outright (index_copy).
            value = value.index_copy(0, torch.tensor(ids), ad.store.get(rows).to(value.dtype))
        return value.to(dtype)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.adapter is None or not name.endswith(".weight"):
            return None
        return self.adapter.factors(name.removesuffix(".weight"))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names:
            yield name, self.get(name)

    @property
    def weight_files(self) -> list[Path]:
        files = list(self.adapter.store.files) if self.adapter else []
        return files + (self.store.files if self.store else self.base.weight_files)  # type: ignore[union-attr]

    @property
    def tokenizer_dir(self) -> Path:
        """Where the tokenizer files are: the adapter's own when it ships one, else the base's."""
        if any((self.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return self.path
        if self.base is not None:
            return self.base.tokenizer_dir
        return self.path

    @property
    def config_dir(self) -> Path:
        return self.base.config_dir if self.base is not None else self.path

    def num_parameters(self) -> int:
        return sum(math.prod(self.shape(n)) for n in self.tensor_names)

    def describe(self) -> dict[str, Any]:
        arch = self.arch
        dtypes: dict[str, int] = {}
        for name in self.tensor_names:
            key = str(self.dtype(name)).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + 1
        info: dict[str, Any] = {
            "ref": self.ref,
            "path": str(self.path),
            "family": arch.family,
            "layers": arch.num_layers,
            "heads": arch.num_heads,
            "kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim,
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size,
            "parameters": self.num_parameters(),
            "dtypes": dtypes,
            "weight_files": [str(p) for p in self.weights.files],
        }
        if self.adapter is not None:
            cfg = self.adapter.config
            info["adapter"] = {
                "path": str(self.path),
                "base": self.base.ref if self.base else None,
                "r": cfg.get("r"),
                "lora_alpha": cfg.get("lora_alpha"),
                "use_rslora": bool(cfg.get("use_rslora")),
                "target_modules": cfg.get("target_modules"),
                "modules": len(self.adapter.modules),
                "lora_bias_modules": len(self.adapter.biases),
                "replaced_tensors": sorted(self.adapter.full_tensors),
                "trainable_tokens": {m: len(ids) for m, (_rows, ids) in self.adapter.token_rows.items()},
                "embedding_lora": sorted(self.adapter.embeddings),
                "config_updates": dict(self.config_updates),
                "parameters": sum(math.prod(self.adapter.store.shape(n)) for n in self.adapter.store.names),
            }
        return info


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; one-line errors for bytes that are not UTF-8, invalid
    JSON and JSON of another shape."""
    data = path.read_bytes()
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RealignError(f"{path}: byte {e.start} is not UTF-8; is it really a JSON file?") from None
    except ValueError as e:
        raise RealignError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise RealignError(f"{path} holds a JSON {type(value).__name__}, not an object: is it a real config file?")
    return value


def _read_config(directory: Path) -> dict[str, Any]:
    return read_json_object(directory / "config.json")


def _looks_like_hub_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", ref)) and not ref.startswith((".", "/"))


def _from_hub(ref: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    shown = f"{ref}@{revision}" if revision else ref
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 — every hub failure becomes the same one-line advice
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}"
        raise RealignError(
            f"model {shown!r} is not a local directory and could not be fetched from the hub ({why}); "
            f"it is not in the local cache ({cache}): pass a local directory, or download it with "
            "network access and HF_HUB_OFFLINE unset"
        ) from None


def split_ref(ref: str) -> tuple[str, str | None]:
    """(id, revision) of a hub reference ``id@revision``; a local path is returned whole."""
    if Path(ref).expanduser().exists() or "@" not in ref:
        return ref, None
    repo, _, revision = ref.rpartition("@")
    if not _looks_like_hub_id(repo) or not revision:
        raise RealignError(f"cannot read model reference {ref!r}: use a directory, a hub id, id@revision or "
                           "base+adapter")
    return repo, revision


def _locate(ref: str) -> tuple[Path, str | None, str | None]:
    """(local directory, hub id, revision) of a reference."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RealignError(f"{ref} is a file; a model is a directory in Hugging Face format (or a hub id)")
        return path.resolve(), None, None
    repo, revision = split_ref(ref)
    if _looks_like_hub_id(repo):
        return _from_hub(repo, revision), repo, revision
    raise RealignError(f"model directory {ref} does not exist")


def load_model(ref: str | os.PathLike, base: str | os.PathLike | None = None, allow_pickle: bool = False) -> Model:
    """Resolve a model reference (directory, hub id, or LoRA adapter directory) for lazy reading.

    For an adapter, the base comes from ``base`` when given, else from the adapter config's
    ``base_model_name_or_path`` (resolved relative to the adapter directory when it is a relative path).
    """
    ref = str(ref)
    if "+" in ref and base is None and not Path(ref).expanduser().exists():
        # mergekit's convention: BASE+ADAPTER names an adapter on an explicit base
        base_part, _, adapter_part = ref.partition("+")
        if not base_part or not adapter_part:
            raise RealignError(f"cannot read model reference {ref!r}: BASE+ADAPTER needs both parts")
        return load_model(adapter_part, base=base_part, allow_pickle=allow_pickle)
    path, hub_id, revision = _locate(ref)
    if (path / "adapter_config.json").exists():
        adapter = LoraAdapter.open(path, allow_pickle=allow_pickle)
        base_ref = str(base) if base is not None else adapter.base_ref
        if not base_ref:
            raise RealignError(f"adapter {ref} does not name its base model: pass the base explicitly")
        if base is None and not Path(base_ref).is_absolute() and (path / base_ref).exists():
            base_ref = str((path / base_ref).resolve())
        elif base is None and adapter.config.get("revision") and "@" not in base_ref and \
                not Path(base_ref).expanduser().exists():
            base_ref = f"{base_ref}@{adapter.config['revision']}"  # PEFT's own field for the base's revision
        base_model = load_model(base_ref, allow_pickle=allow_pickle)
        if base_model.is_adapter:
            raise RealignError(f"the base of adapter {ref} is itself an adapter: merge it first")
        model = Model(ref, path, base_model.config, adapter=adapter, base=base_model, hub_id=hub_id,
                      revision=revision)
        unknown = [m for m in adapter.modules if f"{m}.weight" not in base_model.weights]
        if unknown:
            raise RealignError(
                f"adapter {ref} does not fit base {base_ref}: the base has no module {unknown[0]} "
                "(pass the right base model)"
            )
        for module in adapter.modules:
            a_name, b_name = adapter.modules[module]
            out_dim, in_dim = base_model.shape(f"{module}.weight")
            if adapter.store.shape(a_name)[1] != in_dim or adapter.store.shape(b_name)[0] != out_dim:
                raise RealignError(
                    f"adapter {ref} does not fit base {base_ref}: {module} is {out_dim}x{in_dim} in the base "
                    f"but the adapter's factors are {list(adapter.store.shape(b_name))} and "
                    f"{list(adapter.store.shape(a_name))} (pass the right base model)"
                )
        return model
    if not (path / "config.json").exists():
        raise RealignError(f"{ref} is not a model: it has neither config.json nor adapter_config.json")
    config = _read_config(path)
    return Model(ref, path, config, store=TensorStore(path, allow_pickle=allow_pickle), hub_id=hub_id,
                 revision=revision)


def check_same_shapes(a: Model, b: Model, what: str = "fine-tuned") -> None:
    """Refuse pairs of models that are not fine-tunes of one another (another family, another
    vocabulary, different shapes): a repair would write one model's config over the other's weights."""
    arch_a, arch_b = a.arch, b.arch
    type_a, type_b = a.config.get("model_type"), b.config.get("model_type")
    if type_a != type_b:
        raise RealignError(f"{what} model {b.ref} is a {type_b} model and {a.ref} a {type_a} model: "
                           "give models of one family")
    vocab_a, vocab_b = a.config.get("vocab_size"), b.config.get("vocab_size")
    if vocab_a != vocab_b:
        raise RealignError(f"{what} model {b.ref} has a vocabulary of {vocab_b} tokens and {a.ref} of {vocab_a}: "
                           "give models that share a tokenizer")
    for _layer, _role, name in arch_a.linear_weights():
        if name not in b:
            raise RealignError(f"{what} model {b.ref} has no tensor {name}: it is not a fine-tune of {a.ref}")
        if a.shape(name) != b.shape(name):
            raise RealignError(
                f"{what} model {b.ref} does not match {a.ref}: {name} is {list(b.shape(name))} "
                f"vs {list(a.shape(name))}"
            )
    if arch_a.num_layers != arch_b.num_layers:
        raise RealignError(f"{what} model {b.ref} has {arch_b.num_layers} layers, {a.ref} has {arch_a.num_layers}")


# ----------------------------------------------------------------------------- hashing
_HASH_CACHE = Path(os.environ.get("REALIGN_CACHE", "~/.cache/realign")).expanduser() / "sha256.json"


def _scan(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, the first tensor holding NaN or ∞ or None), in one read: a safetensors
    file is hashed tensor by tensor, and each floating tensor is checked on the way."""
    h = hashlib.sha256()
    bad: str | None = None
    with open(path, "rb") as f:
        if path.suffix != ".safetensors":
            while chunk := f.read(16 << 20):
                h.update(chunk)
            return h.hexdigest(), None
        infos, _ = read_header(path)
        pos = 0
        for info in sorted(infos.values(), key=lambda i: i.start):
            if info.start > pos:  # the header, and any bytes between tensors
                h.update(f.read(info.start - pos))
            raw = f.read(info.nbytes)
            h.update(raw)
            pos = info.start + info.nbytes
            if bad is None and info.torch_dtype.is_floating_point and raw:
                values = torch.frombuffer(bytearray(raw), dtype=info.torch_dtype)
                if not bool(torch.isfinite(values).all()):
                    bad = info.name
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest(), bad


def _scanned(path: Path) -> tuple[str, str | None]:
    """``_scan``, cached by (path, size, mtime) so large checkpoints are read once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(_HASH_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and "sha256" in entry:
        return entry["sha256"], entry.get("nonfinite")
    digest, bad = _scan(path)
    cache[key] = {"sha256": digest, "nonfinite": bad}
    try:
        _HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _HASH_CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(_HASH_CACHE)
    except OSError:
        pass  # a read-only home only costs reading again
    return digest, bad


def sha256_file(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so large checkpoints are hashed once."""
    return _scanned(path)[0]


def check_finite(model: Model) -> None:
    """Refuse a model with NaN or ∞ in its weights (the same read as the provenance hashes, cached)."""
    for path in model.weight_files:
        bad = _scanned(path)[1]
        if bad is not None:
            raise RealignError(f"{model.ref}: tensor {bad} in {path.name} holds NaN or infinite values; a repair would "
                               "copy them into the output: fix or re-download the model")


def weights_sha256(model: Model) -> dict[str, str]:
    """{file name: sha256} of every weight file a model reads (adapter files first)."""
    return {str(p.name if p.parent in (model.path,) else p): sha256_file(p) for p in model.weight_files}
