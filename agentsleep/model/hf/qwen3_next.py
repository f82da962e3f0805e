"""Qwen3-Next (``model_type: qwen3_next``): Gated DeltaNet + gated attention, a mixture of experts in most blocks.

Attention: q_proj yields per head ``[q, gate]`` (output gate), partial RoPE (``partial_rotary_factor``, 0.25), q/k
RMSNorm. Every RMSNorm except the GDN's gated one is zero-centred (applied as 1 + w). GDN: fused per-key-head
``in_proj_qkvz`` / ``in_proj_ba``, exactly our native layout. MLP: block i has experts unless it is listed in
``mlp_only_layers`` or (i + 1) is not a multiple of ``decoder_sparse_step``; experts are stored one module per expert,
as on the Hub. The multi-token-prediction head (``mtp.*``) is not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentsleep.model.hf.base import Family, attention_fields, gdn_fields, layout_of, need


def mlp_layout(cfg: Mapping[str, Any], n: int) -> str:
    experts, step = int(cfg.get("num_experts", 0)), int(cfg.get("decoder_sparse_step", 1))
    dense = set(cfg.get("mlp_only_layers") or [])
    return "".join("e" if i not in dense and experts > 0 and (i + 1) % step == 0 else "d" for i in range(n))


def translate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    n = int(need(cfg, "num_hidden_layers"))
    layout, types = layout_of(cfg, n)
    bias = bool(cfg.get("attention_bias", False))
    mlp = mlp_layout(cfg, n)
    moe: dict[str, Any] = {}
    if "e" in mlp:
        moe = {
            "moe_experts": int(cfg["num_experts"]),
            "moe_top_k": int(need(cfg, "num_experts_per_tok")),
            "moe_intermediate_size": int(need(cfg, "moe_intermediate_size")),
            "moe_shared_intermediate_size": int(cfg.get("shared_expert_intermediate_size") or 0),
            "moe_norm_topk": bool(cfg.get("norm_topk_prob", True)),
        }
    return {
        **attention_fields(cfg, types),
        **gdn_fields(cfg),
        **moe,
        "layout": layout,
        "mlp_layout": mlp if mlp != "d" * n else None,
        "qk_norm": True,
        "attn_qkv_bias": bias,
        "attn_o_bias": bias,
        "attn_output_gate": True,
        "norm_offset": 1.0,
        "gdn_in_proj": "qkvz",
    }


FAMILY = Family(name="Qwen3-Next", model_types=("qwen3_next",), translate=translate, skip=("mtp.",))
