"""The checkpoint's ``config.json`` as a Hugging Face config, so vLLM (which parses configs with transformers) can read
the directory `SleepHybrid.save_pretrained` writes.

The checkpoint holds the `HybridConfig` fields plus a few Hugging Face spellings (``hidden_size``, ``head_dim``, …).
This class derives the remaining names vLLM's own layers read: ``layer_types`` from ``layout``, the Qwen3-Next GDN
names (``linear_num_key_heads``, ``linear_key_head_dim``, …) from the ``gdn_*`` fields, ``rms_norm_eps``,
``hidden_act`` and ``rope_parameters``. Importing this module is cheap (transformers only), so the plugin may import
it in every vLLM process.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from agentsleep.model.checkpoint import ARCHITECTURE, MODEL_TYPE

# vLLM's names for our block kinds ('a' attention, 'g' Gated DeltaNet), as in Qwen3-Next's `layer_types`.
LAYER_TYPES = {"a": "full_attention", "g": "linear_attention"}


class SleepHybridHFConfig(PreTrainedConfig):
    """`HybridConfig` seen through transformers (model_type ``agentsleep_hybrid``). Defaults mirror `HybridConfig`."""

    model_type = MODEL_TYPE

    vocab_size: int = 256
    d_model: int = 64
    layout: str = "agag"
    attn_heads: int = 2
    attn_kv_heads: int | None = None
    attn_head_dim: int | None = None
    gdn_heads: int = 1
    gdn_v_heads: int | None = None
    gdn_head_dim: int = 64
    gdn_v_head_dim: int | None = None
    conv_size: int = 4
    intermediate_size: int | None = None
    window: int = 12
    eviction: str = "hard"
    passes: int = 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_embeddings: bool = False
    fingerprint: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Hugging Face spellings written by the checkpoint are recomputed here; drop them so they cannot disagree.
        for derived in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "tie_word_embeddings", "max_position_embeddings",
        ):  # fmt: skip
            kwargs.pop(derived, None)
        super().__post_init__(**kwargs)
        self.layout = self.layout.lower()
        self.attn_kv_heads = self.attn_kv_heads or self.attn_heads
        self.attn_head_dim = self.attn_head_dim or max(self.d_model // self.attn_heads, 1)
        self.gdn_v_heads = self.gdn_v_heads or self.gdn_heads
        self.gdn_v_head_dim = self.gdn_v_head_dim or self.gdn_head_dim
        self.intermediate_size = self.intermediate_size or 4 * self.d_model
        # Hugging Face / vLLM names of the same facts
        self.hidden_size = self.d_model
        self.num_hidden_layers = len(self.layout)
        self.num_attention_heads = self.attn_heads
        self.num_key_value_heads = self.attn_kv_heads
        self.head_dim = self.attn_head_dim
        self.tie_word_embeddings = self.tie_embeddings
        # A request is one window (window-local positions, DESIGN.md): BOS + L tokens, plus the one token sampled
        # from the last of them, which vLLM counts towards the length although it is never fed back.
        self.max_position_embeddings = self.window + 2
        self.rms_norm_eps = self.norm_eps
        self.hidden_act = "silu"
        self.rope_parameters = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        self.layer_types = [LAYER_TYPES[k] for k in self.layout]
        # Qwen3-Next GDN names read by vLLM's QwenGatedDeltaNetAttention and the mamba state calculators
        self.linear_num_key_heads = self.gdn_heads
        self.linear_num_value_heads = self.gdn_v_heads
        self.linear_key_head_dim = self.gdn_head_dim
        self.linear_value_head_dim = self.gdn_v_head_dim
        self.linear_conv_kernel_dim = self.conv_size
        if not self.architectures:
            self.architectures = [ARCHITECTURE]


__all__ = ["LAYER_TYPES", "SleepHybridHFConfig"]
