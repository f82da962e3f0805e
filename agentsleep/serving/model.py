"""Inference-only SleepHybrid model for vLLM (out-of-tree, registered by `agentsleep.serving.plugin`).

Built like vLLM's ``qwen3_next.py`` / ``qwen3_5.py``: ``SleepHybridAttention`` → ``SleepHybridDecoderLayer`` →
``SleepHybridModel`` (backbone) → ``SleepHybridForCausalLM`` (head, logits, weights, recurrent-state classmethods). The
Gated DeltaNet blocks are vLLM's own ``QwenGatedDeltaNetAttention`` (Qwen3-Next's grouped qkvz/ba layout or Qwen3.5's
split projections, CPU and GPU kernels, recurrent state held by vLLM's hybrid KV-cache manager), so the per-agent fast
weights can be injected by the KV connector (`agentsleep.serving.connector`); mixture-of-experts MLPs are vLLM's
``Qwen3NextSparseMoeBlock``. The maths equals `agentsleep.model.SleepHybrid` (tests/serving/test_parity.py, and
test_imported.py for the variants of imported checkpoints):

* pre-norm blocks; RMSNorm ``x / rms(x) * w`` or, with ``norm_offset = 1`` (Qwen3-Next / Qwen3.5), ``* (1 + w)``
  (vLLM's ``GemmaRMSNorm``), the q/k norms included;
* attention: q/k/v projections (optional biases), optional per-head q/k RMSNorm, neox RoPE on window-local positions
  over the first ``rotary_dim`` of each head, optional output gate (``q_proj`` yields per head ``[q, gate]``, out =
  attn · sigmoid(gate)), o_proj (optional bias);
* MLP: SwiGLU ('d'), experts ('e'), or none ('-': a memory layer inserted without MLP).

A request is one window under hard eviction: positions restart at 0 with the BOS (the runtime sleeps before a window
overflows). What the plugin cannot serve faithfully (sliding eviction, no BOS, vLLM-CPU head-size limits, …) is refused
at construction with a `ConfigError` naming the field (`agentsleep.serving.config.serving_problems`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFunc,
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, extract_layer_index, maybe_prefix
from vllm.sequence import IntermediateTensors

from agentsleep.serving.config import SleepHybridHFConfig, check_servable, hybrid_config


def _check_servable(config: SleepHybridHFConfig) -> None:
    """Refuse what vLLM cannot run faithfully, naming the field, the reason and the alternative."""
    check_servable(hybrid_config(config))


def _norm(config: SleepHybridHFConfig, size: int) -> nn.Module:
    """The model's RMSNorm: ``* w``, or ``* (1 + w)`` for zero-centred weights (``norm_offset = 1``)."""
    if config.norm_offset:
        return GemmaRMSNorm(size, eps=config.rms_norm_eps)
    return RMSNorm(size, eps=config.rms_norm_eps)


class SleepHybridAttention(nn.Module):
    """Window attention: q/k/v (+ gate) → per-head q/k RMSNorm → RoPE (window-local positions, first ``rotary_dim``)
    → attention → · sigmoid(gate) → o_proj."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SleepHybridHFConfig = vllm_config.model_config.hf_text_config
        cache_config: CacheConfig = vllm_config.cache_config
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.gated = bool(config.attn_output_gate)
        # with the gate, q_proj's rows hold per head [q (D), gate (D)]: the "q" shard is twice as tall
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads * (2 if self.gated else 1),
            self.total_num_kv_heads,
            bias=bool(config.attn_qkv_bias),
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=bool(config.attn_o_bias),
            prefix=f"{prefix}.o_proj",
        )
        # neox "rotate half" over the first rotary_dim of each head, as agentsleep.model.layers.apply_rope
        self.rotary_emb = get_rope(
            head_size=self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters={**config.rope_parameters, "rope_dim": config.rotary_dim or self.head_dim},
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            prefix=f"{prefix}.attn",
        )
        self.qk_norm = bool(config.qk_norm)
        if self.qk_norm:
            self.q_norm = _norm(config, self.head_dim)
            self.k_norm = _norm(config, self.head_dim)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)  # [T, q (·2 with the gate) + 2 kv]
        q_size = self.q_size * (2 if self.gated else 1)
        q, k, v = qkv.split([q_size, self.kv_size, self.kv_size], dim=-1)
        gate = None
        if self.gated:
            q, gate = q.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [T, H, D] each
            q, gate = q.reshape(-1, self.q_size), gate.reshape(-1, self.q_size)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(-1, self.q_size)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # [T, H·D]
        if gate is not None:
            out = out * torch.sigmoid(gate)
        out, _ = self.o_proj(out)
        return out


class SleepHybridMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up are stacked into one projection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SleepHybridHFConfig = vllm_config.model_config.hf_text_config
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=False, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


def _mlp(kind: str, *, vllm_config: VllmConfig, prefix: str) -> nn.Module | None:
    """The MLP of one block: SwiGLU ('d'), vLLM's Qwen3-Next experts block ('e'), or none ('-')."""
    if kind == "-":
        return None
    if kind == "e":
        from vllm.model_executor.models.qwen3_next import Qwen3NextSparseMoeBlock

        return Qwen3NextSparseMoeBlock(vllm_config=vllm_config, prefix=prefix)
    return SleepHybridMLP(vllm_config=vllm_config, prefix=prefix)


class SleepHybridDecoderLayer(nn.Module):
    """Pre-norm block: x + Mixer(norm(x)), then x + MLP(norm(x)) unless the block has none; the mixer is attention or
    vLLM's GDN layer."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SleepHybridHFConfig = vllm_config.model_config.hf_text_config
        index = extract_layer_index(prefix)
        self.layer_type = config.layer_types[index]
        if self.layer_type == "linear_attention":
            self.linear_attn = QwenGatedDeltaNetAttention(
                config,
                vllm_config=vllm_config,
                prefix=f"{prefix}.linear_attn",
                gqa_interleaved_layout=config.gdn_in_proj != "split",
            )
        else:
            self.self_attn = SleepHybridAttention(vllm_config=vllm_config, prefix=f"{prefix}.self_attn")
        kinds = config.mlp_layout or "d" * config.num_hidden_layers
        self.mlp = _mlp(kinds[index], vllm_config=vllm_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = _norm(config, config.hidden_size)
        self.post_attention_layernorm = _norm(config, config.hidden_size) if self.mlp is not None else None

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's fused add+norm: residual carries x, hidden_states carries what the next norm adds to it
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.layer_type == "linear_attention":
            hidden_states = self.linear_attn(hidden_states=hidden_states)
        else:
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if self.mlp is None or self.post_attention_layernorm is None:
            return hidden_states, residual  # no MLP: the next block's norm adds the mixer's output to x
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# Explicit dims: with postponed annotations the decorator cannot read the tensor types off the signature.
@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class SleepHybridModel(nn.Module):
    """Backbone: embed → blocks → final norm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SleepHybridHFConfig = vllm_config.model_config.hf_text_config
        _check_servable(config)
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            SleepHybridDecoderLayer(vllm_config=vllm_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = _norm(config, config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)  # [T, d]
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions=positions, hidden_states=hidden_states, residual=residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class SleepHybridForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """`SleepHybrid` on vLLM: backbone + unembedding, checkpoint loading, and the GDN state geometry."""

    # Checkpoint keys are `SleepHybrid.state_dict()` names (no "model." prefix, separate q/k/v and gate/up).
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
            ".mlp.up_proj": (".mlp.gate_up_proj", 1),
            ".shared_expert.gate_proj": (".shared_expert.gate_up_proj", 0),
            ".shared_expert.up_proj": (".shared_expert.gate_up_proj", 1),
        },
        orig_to_new_prefix={"embed_tokens.": "model.embed_tokens.", "layers.": "model.layers.", "norm.": "model.norm."},
    )
    # Qwen3.5's four GDN input projections fill the two fused ones vLLM's layer holds (as vllm's qwen3_5.py does).
    # The trailing dots keep ".in_proj_qkv." from matching ".in_proj_qkvz." of the fused layout.
    split_gdn_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".in_proj_qkv.": (".in_proj_qkvz.", (0, 1, 2)),
            ".in_proj_z.": (".in_proj_qkvz.", 3),
            ".in_proj_b.": (".in_proj_ba.", 0),
            ".in_proj_a.": (".in_proj_ba.", 1),
        }
    )
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "in_proj_qkvz": ["in_proj_qkvz"],
        "in_proj_ba": ["in_proj_ba"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SleepHybridHFConfig = vllm_config.model_config.hf_text_config
        self.config = config
        self.vllm_config = vllm_config
        self.model = SleepHybridModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A tied checkpoint has no lm_head.weight (SleepHybrid.save_pretrained drops it); the loader re-ties.
        mapper = self.hf_to_vllm_mapper
        if self.config.gdn_in_proj == "split":
            mapper = mapper | self.split_gdn_mapper
        return AutoWeightsLoader(self).load_weights(weights, mapper=mapper)

    # ------------------------------------------------------------------ recurrent state (IsHybrid)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype,
            vllm_config.cache_config.mamba_cache_dtype,
            vllm_config.cache_config.mamba_ssm_cache_dtype,
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        hf = vllm_config.model_config.hf_text_config
        num_spec = vllm_config.speculative_config.num_speculative_tokens if vllm_config.speculative_config else 0
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size,
            hf.linear_num_key_heads,
            hf.linear_num_value_heads,
            hf.linear_key_head_dim,
            hf.linear_value_head_dim,
            hf.linear_conv_kernel_dim,
            num_spec,
        )

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[MambaStateCopyFunc, MambaStateCopyFunc]:
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()


__all__ = [
    "SleepHybridAttention",
    "SleepHybridDecoderLayer",
    "SleepHybridForCausalLM",
    "SleepHybridMLP",
    "SleepHybridModel",
]
