"""Qwen3 dense (``model_type: qwen3``): attention only, per-head q/k RMSNorm, ``attention_bias`` on q, k, v and o."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentsleep.model.hf.base import Family, attention_fields, layout_of, memory_defaults, need
from agentsleep.model.hf.qwen2 import _layer_types


def translate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = _layer_types(cfg)
    layout, types = layout_of(cfg, int(need(cfg, "num_hidden_layers")))
    fields = attention_fields(cfg, types)
    bias = bool(cfg.get("attention_bias", False))
    return {
        **fields,
        **memory_defaults(fields["d_model"]),
        "layout": layout,
        "qk_norm": True,
        "attn_qkv_bias": bias,
        "attn_o_bias": bias,
    }


FAMILY = Family(name="Qwen3", model_types=("qwen3",), translate=translate)
