"""Qwen3.5 (``model_type: qwen3_5_text``, and the text model inside ``qwen3_5`` checkpoints): Qwen3-Next's gated
attention and zero-centred norms with dense SwiGLU MLPs and four separate GDN input projections (``in_proj_qkv``,
``in_proj_z``, ``in_proj_b``, ``in_proj_a``).

A ``qwen3_5`` checkpoint is multimodal: its text config sits under ``text_config`` and its text weights under
``model.language_model.``; the vision tower (``model.visual.``) and the multi-token-prediction head (``mtp.``) are not
used. Text-only positions make its multimodal RoPE (``mrope_section``) the ordinary RoPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentsleep.model.hf.base import Family, attention_fields, gdn_fields, layout_of, need


def translate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    layout, types = layout_of(cfg, int(need(cfg, "num_hidden_layers")))
    bias = bool(cfg.get("attention_bias", False))
    return {
        **attention_fields(cfg, types),
        **gdn_fields(cfg),
        "layout": layout,
        "qk_norm": True,
        "attn_qkv_bias": bias,
        "attn_o_bias": bias,
        "attn_output_gate": True,
        "norm_offset": 1.0,
        "gdn_in_proj": "split",
    }


TEXT = Family(name="Qwen3.5", model_types=("qwen3_5_text",), translate=translate, skip=("mtp.",))
MULTIMODAL = Family(
    name="Qwen3.5 (text model of a multimodal checkpoint)",
    model_types=("qwen3_5",),
    translate=translate,
    rename=(("model.language_model.", ""), ("model.", "")),
    skip=("model.visual.", "mtp.", "model.mtp."),
    text_config_key="text_config",
)
