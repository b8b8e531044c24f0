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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from realign.archs import LAYER_PREFIX, Arch
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


BLOCK_GRAM = 512  # Gram matrices at least this wide are summed by blocks (Accumulator._add_gram)


class Accumulator:
    """Forward hooks on named linear modules of ``model`` that add the current batch's selected
    token positions (``batch(mask)``) to the running sums of ``stats``. It serves a forward of the
    whole model (``collect``) as well as one decoder layer run on its own (``realign.layerwise``):
    the hooks sit on the modules, whatever calls them. ``finish()`` completes the sums after the
    last batch; ``remove()`` takes the hooks off."""

    def __init__(self, model, stats: Stats, *, gram: Sequence[str] = (), out_gram: Sequence[str] = (),
                 sqnorm: Sequence[str] = (), capture: Sequence[str] = (),
                 project: Mapping[str, torch.Tensor] | None = None):
        self.stats = stats
        self.mask: torch.Tensor | None = None
        self.handles: list = []
        self._mirror: list[tuple[dict[str, torch.Tensor], str]] = []
        device = next(model.parameters()).device
        project = {name: p.to(device=device, dtype=torch.float32) for name, p in (project or {}).items()}
        gram, sqnorm, capture = set(gram), set(sqnorm), set(capture)
        # A bias-free float32 module's output IS S = X Wᵀ: read it instead of multiplying again (the
        # output Gram then costs no more than an input Gram). Lower precisions recompute in float32.
        from_output = set()
        for name in out_gram:
            module = model.get_submodule(name)
            if getattr(module, "bias", None) is None and module.weight.dtype == torch.float32:
                from_output.add(name)
                self.handles.append(module.register_forward_hook(self._out_hook(name)))
        recompute = set(out_gram) - from_output
        for name in sorted(gram | recompute | sqnorm | capture | set(project)):
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(
                self._pre_hook(name, name in gram, name in recompute, name in sqnorm, name in capture,
                               project.get(name))))

    def batch(self, mask: torch.Tensor) -> None:
        """The (B, T) bool mask of the positions that count in the next forward call."""
        self.mask = mask
        self.stats.tokens += int(mask.sum())
        self.stats.examples += mask.shape[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @staticmethod
    def _add(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        store[name] = store[name] + value if name in store else value

    def _add_gram(self, store: dict[str, torch.Tensor], name: str, s: torch.Tensor) -> None:
        """store[name] += sᵀs, in place. From ``BLOCK_GRAM`` columns on, only the upper 2 × 2 block
        triangle is summed (3/4 of the products); ``finish`` mirrors it."""
        d = s.shape[1]
        if d < BLOCK_GRAM:
            if name in store:
                store[name].addmm_(s.T, s)
            else:
                store[name] = s.T @ s
            return
        if name not in store:
            store[name] = s.new_zeros(d, d)
            self._mirror.append((store, name))
        g, b = store[name], d // 2
        a1, a2 = s[:, :b], s[:, b:]
        g[:b, :b].addmm_(a1.T, a1)
        g[:b, b:].addmm_(a1.T, a2)
        g[b:, b:].addmm_(a2.T, a2)

    def finish(self) -> None:
        """Complete the Gram matrices summed by blocks (call once, after the last batch)."""
        for store, name in self._mirror:
            g = store[name]
            b = g.shape[0] // 2
            g[b:, :b] = g[:b, b:].T
        self._mirror.clear()

    def _pre_hook(self, name: str, gram: bool, out_gram: bool, sqnorm: bool, capture: bool,
                  project: torch.Tensor | None):
        stats = self.stats

        def hook(module, args):
            x = args[0]
            sel = x[self.mask.to(x.device)].float()  # (selected tokens, d_in)
            if gram:
                self._add_gram(stats.gram, name, sel)
            if out_gram:
                self._add_gram(stats.out_gram, name, sel @ module.weight.float().T)
            if project is not None:
                self._add_gram(stats.proj_gram, name, sel @ project.T)
            if sqnorm:
                self._add(stats.sqnorm, name, (sel * sel).sum(0))
            if capture:
                counts = self.mask.sum(1).tolist()
                stats.capture.setdefault(name, []).extend(t.cpu() for t in sel.split(counts))
        return hook

    def _out_hook(self, name: str):
        def hook(module, args, output):
            self._add_gram(self.stats.out_gram, name, output[self.mask.to(output.device)])
        return hook


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
    hidden_at: str = "output",
    positions: str = "response",
    last_k: int = 1,
    batch_size: int = 8,
    desc: str = "calibration pass",
) -> Stats:
    """One forward pass over ``encoded`` (module names are those of ``arch.module_name``).

    ``hidden``: per example, each decoder layer's hidden state at the last prompt token, read at
    ``hidden_at``: ``output`` (layer l's output; the last layer's before the final norm) or
    ``input`` (the residual stream entering layer l: the embeddings for l = 0, else layer l − 1's
    output)."""
    if hidden_at not in ("output", "input"):
        raise ValueError("hidden_at must be output or input")
    device = next(model.parameters()).device
    stats = Stats()
    acc = Accumulator(model, stats, gram=gram, out_gram=out_gram, sqnorm=sqnorm, capture=capture, project=project)
    handles = acc.handles
    # Layer inputs are read by hooks on the layers. Outputs come from transformers' hidden_states
    # ([l + 1] is layer l's output), except the last one, which comes after the final norm: the
    # last layer's own output is that norm's input, captured here so every layer is on the
    # residual stream's scale.
    seen: list[torch.Tensor] = []
    if hidden and hidden_at == "input":
        for layer in range(arch.num_layers):
            handles.append(model.get_submodule(layer_name(arch, layer)).register_forward_pre_hook(
                lambda _m, args, kwargs: seen.append(_hidden_arg(args, kwargs).detach()), with_kwargs=True))
    final_norm = final_norm_name(model, arch) if hidden and hidden_at == "output" else None
    if final_norm:
        handles.append(model.get_submodule(final_norm).register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach())))
    hidden_rows: list[torch.Tensor] = []
    try:
        for start in progress(range(0, len(encoded), batch_size), desc=desc,
                              total=(len(encoded) + batch_size - 1) // batch_size, unit="batch"):
            batch = list(encoded[start:start + batch_size])
            ids, attn = padded(batch)
            acc.batch(position_mask(batch, ids.shape[1], positions, last_k))
            seen.clear()
            out = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                        output_hidden_states=hidden and hidden_at == "output", use_cache=False)
            if hidden:
                last = torch.tensor([e.prompt_len - 1 for e in batch], device=device)
                rows = torch.arange(len(batch), device=device)
                per_layer = list(seen) if hidden_at == "input" else list(out.hidden_states[1:])
                if final_norm and seen:
                    per_layer[-1] = seen[-1]
                hidden_rows.append(torch.stack([h[rows.to(h.device), last.to(h.device)].float().cpu()
                                                for h in per_layer], dim=1))
        acc.finish()
    finally:
        acc.remove()
    if hidden_rows:
        stats.hidden = torch.cat(hidden_rows)
    return stats


def layer_name(arch: Arch, layer: int) -> str:
    """The module name of decoder layer ``layer``."""
    return LAYER_PREFIX.format(layer=layer)


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


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


def example_gradient_sums(
    model,
    encoded: Sequence[Encoded],
    modules: Sequence[str],
    *,
    transform: Mapping[str, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] | None = None,
    positions: str = "response",
    batch_size: int = 8,
    desc: str = "per-example gradient pass",
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Σ_n |∂L_n/∂W| for the weight W of each named linear module, L_n being the mean next-token
    NLL of example n's tokens at ``positions`` (as a causal-LM loss with labels computes it), in
    float32 on the model's device. ``transform[name]`` maps each example's gradient G_n to the
    tensors whose absolute values are summed instead (e.g. the gradients of a LoRA factor pair).

    One forward + backward pass per batch: the backward of Σ_n L_n gives each example's output
    gradient δ_n separately (examples do not interact), and G_n = δ_nᵀ X_n is formed from the
    module's input X_n, one example at a time. No parameter gets a gradient, so memory is the
    model, the batch's activations and one sum per module."""
    device = next(model.parameters()).device
    transform = transform or {}
    sums: dict[str, list[torch.Tensor]] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def on_grad(name: str):
        def hook(g: torch.Tensor) -> None:
            x = inputs.pop(name)
            fn = transform.get(name, lambda grad: (grad,))
            for n in range(g.shape[0]):
                parts = fn(g[n].float().T @ x[n].float())
                if name not in sums:
                    sums[name] = [torch.zeros_like(t) for t in parts]
                for acc, t in zip(sums[name], parts, strict=True):
                    acc.add_(t.abs())
        return hook

    def forward_hook(name: str):
        def hook(_module, args, out):
            inputs[name] = args[0].detach()
            out.register_hook(on_grad(name))
        return hook

    named = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in named.items()}
    try:
        for p in named.values():
            p.requires_grad_(False)
        for name in modules:
            handles.append(model.get_submodule(name).register_forward_hook(forward_hook(name)))
        # gradients flow from the embeddings on, so no weight needs one
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda _m, _a, out: out.detach().requires_grad_(True)))
        with torch.enable_grad():
            for ids, attn, mask, _batch in progress(
                    _batches(encoded, batch_size, positions), desc=desc,
                    total=(len(encoded) + batch_size - 1) // batch_size, unit="batch"):
                ids, attn = ids.to(device), attn.to(device)
                target = mask[:, 1:].to(device)  # each token is predicted from the one before it
                counts = target.sum(1)
                if not bool(counts.any()):
                    continue
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                        reduction="none")
                per_example = (nll * target).sum(1) / counts.clamp_min(1)
                per_example.sum().backward()
                inputs.clear()
    finally:
        for h in handles:
            h.remove()
        for n, p in named.items():
            p.requires_grad_(saved[n])
    missing = [m for m in modules if m not in sums]
    for name in missing:  # never reached by the loss: a zero gradient
        w = model.get_submodule(name).weight
        probe = transform.get(name, lambda grad: (grad,))(torch.zeros(w.shape, device=w.device))
        sums[name] = [torch.zeros_like(t) for t in probe]
    return {name: tuple(v) for name, v in sums.items()}


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
