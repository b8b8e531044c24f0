"""Model sources: one notion of "a model" — a local Hugging Face directory, a hub id, or a PEFT
LoRA adapter on top of one — with lazy, tensor-by-tensor access to its weights.

``Model.get(name)`` returns one tensor with its stored dtype. For a LoRA adapter it returns the
dense ``W + s·B·A`` of that module (``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
rsLoRA), so methods see every fine-tune as dense weights without loading the whole model.
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
@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: per-module factors and scale, read lazily."""

    directory: Path
    config: dict[str, Any]
    store: TensorStore
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # module -> (A name, B name)
    full_tensors: dict[str, str] = field(default_factory=dict)  # model tensor -> adapter tensor (modules_to_save)

    @classmethod
    def open(cls, directory: Path, allow_pickle: bool = False) -> LoraAdapter:
        config = read_json_object(directory / "adapter_config.json")
        rank = config.get("r", 8)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise RealignError(f"adapter {directory}: r = {rank!r} in adapter_config.json; a LoRA rank is an integer "
                               "≥ 1")
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise RealignError(f"adapter {directory} is {peft_type}; realign handles LoRA adapters only")
        if config.get("use_dora"):
            raise RealignError(f"adapter {directory} is DoRA; realign handles plain LoRA adapters only (merge it)")
        if config.get("fan_in_fan_out"):
            raise RealignError(f"adapter {directory} uses fan_in_fan_out (Conv1D), which no supported family has")
        store = TensorStore(directory, prefix="adapter_model", allow_pickle=allow_pickle)
        adapter = cls(directory, config, store)
        pattern = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")
        parts: dict[str, dict[str, str]] = {}
        for name in store.names:
            m = pattern.match(name)
            if m:
                module = m.group(1).removeprefix(ADAPTER_PREFIX)
                parts.setdefault(module, {})[m.group(2)] = name
            elif name.startswith(ADAPTER_PREFIX) and "lora_" not in name:
                # modules_to_save tensors replace the base tensor outright.
                target = name.removeprefix(ADAPTER_PREFIX).replace(".modules_to_save.default", "")
                target = target.replace(".modules_to_save", "")
                adapter.full_tensors[target] = name
            elif "lora_magnitude_vector" in name or "lora_embedding" in name:
                raise RealignError(f"adapter {directory} has {name}: only LoRA on linear layers is handled")
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise RealignError(f"adapter {directory} has an incomplete LoRA pair for {module}")
            adapter.modules[module] = (ab["A"], ab["B"])
        return adapter

    def scale(self, module: str) -> float:
        rank = int(self.config.get("r", 8))
        alpha = float(self.config.get("lora_alpha", rank))
        for key, value in (self.config.get("rank_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(key)}$", module) or key == module:
                rank = int(value)
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(key)}$", module) or key == module:
                alpha = float(value)
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) with delta = s · B @ A, or None when the adapter does not touch the module."""
        if module not in self.modules:
            return None
        a_name, b_name = self.modules[module]
        return self.store.get(a_name), self.store.get(b_name), self.scale(module)

    def delta(self, module: str) -> torch.Tensor | None:
        f = self.factors(module)
        if f is None:
            return None
        a, b, s = f
        return s * (b.float() @ a.float())

    @property
    def base_ref(self) -> str | None:
        return self.config.get("base_model_name_or_path")


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
        """The dense checkpoint whose tensor names this model exposes."""
        return self.store if self.store is not None else self.base.weights  # type: ignore[union-attr]

    @property
    def tensor_names(self) -> list[str]:
        return self.weights.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.weights.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.weights.dtype(name)

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def get(self, name: str) -> torch.Tensor:
        """One tensor, dense, in its stored dtype (adapters merged in float32, then cast back)."""
        if self.adapter is None:
            assert self.store is not None
            return self.store.get(name)
        if name in self.adapter.full_tensors:
            return self.adapter.store.get(self.adapter.full_tensors[name]).to(self.dtype(name))
        base = self.base.get(name)  # type: ignore[union-attr]
        if name.endswith(".weight"):
            delta = self.adapter.delta(name.removesuffix(".weight"))
            if delta is not None:
                if delta.shape != base.shape:
                    raise RealignError(
                        f"adapter {self.path} does not fit its base: {name} is {list(base.shape)} in the base "
                        f"but the LoRA update is {list(delta.shape)}"
                    )
                return (base.float() + delta).to(base.dtype)
        return base

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


def _from_hub(ref: str) -> Path:
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    try:
        return Path(snapshot_download(ref, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 — every hub failure becomes the same one-line advice
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}"
        raise RealignError(
            f"model {ref!r} is not a local directory and could not be fetched from the hub ({why}); "
            f"it is not in the local cache ({cache}): pass a local directory, or download it with "
            "network access and HF_HUB_OFFLINE unset"
        ) from None


def _locate(ref: str) -> Path:
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RealignError(f"{ref} is a file; a model is a directory in Hugging Face format (or a hub id)")
        return path.resolve()
    if _looks_like_hub_id(ref):
        return _from_hub(ref)
    raise RealignError(f"model directory {ref} does not exist")


def load_model(ref: str | os.PathLike, base: str | os.PathLike | None = None, allow_pickle: bool = False) -> Model:
    """Resolve a model reference (directory, hub id, or LoRA adapter directory) for lazy reading.

    For an adapter, the base comes from ``base`` when given, else from the adapter config's
    ``base_model_name_or_path`` (resolved relative to the adapter directory when it is a relative path).
    """
    ref = str(ref)
    path = _locate(ref)
    if (path / "adapter_config.json").exists():
        adapter = LoraAdapter.open(path, allow_pickle=allow_pickle)
        base_ref = str(base) if base is not None else adapter.base_ref
        if not base_ref:
            raise RealignError(f"adapter {ref} does not name its base model: pass the base explicitly")
        if base is None and not Path(base_ref).is_absolute() and (path / base_ref).exists():
            base_ref = str((path / base_ref).resolve())
        base_model = load_model(base_ref, allow_pickle=allow_pickle)
        if base_model.is_adapter:
            raise RealignError(f"the base of adapter {ref} is itself an adapter: merge it first")
        model = Model(ref, path, base_model.config, adapter=adapter, base=base_model)
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
    return Model(ref, path, config, store=TensorStore(path, allow_pickle=allow_pickle))


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
