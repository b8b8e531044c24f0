"""Generation backends: greedy decoding of many prompts, fast and reproducible.

``HFBackend`` runs a transformers model: prompts are sorted by length and decoded in batches
with LEFT padding and an attention mask, so that every prompt ends at the same position and the
model (which derives position ids from the mask) sees exactly what it would see alone; batched
outputs therefore equal one-at-a-time outputs. ``VLLMBackend`` hands the same token ids to vLLM
(``pip install 'realign[vllm]'``, GPU) for large evaluations; it is written for vLLM
``>=0.10,<0.12`` (``VLLM_VERSIONS``), whose LoRA rules it follows.

Both take already formatted prompt texts (see ``realign.prompts.format_prompt``) and return the
responses in input order.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from realign.errors import RealignError
from realign.progress import progress

if TYPE_CHECKING:
    from realign.sources import Model

# The vLLM releases whose LoRA rules this backend follows (pyproject's `vllm` extra pins the same):
# one scale lora_alpha / r (or / sqrt(r) with rsLoRA) for every module, rank_pattern/alpha_pattern
# ignored; no modules_to_save, no DoRA, no adapter biases; max_lora_rank from _VLLM_LORA_RANKS.
VLLM_VERSIONS = ">=0.10,<0.12"
VLLM_MISSING = "vLLM is not installed: pip install 'realign[vllm]' (needs a GPU)"
# max_lora_rank values every release in VLLM_VERSIONS accepts (1 only since 0.11).
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class Backend(Protocol):
    """Greedy generation over formatted prompt texts."""

    tokenizer: Any

    def generate(self, texts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[str]: ...


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt. A chat template usually writes the BOS token itself; adding
    it again would change the model's input, so special tokens are added only when it did not."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation config's
    (chat models often have several, e.g. <|eot_id|> besides <|end_of_text|>)."""
    ids: list[int] = []
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(gen_cfg.eos_token_id)
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (padding is wasted compute,
    and the largest batch runs first so an out-of-memory error shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k]
    return ids


class HFBackend:
    """Batched greedy generation with a loaded transformers model (any device, any dtype)."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        if batch_size < 1:
            raise RealignError(f"batch size must be at least 1, not {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = int(pad)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # A fresh config: a checkpoint's own sampling settings (temperature, top_p, repetition
        # penalty) must not leak into greedy evaluation.
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
            bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
        )

    @torch.no_grad()
    def _run_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            if p:
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
        device = self.device
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=self._generation_config(max_new_tokens),
        )
        eos = set(self.eos_ids)
        return [_cut_at_eos(row.tolist(), eos) for row in out[:, width:].cpu()]

    def generate_ids(self, prompts: Sequence[list[int]], max_new_tokens: int,
                     desc: str = "generating") -> list[list[int]]:
        """Greedy continuations (token ids, EOS excluded) of tokenised prompts, in input order."""
        if max_new_tokens < 1:
            raise RealignError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise RealignError(f"prompt {empty[0] + 1} is empty after tokenisation: nothing to continue from")
        results: list[list[int] | None] = [None] * len(prompts)
        batches = length_sorted_batches([len(p) for p in prompts], self.batch_size)
        queue = list(batches)
        bar = progress(range(len(prompts)), desc=desc, total=len(prompts), unit="prompt")
        while queue:
            batch = queue.pop(0)
            try:
                outs = self._run_batch([list(prompts[i]) for i in batch], max_new_tokens)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise RealignError("out of memory generating a single prompt: use a smaller model, "
                                       "--dtype bfloat16, or fewer max new tokens") from None
                # Halve and retry: greedy outputs do not depend on the batch composition.
                torch.cuda.empty_cache()
                half = len(batch) // 2
                queue[:0] = [batch[:half], batch[half:]]
                continue
            for i, o in zip(batch, outs, strict=True):
                results[i] = o
            for _ in batch:
                next(bar, None)
        for _ in bar:  # close the bar
            pass
        return [r if r is not None else [] for r in results]

    def generate(self, texts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[str]:
        """Greedy responses to formatted prompt texts, in input order."""
        prompts = [encode_prompt(self.tokenizer, t) for t in texts]
        outs = self.generate_ids(prompts, max_new_tokens, desc=desc)
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs]


# ----------------------------------------------------------------------------- vLLM
def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of this rank."""
    for r in _VLLM_LORA_RANKS:
        if rank <= r:
            return r
    raise RealignError(f"LoRA rank {rank} is larger than vLLM supports ({_VLLM_LORA_RANKS[-1]}): use --backend hf")


def vllm_max_lora_rank(source: Model) -> int:
    """max_lora_rank for an adapter: from every rank it has (r, each rank_pattern value, each
    module's factors), since vLLM sizes its LoRA buffers by it for every module."""
    assert source.adapter is not None
    return vllm_lora_rank(max(source.adapter.all_ranks))


def check_vllm_servable(source: Model) -> None:
    """Refuse, in one line naming the field, an adapter vLLM would refuse or serve as another
    model: vLLM loads LoRA factors of linear modules and nothing else."""
    ad = source.adapter
    if ad is None:
        return
    cfg = ad.config
    problem = None
    if ad.embeddings or "lm_head" in ad.modules:
        problem = "LoRA on the embeddings or the output layer (target_modules)"
    elif cfg.get("modules_to_save") or (ad.full_tensors and cfg.get("bias", "none") == "none"):
        problem = "modules_to_save (whole modules saved with the adapter)"
    elif ad.full_tensors or cfg.get("bias", "none") != "none":
        problem = f"bias={cfg.get('bias')!r} (trained base biases saved with the adapter)"
    elif ad.biases:
        problem = "lora_bias=True (a bias on lora_B)"
    elif ad.token_rows:
        problem = "trainable_token_indices (replaced embedding rows)"
    if problem:
        raise RealignError(f"adapter {source.ref} uses {problem}, which vLLM {VLLM_VERSIONS} does not serve: use "
                           "--backend hf (it merges the adapter as PEFT does)")


def vllm_scale(config: dict[str, Any]) -> float:
    """The one scale vLLM applies to every module of an adapter (its PEFTHelper)."""
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def vllm_adapter_dir(source: Model, tmp: Path) -> Path:
    """The adapter directory to hand vLLM. vLLM ignores rank_pattern/alpha_pattern and scales
    every module by lora_alpha / r: where PEFT gives a module another scale s_m, a copy is written
    under ``tmp`` with that module's B times s_m / s (and alpha_pattern entries that give PEFT the
    same s), so vLLM and PEFT both serve the adapter's own model. Else the adapter itself."""
    from realign.writer import write_adapter

    ad = source.adapter
    assert ad is not None
    global_scale = vllm_scale(ad.config)
    ratios = {m: ad.scale(m) / global_scale for m in ad.modules}
    if all(math.isclose(r, 1.0, rel_tol=1e-6) for r in ratios.values()):
        return Path(source.path)
    config = dict(ad.config)
    root = (lambda r: math.sqrt(r)) if config.get("use_rslora") else (lambda r: r)
    # exact names, one per module: PEFT resolves each to its own entry, whatever came before
    config["alpha_pattern"] = {m: global_scale * root(ad.rank(m)) for m in ad.modules}
    tensors = {name: ad.store.get(name) for name in ad.store.names}
    for module, ratio in ratios.items():
        b_name = ad.modules[module][1]
        tensors[b_name] = (tensors[b_name].float() * ratio).to(tensors[b_name].dtype)
    out = Path(tmp) / "adapter"
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(out, config, tensors)
    return out


def _import_vllm():
    try:
        import vllm  # type: ignore[import-not-found]
        from vllm.lora.request import LoRARequest  # type: ignore[import-not-found]
    except ImportError:
        raise RealignError(VLLM_MISSING) from None
    return vllm, LoRARequest


def _one_line(what: str, e: Exception) -> RealignError:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return RealignError(f"{what} ({type(e).__name__}: {first})" if first else f"{what} ({type(e).__name__})")


class VLLMBackend:
    """Greedy generation with vLLM (offline ``LLM`` engine), for vLLM ``VLLM_VERSIONS``. A LoRA
    adapter is served through vLLM's LoRA support (``enable_lora`` + ``LoRARequest``) instead of
    being merged; adapters vLLM cannot serve are refused before vLLM is imported.

    Prompts are tokenised by the model's Hugging Face tokenizer and passed as token ids, so both
    backends feed the model the same input."""

    def __init__(self, model_ref: str | os.PathLike, adapter: str | os.PathLike | None = None,
                 dtype: str = "auto", tokenizer=None, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, allow_pickle: bool = False, **llm_kwargs: Any):
        from realign.compute import load_tokenizer, resolve_dtype
        from realign.sources import load_model as open_model

        source = open_model(model_ref, allow_pickle=allow_pickle)
        if adapter is not None:
            if source.is_adapter:
                raise RealignError(f"{source.ref} is already an adapter; pass its base model with --adapter")
            source = open_model(adapter, base=source.path, allow_pickle=allow_pickle)
        check_vllm_servable(source)
        max_rank = vllm_max_lora_rank(source) if source.is_adapter else None
        vllm, LoRARequest = _import_vllm()
        base = source.base if source.is_adapter else source
        assert base is not None
        self.source = source
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
        torch_dtype = resolve_dtype(dtype, torch.device("cuda"))
        kwargs: dict[str, Any] = {
            "model": str(base.path),
            "tokenizer": str(source.tokenizer_dir),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "gpu_memory_utilization": gpu_memory_utilization,
            "seed": 0,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.lora_request = None
        if source.is_adapter:
            self._tmp = tempfile.TemporaryDirectory(prefix="realign-vllm-")  # lives as long as the backend
            served = vllm_adapter_dir(source, Path(self._tmp.name))
            kwargs.update(enable_lora=True, max_lora_rank=max_rank, max_loras=1)
            self.lora_request = LoRARequest("realign-adapter", 1, str(served))
        kwargs.update(llm_kwargs)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 — engine start-up failures become one line
            raise _one_line(f"vLLM could not load {source.ref}", e) from None
        self._SamplingParams = vllm.SamplingParams
        self.eos_ids = eos_token_ids(self.tokenizer)

    def generate(self, texts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[str]:
        params = self._SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                      stop_token_ids=self.eos_ids or None, skip_special_tokens=True)
        prompts = [{"prompt_token_ids": encode_prompt(self.tokenizer, t)} for t in texts]
        show = os.environ.get("REALIGN_QUIET") != "1"
        try:
            outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=show)
        except Exception as e:  # noqa: BLE001 — vLLM's errors (LoRA loading happens here) become one line
            raise _one_line(f"vLLM failed generating with {self.source.ref}", e) from None
        # vLLM returns outputs in request order.
        return [o.outputs[0].text for o in outputs]


__all__ = ["Backend", "HFBackend", "VLLMBackend", "VLLM_MISSING", "VLLM_VERSIONS", "encode_prompt", "eos_token_ids",
           "length_sorted_batches", "vllm_lora_rank", "vllm_max_lora_rank", "check_vllm_servable", "vllm_scale",
           "vllm_adapter_dir"]
