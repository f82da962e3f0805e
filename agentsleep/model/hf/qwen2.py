"""Qwen2 / Qwen2.5 (``model_type: qwen2``): attention only; biases on q, k, v (not on o); no q/k norm.

Optional sliding-window layers (``use_sliding_window``, ``max_window_layers``) become ordinary attention layers whose
trained span bounds the window (`HybridConfig.max_attention_span`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentsleep.model.hf.base import Family, attention_fields, layout_of, memory_defaults, need


def _layer_types(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' rule when ``layer_types`` is absent: layers from ``max_window_layers`` on slide, if enabled."""
    if cfg.get("layer_types") or not cfg.get("use_sliding_window"):
        return dict(cfg)
    n, first = int(need(cfg, "num_hidden_layers")), int(cfg.get("max_window_layers", 0))
    types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return {**cfg, "layer_types": types}


def translate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = _layer_types(cfg)
    layout, types = layout_of(cfg, int(need(cfg, "num_hidden_layers")))
    fields = attention_fields(cfg, types)
    return {
        **fields,
        **memory_defaults(fields["d_model"]),
        "layout": layout,
        "qk_norm": False,
        "attn_qkv_bias": True,
        "attn_o_bias": False,
    }


FAMILY = Family(name="Qwen2", model_types=("qwen2",), translate=translate)
