"""Vectors added to attention outputs, in the three forms a user can take them away in.

Activation-steering methods (SafetyLock, the refusal-direction baseline) end with "add this
vector to layer l's attention output at every position". Written as ``o_proj(x + d_l)`` — a
displacement ``d_l`` of the heads' outputs before the output projection — or as
``o_proj(x) + v_l`` with ``v_l = W_o,l · d_l``, the same addition takes three forms:

1. **hooks** on a loaded model: forward pre-hooks adding ``d_l`` to ``o_proj``'s input
   (:func:`add_to_inputs`), forward hooks adding ``v_l`` to its output (:func:`add_to_outputs`),
   or ``v_l`` installed as ``o_proj``'s bias in memory (:func:`biased`). All are removable.
2. a **baked checkpoint** (:func:`o_bias_edit`): ``v_l`` becomes the ``o_proj`` bias of every
   layer (zero where nothing is added), q/k/v get zero biases, and the family's config flag is
   set, so stock ``transformers`` reloads the model with the addition. Without the flag the
   biases are silently dropped on reload — the failure this module exists to avoid.
3. an **export** for lm-evaluation-harness's ``steered`` model (:func:`steering_config`): a
   ``.pt`` file mapping hookpoints to ``{"steering_vector", "steering_coefficient", "action":
   "add", "bias": None, "head_index": None}``; lm-eval adds ``coefficient · vector`` to the
   hooked module's output at every position.

``v_l`` is always computed with the weights of the model it is added to (for a fine-tune, the
fine-tuned ``W_o``), using only the columns of ``W_o`` where ``d_l`` is non-zero — a handful of
heads — so computing the biases of an 8B model takes milliseconds.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from realign.archs import LAYER_PREFIX, Arch
from realign.errors import RealignError
from realign.methods.base import Added, Edit
from realign.serving import check_bake_served, unserved_note
from realign.sources import Model

# lm-evaluation-harness resolves hookpoints in ``model.base_model.named_modules()``: for a plain
# causal LM that is the decoder (names without the ``model.`` prefix); for a PEFT model loaded
# with ``peft=ADAPTER`` it is the LoRA wrapper (``model.model.`` prefix).
_DECODER_PREFIX = "model."
_PEFT_PREFIX = "model.model."
STEERING_FILE = "steering.pt"


# ----------------------------------------------------------------------------- the arithmetic
@contextmanager
def single_threaded() -> Iterator[None]:
    """Run small, memory-bound tensor ops on one intra-op thread. Threads buy nothing there, and
    on a busy machine OpenMP's fork/join was measured 10–40× slower than one thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def output_vector(weight: torch.Tensor, displacement: torch.Tensor, native: bool = False) -> torch.Tensor:
    """``W · d`` (float32 result), reading only the columns where ``d`` is non-zero.

    A head's slice is a contiguous run of columns, read as a view: an 8B layer with one locked
    head reads 0.5 M weights, not 16 M. By default the product is exact in float32; ``native``
    computes it in the weight's dtype (the kernel accumulates in float32, the result is rounded
    once), which is 3× faster for half-precision weights and what an in-memory bias of that
    dtype holds anyway."""
    d = displacement.detach().float().reshape(-1).to(weight.device)
    if d.numel() != weight.shape[1]:
        raise RealignError(
            f"internal: displacement of size {d.numel()} does not fit a {list(weight.shape)} projection"
        )
    weight = weight.detach()
    cols = d.nonzero().flatten()
    out = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    if cols.numel() == 0:
        return out
    if cols.numel() * 2 > d.numel():
        return out.addmv_(weight.float(), d)
    cuts = (torch.diff(cols) != 1).nonzero().flatten() + 1
    with single_threaded():
        for run in torch.tensor_split(cols, cuts.cpu()):
            start, width = int(run[0]), run.numel()
            block = weight.narrow(1, start, width)
            if block.dtype == torch.float32:
                out.addmv_(block, d[start:start + width])
            elif native:
                out += torch.mv(block, d[start:start + width].to(block.dtype)).float()
            else:  # copy_ from a strided half-precision view beats .float() on it
                out.addmv_(torch.empty(block.shape, device=block.device).copy_(block), d[start:start + width])
    return out


def _base(model):
    """The transformers model under a PEFT wrapper (module names are then the stock ones)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _module(model, name: str) -> torch.nn.Module:
    try:
        return _base(model).get_submodule(name)
    except AttributeError:
        raise RealignError(f"the loaded model has no module {name}: is it the model family the vectors were made "
                           "for?") from None


# ----------------------------------------------------------------------------- 1. hooks
@contextmanager
def add_to_inputs(model, additions: Mapping[str, torch.Tensor], positions: str = "all") -> Iterator[None]:
    """Forward pre-hooks adding ``additions[name]`` to the (last dimension of the) input of each
    named module, removed on exit. ``positions="all"``: at every position (what a baked bias does);
    ``"last"``: at the last position of each forward call only — ITI's scheme, which during cached
    generation means the last prompt token and then every generated token, never the prompt."""
    if positions not in ("all", "last"):
        raise RealignError(f"positions={positions!r}: use all or last")
    handles = []

    def make(vec: torch.Tensor):
        cache: dict[tuple, torch.Tensor] = {}

        def hook(_module, args):
            x = args[0]
            key = (x.device, x.dtype)
            if key not in cache:  # one cast per device/dtype, not one per forward call
                cache[key] = vec.to(device=x.device, dtype=x.dtype)
            if positions == "last":
                x = x.clone()
                x[..., -1, :] += cache[key]
                return (x, *args[1:])
            return (x + cache[key], *args[1:])
        return hook

    try:
        for name, vec in additions.items():
            handles.append(_module(model, name).register_forward_pre_hook(make(vec.detach())))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_to_outputs(model, additions: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Forward hooks adding ``additions[name]`` to the output of each named module; removed on exit."""
    handles = []

    def make(vec: torch.Tensor):
        def hook(_module, _args, out):
            if isinstance(out, tuple):
                return (out[0] + vec.to(device=out[0].device, dtype=out[0].dtype), *out[1:])
            return out + vec.to(device=out.device, dtype=out.dtype)
        return hook

    try:
        for name, vec in additions.items():
            handles.append(_module(model, name).register_forward_hook(make(vec.detach())))
        yield
    finally:
        for h in handles:
            h.remove()


def install_biases(model, biases: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """Add ``biases[name]`` to the bias of each named linear module of a loaded model (creating
    the bias where the module has none). Returns a function that restores the modules."""
    saved: list[tuple[torch.nn.Module, torch.nn.Parameter | None]] = []
    try:
        for name, vec in biases.items():
            module = _module(model, name)
            old = module.bias
            w = module.weight
            new = vec.detach().to(device=w.device, dtype=torch.float32)
            if old is not None:
                new = new + old.detach().float()
            saved.append((module, old))
            module.bias = torch.nn.Parameter(new.to(w.dtype), requires_grad=False)
    except BaseException:
        _restore(saved)
        raise
    return lambda: _restore(saved)


def _restore(saved: list[tuple[torch.nn.Module, torch.nn.Parameter | None]]) -> None:
    for module, old in reversed(saved):
        module.bias = old


@contextmanager
def biased(model, biases: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """:func:`install_biases` for the duration of a ``with`` block."""
    restore = install_biases(model, biases)
    try:
        yield
    finally:
        restore()


# ----------------------------------------------------------------------------- 2. baked checkpoint
def check_bakeable(arch: Arch, method: str) -> str:
    """The config key that gives ``o_proj`` a bias in this family, or a one-line refusal."""
    if arch.o_bias_flag is None:
        raise RealignError(
            f"{method}: {arch.family} configs cannot give o_proj a bias, so a baked checkpoint would lose the "
            f"addition when reloaded; use --mode export (a steering file for lm-evaluation-harness) or the Python "
            f"hooks (`with lock.applied(model)`) instead"
        )
    return arch.o_bias_flag


def _bias_edit(model: Model, vectors: Mapping[int, Callable[[], torch.Tensor]], method: str, flag: str,
               roles: tuple[str, ...], target: str, servers: dict, scale: float = 1.0) -> Edit:
    """Bake ``vectors[l]() / scale`` as the bias of layer l's ``target`` projection. ``flag`` gives
    every projection in ``roles`` of every layer a bias, so all get one: zero unless the checkpoint
    has it already, plus the vector on ``target`` (added to an existing bias). ``vectors[l]()`` is
    called when the writer reaches that tensor, so at most one layer's weights are read at a time."""
    arch = model.arch
    bad = [layer for layer in vectors if not 0 <= layer < arch.num_layers]
    if bad:
        raise RealignError(f"{method}: layer {bad[0]} is outside the model's {arch.num_layers} layers")
    edit = Edit(config_updates={flag: True})
    for layer in range(arch.num_layers):
        for role in roles:
            weight = arch.weight_name(layer, role)
            name = arch.module_name(layer, role) + ".bias"
            out_dim = model.shape(weight)[0]
            dtype = model.dtype(weight)
            if role == target and layer in vectors:
                produce = vectors[layer]
                if name in model:
                    edit.transforms[name] = lambda old, f=produce: old.float() + f().to(old.device) / scale
                else:
                    edit.added[name] = Added((out_dim,), dtype, lambda f=produce, dt=dtype: (f() / scale).to(dt))
            elif name not in model:
                edit.added[name] = Added((out_dim,), dtype, lambda n=out_dim, dt=dtype: torch.zeros(n, dtype=dt))
    edit.report["bake"] = {"config_flag": flag, f"{target}_proj_bias_of_layers": sorted(vectors),
                           "biases_added": len(edit.added), "servers": servers}
    if note := unserved_note(servers):
        edit.report.setdefault("notes", []).append(note)
    return edit


def o_bias_edit(model: Model, vectors: Mapping[int, Callable[[], torch.Tensor]], method: str,
                serve: str | None = None) -> Edit:
    """The Edit that bakes ``o_proj(x) + v_l`` into a checkpoint of ``model`` (``vectors[l]()``
    returns ``v_l``, float32, hidden size): q/k/v get zero biases, as the family's flag requires.

    ``serve``: the servers it must work in (``realign.serving``; None: all, for a method without
    a ``serve`` parameter); a server that would drop the biases is refused."""
    arch = model.arch
    flag = check_bakeable(arch, method)
    servers = check_bake_served(arch.family, "o_proj", method, serve)
    return _bias_edit(model, vectors, method, flag, ("q", "k", "v", "o"), "o", servers)


def block_output_edit(model: Model, vectors: Mapping[int, Callable[[], torch.Tensor]], method: str,
                      serve: str | None = None) -> Edit:
    """The Edit that bakes "add v_l to the output of decoder layer l" (the residual stream entering
    layer l + 1) into a checkpoint of ``model``: ``v_l`` becomes the bias of layer l's ``down_proj``,
    whose output the layer adds to the residual stream as it is (Granite scales it by its
    ``residual_multiplier``, so the bias is divided by it). The family's flag (``mlp_bias``) gives
    every gate/up/down projection a bias. Families without that flag, or whose MLP output passes a
    norm before the residual (Gemma 2/3, OLMo 2), are refused: use an export or hooks."""
    arch = model.arch
    if arch.mlp_bias_flag is None:
        raise RealignError(
            f"{method}: {arch.family} configs cannot give down_proj a bias that adds to a decoder layer's output, so "
            "a baked checkpoint would lose the addition when reloaded; use --set mode=export (a steering file for "
            "lm-evaluation-harness) or hooks on the layer's output"
        )
    servers = check_bake_served(arch.family, "down_proj", method, serve)
    scale = float(model.config.get("residual_multiplier", 1.0)) if arch.family == "granite" else 1.0
    return _bias_edit(model, vectors, method, arch.mlp_bias_flag, ("gate", "up", "down"), "down", servers, scale)


# ----------------------------------------------------------------------------- 3. lm-eval export
def hookpoint(arch: Arch, layer: int, peft: bool = False, at: str = "attention") -> str:
    """lm-eval's name of layer ``layer``'s ``o_proj`` (its output is the attention output), or with
    ``at="block"`` of the decoder layer itself (its output is the residual stream entering the next)."""
    name = (layer_module(arch, layer) if at == "block" else arch.module_name(layer, "o")).removeprefix(_DECODER_PREFIX)
    return _PEFT_PREFIX + name if peft else name


def layer_module(arch: Arch, layer: int) -> str:
    """The module name of decoder layer ``layer`` (``model.layers.{layer}``)."""
    return LAYER_PREFIX.format(layer=layer)


def steering_config(arch: Arch, vectors: Mapping[int, torch.Tensor], coefficient: float = 1.0,
                    peft: bool = False, at: str = "attention") -> dict[str, dict]:
    """The content of a steer_path ``.pt`` file of lm-evaluation-harness's ``steered`` model: per
    hookpoint (``hookpoint(arch, layer, peft, at)``), ``coefficient · vector`` is added to that
    module's output at every position."""
    return {
        hookpoint(arch, layer, peft, at): {
            "steering_vector": vec.detach().float().cpu().contiguous(),
            "steering_coefficient": float(coefficient),
            "action": "add",
            "bias": None,
            "head_index": None,
        }
        for layer, vec in sorted(vectors.items())
    }


def steering_bytes(config: Mapping[str, dict]) -> bytes:
    """Serialise a steering config as lm-eval reads it (``torch.load(..., weights_only=True)``)."""
    buf = io.BytesIO()
    torch.save(dict(config), buf)
    return buf.getvalue()


def steering_readme(model_ref: str, method: str, coefficient: float, hookpoints: list[str], peft: bool,
                    base_ref: str | None = None, at: str = "attention") -> str:
    """A short README for an export directory (``at``: the hookpoints are ``o_proj`` modules, or
    whole decoder layers with ``"block"``)."""
    module = "layers.N" if at == "block" else "layers.N.self_attn.o_proj"
    if peft:
        load = f"pretrained={base_ref},peft={model_ref},steer_path=STEERING"
        where = "the LoRA fine-tune is loaded as a PEFT model (hookpoints carry the `model.model.` prefix)"
    else:
        load = f"pretrained={model_ref},steer_path=STEERING"
        where = f"hookpoints are module names under the decoder (`{module}`)"
    if at == "block":
        what = [f"`{STEERING_FILE}` holds, for each of {len(hookpoints)} decoder layers, a vector that lm-eval's "
                "`steered` model adds to that layer's output (the residual stream entering the next layer) at every "
                f"position, times `steering_coefficient` (= {coefficient:g}; edit it to change the strength); "
                f"{where}. A decoder layer returns a tensor in transformers 5 and a tuple in 4.x: the `steered` model "
                "must add to the hidden state (the tuple's first element)."]
    else:
        what = [f"`{STEERING_FILE}` holds, for each of {len(hookpoints)} attention layers, a vector that lm-eval's "
                "`steered` model adds to the output of that layer's `o_proj` (the attention output) at every "
                f"position, times `steering_coefficient` (= alpha = {coefficient:g}; edit it to change the strength). "
                f"The vectors were computed with this fine-tune's own output projections; {where}."]
    return "\n".join([
        f"# {method} steering file for lm-evaluation-harness",
        "",
        *what,
        "",
        "```",
        f"lm_eval --model steered --model_args {load.replace('STEERING', 'THIS_DIR/' + STEERING_FILE)} --tasks TASKS",
        "```",
        "",
        "It needs an lm-evaluation-harness whose `steered` model reads `head_index` (older releases bind every "
        "hookpoint to the last vector of the file).",
        "",
        "Hookpoints: " + ", ".join(f"`{h}`" for h in hookpoints),
        "",
    ])


__all__ = ["single_threaded", "output_vector", "add_to_inputs", "add_to_outputs", "install_biases", "biased",
           "check_bakeable", "o_bias_edit", "block_output_edit", "layer_module", "hookpoint", "steering_config",
           "steering_bytes", "steering_readme", "STEERING_FILE"]
