"""Which serving stacks apply a baked bias, per family, as data.

A baked checkpoint (``mode=bake``: SafetyLock's and the refusal baseline's additions written as
``o_proj`` or ``down_proj`` biases) is only the repaired model where the server builds that
projection with a bias. transformers does where the family's config flag exists and is set
(``attention_bias`` / ``mlp_bias``, see ``realign.archs``). vLLM builds some families' projections
without a bias whatever the config says, and its weight loader skips ``.bias`` tensors the model
has no parameter for, silently: such a server would serve the fine-tune without the repair.

``SUPPORT[family][projection][server]`` says whether ``server`` applies a bias on ``projection``
of ``family`` once realign sets the family's flag. Read from the model code: transformers 5
``models/<family>/modeling_<family>.py``; vLLM ``model_executor/models/<family>.py`` (0.10–0.11):
Llama and Granite pass ``attention_bias``/``mlp_bias`` to their projections, Gemma 2 and Gemma 3
``attention_bias`` to o_proj; Qwen3, Gemma and OLMo 2 build o_proj with ``bias=False``; no
family but Llama and Granite gives its MLP a bias. Families without a transformers flag (Mistral,
Qwen2, Phi-3) cannot be baked at all (``realign.bake.check_bakeable``).
"""

from __future__ import annotations

from realign.errors import RealignError

SERVERS = ("transformers", "vllm")
# --set serve=...: the servers a baked checkpoint must carry the bake for.
SERVE_CHOICES = ("all", *SERVERS)
_BOTH = {"transformers": True, "vllm": True}
_HF_ONLY = {"transformers": True, "vllm": False}
_NONE = {"transformers": False, "vllm": False}

SUPPORT: dict[str, dict[str, dict[str, bool]]] = {
    "llama": {"o_proj": _BOTH, "down_proj": _BOTH},
    "mistral": {"o_proj": _NONE, "down_proj": _NONE},
    "qwen2": {"o_proj": _NONE, "down_proj": _NONE},
    "qwen3": {"o_proj": _HF_ONLY, "down_proj": _NONE},
    "gemma": {"o_proj": _HF_ONLY, "down_proj": _NONE},
    "gemma2": {"o_proj": _BOTH, "down_proj": _NONE},
    "gemma3_text": {"o_proj": _BOTH, "down_proj": _NONE},
    "olmo2": {"o_proj": _HF_ONLY, "down_proj": _NONE},
    "granite": {"o_proj": _BOTH, "down_proj": _BOTH},
    "phi3": {"o_proj": _NONE, "down_proj": _NONE},
}


def servers_for(serve: str) -> tuple[str, ...]:
    if serve not in SERVE_CHOICES:
        raise RealignError(f"--set serve={serve}: use one of {', '.join(SERVE_CHOICES)}")
    return SERVERS if serve == "all" else (serve,)


def bake_support(family: str, projection: str) -> dict[str, bool]:
    """{server: applies a baked bias on ``projection``} for ``family``."""
    if family not in SUPPORT or projection not in SUPPORT[family]:
        raise RealignError(f"internal: no serving data for {family}'s {projection}")
    return dict(SUPPORT[family][projection])


def check_bake_served(family: str, projection: str, method: str, serve: str | None) -> dict[str, str]:
    """Refuse (one line) a bake that a targeted server would drop; else what each server does with
    it, for the report. ``serve`` is the method's ``--set serve`` value, or None for a method
    without that parameter (its bake then targets every server)."""
    support = bake_support(family, projection)
    targets = servers_for(serve or "all")
    drops = [s for s in targets if not support[s]]
    keeps = [s for s in SERVERS if support[s]]
    if drops:
        why = (f"vLLM builds {family}'s {projection} without a bias and skips the baked tensors silently"
               if drops == ["vllm"] else f"{' and '.join(drops)} would drop the {projection} biases")
        alt = "use --set mode=export (a steering file for lm-evaluation-harness) or the Python hooks"
        if serve is not None and keeps:
            alt += f", or bake for {' and '.join(keeps)} only with --set serve={keeps[0]}"
        raise RealignError(f"{method}: a baked {family} checkpoint would be served without the bake by "
                           f"{' and '.join(drops)} ({why}): {alt}")
    return {s: "applies the bake" if support[s] else f"does NOT apply it ({projection} is built without a bias)"
            for s in SERVERS}


def unserved_note(servers: dict[str, str]) -> str | None:
    """A model-card note naming the servers that would load the checkpoint without the bake."""
    dropped = [s for s, what in servers.items() if what.startswith("does NOT")]
    if not dropped:
        return None
    return (f"baked for {', '.join(s for s in servers if s not in dropped)} only: {' and '.join(dropped)} would "
            "load this checkpoint WITHOUT the bake (it builds the projection without a bias and skips the biases "
            "silently); use the steering export there")


__all__ = ["SERVERS", "SERVE_CHOICES", "SUPPORT", "servers_for", "bake_support", "check_bake_served",
           "unserved_note"]
