"""Calibration statistics from ONE pass of a model over calibration data, with forward hooks that
keep running sums. Methods ask for what they need; nothing stores all activations and nothing
re-runs the data per layer.

Available statistics (per linear module, over the selected token positions):
- ``gram``:      XᵀX (d_in × d_in), the input Gram matrix;
- ``out_gram``:  SᵀS with S = X Wᵀ (d_out × d_out), i.e. W·XᵀX·Wᵀ without forming XᵀX — the
                 cheaper of the two when d_out < d_in;
- ``sqnorm``:    Σ x_j² per input column (Wanda's ‖X_j‖₂ is its square root);
- ``project``:   (X Pᵀ)ᵀ(X Pᵀ) for a given matrix P per module (k × d_in), e.g. the input Gram of a
                 LoRA B factor (P = A) without forming XᵀX;
- ``capture``:   the module input at the selected positions, per example (e.g. per-head attention
                 outputs before o_proj at the last T response tokens);
- ``hidden``:    each layer's output hidden state at the last prompt token, per example (the
                 last layer's before the final norm, like every other layer's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from realign.archs import Arch
from realign.progress import progress
from realign.prompts import format_prompt, resolve_template

POSITIONS = ("response", "prompt", "all", "last_prompt", "last_response", "first_response")


@dataclass
class Encoded:
    """One tokenised example: prompt tokens then response tokens (no end-of-turn in the response)."""

    input_ids: list[int]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def encode(tokenizer, items: Sequence[tuple[str, str | None]], template: str = "auto",
           max_length: int = 512) -> list[Encoded]:
    """Tokenise (prompt, response) pairs. Prompt and response are tokenised separately so the
    response positions are exact; responses are truncated to fit ``max_length``."""
    template = resolve_template(tokenizer, template)
    out = []
    for prompt, response in items:
        text = format_prompt(tokenizer, prompt, template)
        # Chat templates write their own special tokens; the other templates want the BOS.
        p_ids = tokenizer(text, add_special_tokens=template != "chat")["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
        p_ids = p_ids[-max_length:]
        r_ids = r_ids[: max(0, max_length - len(p_ids))]
        out.append(Encoded(list(p_ids) + list(r_ids), len(p_ids)))
    return out


def padded(batch: Sequence[Encoded], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``batch``, right-padded to its longest example."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    attn = torch.zeros(len(batch), length, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attn[i, : len(e.input_ids)] = 1
    return ids, attn


def position_mask(batch: list[Encoded], length: int, positions: str, last_k: int = 1) -> torch.Tensor:
    """(B, length) bool: which token positions count, for right-padded ``batch``."""
    mask = torch.zeros(len(batch), length, dtype=torch.bool)
    for i, ex in enumerate(batch):
        n, p = len(ex.input_ids), ex.prompt_len
        if positions == "response":
            mask[i, p:n] = True
        elif positions == "prompt":
            mask[i, :p] = True
        elif positions == "all":
            mask[i, :n] = True
        elif positions == "last_prompt":
            mask[i, p - 1] = True
        elif positions == "last_response":
            mask[i, max(p, n - last_k):n] = True
        elif positions == "first_response":
            mask[i, p:min(n, p + last_k)] = True
        else:
            raise ValueError(f"positions must be one of {POSITIONS}")
    return mask


@dataclass
class Stats:
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    out_gram: dict[str, torch.Tensor] = field(default_factory=dict)
    proj_gram: dict[str, torch.Tensor] = field(default_factory=dict)
    sqnorm: dict[str, torch.Tensor] = field(default_factory=dict)
    capture: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per example: (positions, d_in)
    hidden: torch.Tensor | None = None  # (examples, layers, hidden) at the last prompt token
    tokens: int = 0  # selected token positions seen
    examples: int = 0

    def column_norms(self, module: str) -> torch.Tensor:
        return self.sqnorm[module].sqrt()


@torch.no_grad()
def collect(
    model,
    arch: Arch,
    encoded: Sequence[Encoded],
    *,
    gram: Sequence[str] = (),
    out_gram: Sequence[str] = (),
    sqnorm: Sequence[str] = (),
    capture: Sequence[str] = (),
    project: Mapping[str, torch.Tensor] | None = None,
    hidden: bool = False,
    positions: str = "response",
    last_k: int = 1,
    batch_size: int = 8,
    desc: str = "calibration pass",
) -> Stats:
    """One forward pass over ``encoded`` (module names are those of ``arch.module_name``)."""
    device = next(model.parameters()).device
    stats = Stats()
    project = {name: p.to(device=device, dtype=torch.float32) for name, p in (project or {}).items()}
    state: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook(name: str):
        def hook(module, args):
            x = args[0]
            sel = x[state["mask"].to(x.device)].float()  # (selected tokens, d_in)
            if name in gram:
                g = sel.T @ sel
                stats.gram[name] = stats.gram[name] + g if name in stats.gram else g
            if name in out_gram and name not in from_output:
                s = sel @ module.weight.float().T
                g = s.T @ s
                stats.out_gram[name] = stats.out_gram[name] + g if name in stats.out_gram else g
            if name in project:
                s = sel @ project[name].T
                g = s.T @ s
                stats.proj_gram[name] = stats.proj_gram[name] + g if name in stats.proj_gram else g
            if name in sqnorm:
                q = (sel * sel).sum(0)
                stats.sqnorm[name] = stats.sqnorm[name] + q if name in stats.sqnorm else q
            if name in capture:
                counts = state["mask"].sum(1).tolist()
                stats.capture.setdefault(name, []).extend(t.cpu() for t in sel.split(counts))
        return hook

    def out_hook(name: str):
        def hook(module, args, output):
            s = output[state["mask"].to(output.device)]
            g = s.T @ s
            stats.out_gram[name] = stats.out_gram[name] + g if name in stats.out_gram else g
        return hook

    # A bias-free float32 module's output IS S = X Wᵀ: read it instead of multiplying again (the
    # output Gram then costs no more than an input Gram). Lower precisions recompute in float32.
    from_output = set()
    for name in out_gram:
        module = model.get_submodule(name)
        if getattr(module, "bias", None) is None and module.weight.dtype == torch.float32:
            from_output.add(name)
            handles.append(module.register_forward_hook(out_hook(name)))
    for name in {*gram, *out_gram, *sqnorm, *capture, *project} - (from_output - {*gram, *sqnorm, *capture, *project}):
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook(name)))
    hidden_rows: list[torch.Tensor] = []
    # transformers' last hidden state comes after the final norm; the last layer's own output is
    # that norm's input, captured here so every layer is on the residual stream's scale.
    final_in: list[torch.Tensor] = []
    final_norm = final_norm_name(model, arch) if hidden else None
    if final_norm:
        handles.append(model.get_submodule(final_norm).register_forward_pre_hook(
            lambda _m, args: final_in.append(args[0].detach())))
    try:
        order = list(range(len(encoded)))
        for start in progress(range(0, len(order), batch_size), desc=desc,
                              total=(len(order) + batch_size - 1) // batch_size, unit="batch"):
            batch = [encoded[i] for i in order[start:start + batch_size]]
            ids, attn = padded(batch)
            length = ids.shape[1]
            state["mask"] = position_mask(batch, length, positions, last_k)
            stats.tokens += int(state["mask"].sum())
            stats.examples += len(batch)
            out = model(input_ids=ids.to(device), attention_mask=attn.to(device), output_hidden_states=hidden,
                        use_cache=False)
            if hidden:
                last = torch.tensor([e.prompt_len - 1 for e in batch], device=device)
                rows = torch.arange(len(batch), device=device)
                # hidden_states[0] is the embedding output; [l + 1] is layer l's output.
                per_layer = [h[rows, last].float().cpu() for h in out.hidden_states[1:]]
                if final_in:
                    per_layer[-1] = final_in.pop()[rows, last].float().cpu()
                    final_in.clear()
                hidden_rows.append(torch.stack(per_layer, dim=1))
    finally:
        for h in handles:
            h.remove()
    if hidden_rows:
        stats.hidden = torch.cat(hidden_rows)
    return stats


def _batches(encoded: Sequence[Encoded], batch_size: int, positions: str, last_k: int = 1):
    """Right-padded (input_ids, attention_mask, position mask, batch) per batch, in order."""
    for start in range(0, len(encoded), batch_size):
        batch = list(encoded[start:start + batch_size])
        ids, attn = padded(batch)
        yield ids, attn, position_mask(batch, ids.shape[1], positions, last_k), batch


def loss_gradients(
    model,
    encoded: Sequence[Encoded],
    parameters: Sequence[str],
    *,
    positions: str = "response",
    batch_size: int = 8,
    desc: str = "gradient pass",
) -> dict[str, torch.Tensor]:
    """∂L/∂θ for the named parameters (in their dtype), with L the mean next-token NLL of the tokens
    at ``positions`` over all of ``encoded``: ONE forward+backward pass, gradients summed over batches.

    Only the named parameters get gradients (the others stay frozen), so memory is the model plus
    one gradient per named parameter."""
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    missing = [p for p in parameters if p not in named]
    if missing:
        raise KeyError(f"model has no parameter {missing[0]}")
    saved = {n: p.requires_grad for n, p in named.items()}
    # Each token is predicted from the one before it, so position 0 never counts.
    total = sum(int(position_mask([e], len(e.input_ids), positions)[0, 1:].sum()) for e in encoded)
    grads: dict[str, torch.Tensor] = {}
    try:
        for n, p in named.items():
            p.requires_grad_(n in parameters)
            p.grad = None
        with torch.enable_grad():
            for ids, attn, mask, _batch in progress(
                    _batches(encoded, batch_size, positions), desc=desc,
                    total=(len(encoded) + batch_size - 1) // batch_size, unit="batch"):
                ids, attn = ids.to(device), attn.to(device)
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                target = mask[:, 1:].to(device)
                if not bool(target.any()):
                    continue
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1][target].float(), ids[:, 1:][target], reduction="sum") / max(total, 1)
                loss.backward()
        for n in parameters:
            g = named[n].grad
            grads[n] = g.detach() if g is not None else torch.zeros_like(named[n])
    finally:
        for n, p in named.items():
            p.grad = None
            p.requires_grad_(saved[n])
    return grads


def final_norm_name(model, arch) -> str | None:
    """Name of the norm after the last decoder layer (its input is the last layer's residual output)."""
    prefix = arch.module_name(0, "o").split("layers.0.")[0]
    for name in (f"{prefix}norm", f"{prefix}final_layernorm"):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    return None
