"""What every Hugging Face family module declares, and the config translation the Qwen families share.

A family is data: the ``model_type`` values it reads, where the text model's config sits, how checkpoint tensor names
become ours (prefix renames, first match wins) and which tensors belong to parts we do not run (vision tower,
multi-token-prediction head), plus one function from the checkpoint's ``config.json`` to `HybridConfig` fields.
Inside a block the names are already ours (``self_attn.q_proj``, ``linear_attn.in_proj_qkvz``, ``mlp.experts.3.up_proj``
…): the layers were named after Qwen3-Next, so only the prefixes differ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agentsleep.errors import CheckpointError

# Imported checkpoints run with a real window unless told otherwise: the paper's GSM-Infinite runs used L = 2000
# (hard eviction) and 512 (sliding), paper §7.3-7.4.
DEFAULT_IMPORT_WINDOW = 2048
DEFAULT_GDN_L2NORM_EPS = 1e-6  # fla / transformers: q, k ← x·rsqrt(|x|² + 1e-6) (use_qk_l2norm_in_kernel)
LAYER_KINDS = {"full_attention": "a", "sliding_attention": "a", "linear_attention": "g"}


@dataclass(frozen=True)
class Family:
    """One architecture family: declared names plus its config translation."""

    name: str
    model_types: tuple[str, ...]
    translate: Callable[[Mapping[str, Any]], dict[str, Any]]  # text config -> HybridConfig fields
    rename: tuple[tuple[str, str], ...] = (("model.", ""),)  # checkpoint prefix -> ours; first match wins
    skip: tuple[str, ...] = ()  # prefixes of tensors we do not run (vision tower, MTP head)
    text_config_key: str | None = None  # where a multimodal config keeps the text model's config

    def our_name(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor name, or None for a tensor this model does not use."""
        if name.startswith(self.skip):
            return None
        for prefix, repl in self.rename:
            if name.startswith(prefix):
                return repl + name[len(prefix) :]
        return name

    def text_config(self, raw: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.text_config_key is None:
            return raw
        sub = raw.get(self.text_config_key)
        if not isinstance(sub, Mapping):
            kind = raw.get("model_type")
            raise CheckpointError(f"config.json of a {kind!r} checkpoint lacks {self.text_config_key!r}")
        return sub


def need(cfg: Mapping[str, Any], key: str) -> Any:
    """A config value that must be there."""
    if cfg.get(key) is None:
        raise CheckpointError(f"config.json lacks {key!r}; is this a complete Hugging Face config?")
    return cfg[key]


def rope_of(cfg: Mapping[str, Any], head_dim: int) -> tuple[float, int | None]:
    """(θ, rotary_dim or None for full) from ``rope_parameters`` (transformers 5) or the older ``rope_theta`` /
    ``rope_scaling`` / ``partial_rotary_factor`` keys. Only the default RoPE is supported: scaled variants (yarn,
    linear, dynamic, …) change the frequencies, so they are refused rather than silently ignored. Multimodal RoPE
    (``mrope_section``) with equal text positions in every section is the default RoPE."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "mrope"):
        raise CheckpointError(
            f"RoPE type {kind!r} is not supported (only the default RoPE); windows are short, so a scaled RoPE is not "
            "needed: drop rope_scaling from config.json only if the model was trained without it"
        )
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    factor = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rotary = int(head_dim * factor)
    return theta, (rotary if rotary != head_dim else None)


def layout_of(cfg: Mapping[str, Any], n_layers: int) -> tuple[str, list[str]]:
    """Our layout string and the checkpoint's layer types (``layer_types``; all full attention if absent)."""
    types = list(cfg.get("layer_types") or ["full_attention"] * n_layers)
    if len(types) != n_layers:
        raise CheckpointError(f"config.json lists {len(types)} layer_types for {n_layers} layers")
    unknown = sorted(set(types) - set(LAYER_KINDS))
    if unknown:
        raise CheckpointError(f"layer types {unknown} are not supported (only {sorted(LAYER_KINDS)})")
    return "".join(LAYER_KINDS[t] for t in types), types


def attention_fields(cfg: Mapping[str, Any], layer_types: list[str]) -> dict[str, Any]:
    """The fields every Qwen family shares: sizes, attention shape, RoPE, norms, vocabulary, trained span."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported (SwiGLU with SiLU only)")
    d = int(need(cfg, "hidden_size"))
    heads = int(need(cfg, "num_attention_heads"))
    head_dim = int(cfg.get("head_dim") or d // heads)
    theta, rotary = rope_of(cfg, head_dim)
    spans = [int(cfg["max_position_embeddings"])] if cfg.get("max_position_embeddings") else []
    if "sliding_attention" in layer_types and cfg.get("sliding_window"):
        spans.append(int(cfg["sliding_window"]))  # sliding layers never saw a longer span: the window must fit
    span = min(spans) if spans else None
    return {
        "vocab_size": int(need(cfg, "vocab_size")),
        "d_model": d,
        "attn_heads": heads,
        "attn_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "attn_head_dim": head_dim,
        "intermediate_size": int(need(cfg, "intermediate_size")),
        "rope_theta": theta,
        "rotary_dim": rotary,
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "max_attention_span": span,
        "window": min(DEFAULT_IMPORT_WINDOW, span) if span else DEFAULT_IMPORT_WINDOW,
        "check_serving": False,  # flagged by serving_problems(), refused only when serving is asked for
    }


def gdn_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen3-Next / Qwen3.5 ``linear_*`` names -> our GDN fields."""
    return {
        "gdn_heads": int(need(cfg, "linear_num_key_heads")),
        "gdn_v_heads": int(need(cfg, "linear_num_value_heads")),
        "gdn_head_dim": int(need(cfg, "linear_key_head_dim")),
        "gdn_v_head_dim": int(need(cfg, "linear_value_head_dim")),
        "conv_size": int(cfg.get("linear_conv_kernel_dim", 4)),
        "gdn_l2norm_eps": DEFAULT_GDN_L2NORM_EPS,
    }


def memory_defaults(d_model: int) -> dict[str, Any]:
    """GDN sizes for memory layers inserted into an attention-only model (overridable): heads of 128 (64 below
    d = 1024), servable by vLLM's kernels, with a key width of about d/2 (Ouro 1.4B + 6 such layers adds < 5%)."""
    hd = 128 if d_model >= 1024 else 64
    heads = max(1, d_model // (2 * hd))
    return {"gdn_heads": heads, "gdn_head_dim": hd, "gdn_l2norm_eps": DEFAULT_GDN_L2NORM_EPS}


LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")
