"""`HybridConfig` and `SleepHybrid`: the attention / Gated DeltaNet hybrid that sleeps (paper §2–§5).

Three ways to run the same weights, all pinned equal by tests:

* ``forward(tokens, loss_mask, passes)`` — Algorithm 1 over whole sequences (training and scoring): windows of L tokens;
  label-free windows run the block stack N times (pass j consumes pass j−1's features and final S), windows with labels
  run once and are scored; only S (plus, under sliding eviction, the last L−1 keys/values) crosses a window.
* ``forward_chunk(tokens, state, passes)`` / ``sleep(tokens, state, passes)`` — one window at a time.
* ``start_window`` / ``extend`` / ``sleep_window`` — incremental wake decoding: one pass per token with a KV cache that
  never holds more than the current window, then N−1 more passes over the cached pass-1 features when the window is
  slept (the streaming recipe of paper.md §5, which reproduces training exactly).

Decisions on the points the paper leaves open are in ``docs/model.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from agentsleep.errors import CheckpointError, ConfigError, InvalidInput, SnapshotMismatch, WindowOverflow
from agentsleep.model.fingerprint import Fingerprint, accepts, fingerprint_of, mismatch
from agentsleep.model.layers import Block, LayerState, PassContext, RMSNorm, building_on_meta, shift_keys
from agentsleep.model.state import FastWeights

logger = logging.getLogger(__name__)

SERVABLE_GDN_HEAD_DIMS = (64, 128)  # vLLM's CPU GDN kernel accepts only these (spec/vllm-cpu.md §3.2)
MIN_ATTN_HEAD_DIM = 32  # smallest head size of vLLM's CPU attention backend (spec/vllm-cpu.md §2.2)
MLP_KINDS = {"d": "SwiGLU", "e": "mixture of experts", "-": "none"}
MEMORY_KINDS = ("g", "j")  # block kinds that carry a fast-weight state S: Gated DeltaNet, Jet (agentsleep.model.jet)


class HybridConfig(BaseModel):
    """Every hyperparameter of the hybrid, with its default. Frozen: a config is part of the model fingerprint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0, description="number of token ids (task vocabularies are tiny)")
    d_model: int = Field(64, gt=0, description="residual width d")
    layout: str = Field(
        "agag",
        description="block kinds in order: 'a' attention, 'g' Gated DeltaNet (paper Eq. 5), 'j' Jet (GDN with a "
        "dynamic value conv, paper §2.2)",
    )
    attn_heads: int = Field(2, gt=0, description="attention query heads")
    attn_kv_heads: int | None = Field(None, description="attention K/V heads (GQA); default = attn_heads")
    attn_head_dim: int | None = Field(None, description="attention head size (≥ 32); default d_model // attn_heads")
    gdn_heads: int = Field(1, gt=0, description="GDN key heads H_k")
    gdn_v_heads: int | None = Field(None, description="GDN value heads H_v (multiple of H_k); default = gdn_heads")
    gdn_head_dim: int = Field(64, description="GDN key head size d_k: 64 or 128 (vLLM CPU kernel)")
    gdn_v_head_dim: int | None = Field(None, description="GDN value head size d_v; default = gdn_head_dim")
    conv_size: int = Field(4, ge=2, description="short causal conv width; restarted every window and pass")
    intermediate_size: int | None = Field(None, description="SwiGLU hidden size; default 4 * d_model (ratio 4)")
    window: int = Field(12, gt=0, description="L: tokens the attention window holds (a BOS is extra)")
    eviction: Literal["hard", "sliding"] = Field("hard", description="clear the whole KV cache, or keep the last L−1")
    passes: int = Field(1, ge=1, description="N: sleep passes over a label-free window (N=1 is the plain hybrid)")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    qk_norm: bool = Field(True, description="per-head RMSNorm on attention q and k (Qwen3 style)")
    bos_token_id: int | None = Field(None, description="if set, prepended to every window (stream start if sliding)")
    pad_token_id: int | None = Field(None, description="if set, these tokens are inert: masked, never write S")
    tie_embeddings: bool = Field(False, description="share the input embedding with the output head")
    init_std: float = Field(0.02, gt=0, description="std of linear/embedding init (GPT-2)")
    # ---- paper §2.4–2.5: which blocks loop, and blocks without an MLP (inserted memory layers)
    loop: tuple[int, int] | None = Field(
        None,
        description="blocks [start, end) repeated in sleep passes 2..N (Jet-Nemotron loops its middle 14 of 28, "
        "paper §2.5); blocks outside run in pass 1 only. Default: the whole stack",
    )
    mlp_layout: str | None = Field(
        None,
        description="MLP kind per block: 'd' SwiGLU, 'e' mixture of experts, '-' none (a memory layer inserted "
        "without MLP, paper §2.4 Ouro + Jet). Default: 'd' everywhere",
    )
    # ---- layer variants of imported checkpoints (docs/pretrained.md); the defaults are the native hybrid
    norm_offset: float = Field(
        0.0, description="RMSNorms scale by (offset + weight); 1.0 in Qwen3-Next / Qwen3.5 (zero-centred weights)"
    )
    attn_qkv_bias: bool = Field(False, description="biases on q/k/v projections (Qwen2; Qwen3 attention_bias)")
    attn_o_bias: bool = Field(False, description="bias on the attention output projection (Qwen3 attention_bias)")
    attn_output_gate: bool = Field(
        False, description="q_proj also yields a per-head gate g: out = o_proj(attn · sigmoid(g)) (Qwen3-Next)"
    )
    rotary_dim: int | None = Field(None, description="RoPE on the first rotary_dim of each head (partial); default all")
    gdn_in_proj: Literal["qkvz", "split"] = Field(
        "qkvz",
        description="GDN input projections: fused per key head 'in_proj_qkvz'/'in_proj_ba' (Qwen3-Next), or "
        "'in_proj_qkv', 'in_proj_z', 'in_proj_b', 'in_proj_a' (Qwen3.5)",
    )
    gdn_l2norm_eps: float | None = Field(
        None, description="q/k L2 norm as x·rsqrt(|x|²+eps) (fla, transformers: 1e-6); default x / max(|x|, 1e-12)"
    )
    moe_experts: int = Field(0, ge=0, description="routed experts of an 'e' MLP (Qwen3-Next)")
    moe_top_k: int = Field(0, ge=0, description="experts each token is routed to")
    moe_intermediate_size: int | None = Field(None, description="hidden size of each routed expert")
    moe_shared_intermediate_size: int = Field(0, ge=0, description="hidden size of the sigmoid-gated shared expert")
    moe_norm_topk: bool = Field(True, description="renormalise the top-k routing weights to sum to 1")
    # ---- Jet memory layers ('j' in layout)
    jet_generator_reduction: int = Field(
        8,
        ge=1,
        description="Jet layers: the dynamic-conv kernel generator's hidden size is (H_v·d_v) / this (8 in "
        "Jet-Nemotron-2B, paper §2.5)",
    )
    max_attention_span: int | None = Field(
        None,
        description="longest span the attention layers were trained on (max positions, or a sliding window); "
        "the window (+ BOS) must fit in it",
    )
    check_serving: bool = Field(
        True,
        description="refuse head sizes vLLM's CPU kernels cannot serve; imported checkpoints set False and report "
        "them through `serving_problems()` instead",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one error type for users: ConfigError (still a ValueError)
            raise ConfigError(f"invalid HybridConfig: {e}") from e

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        d = dict(data)
        d_model = d.get("d_model", 64)
        heads = d.get("attn_heads", 2)
        d["layout"] = str(d.get("layout", "agag")).lower()
        d.setdefault("attn_kv_heads", None)
        d["attn_kv_heads"] = d["attn_kv_heads"] or heads
        d["attn_head_dim"] = d.get("attn_head_dim") or max(d_model // heads, 1)
        d["gdn_v_heads"] = d.get("gdn_v_heads") or d.get("gdn_heads", 1)
        d["gdn_v_head_dim"] = d.get("gdn_v_head_dim") or d.get("gdn_head_dim", 64)
        d["intermediate_size"] = d.get("intermediate_size") or 4 * d_model
        return d

    @model_validator(mode="after")
    def _validate(self) -> HybridConfig:
        n = len(self.layout)
        if not self.layout or set(self.layout) - {"a", *MEMORY_KINDS}:
            raise ConfigError(f"layout must be a non-empty string of 'a', 'g' and 'j', got {self.layout!r}")
        if self.attn_heads % self.attn_kv_heads:  # type: ignore[operator]
            raise ConfigError(f"attn_heads ({self.attn_heads}) must be a multiple of attn_kv_heads")
        if self.check_serving:
            problems = self._kernel_problems()  # a Jet layer is trainable and TorchEngine-served: listed, not refused
            if problems:
                raise ConfigError(problems[0])
        rot = self.rotary_dim if self.rotary_dim is not None else self.attn_head_dim
        if self.attn_head_dim % 2 or rot % 2 or not 0 < rot <= self.attn_head_dim:  # type: ignore[operator]
            raise ConfigError(
                f"attention head size ({self.attn_head_dim}) and rotary_dim ({rot}) must be even, with "
                "0 < rotary_dim ≤ head size"
            )
        if self.gdn_v_heads % self.gdn_heads:  # type: ignore[operator]
            raise ConfigError(f"gdn_v_heads ({self.gdn_v_heads}) must be a multiple of gdn_heads ({self.gdn_heads})")
        for name in ("bos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ConfigError(f"{name}={tid} is outside the vocabulary [0, {self.vocab_size})")
        if self.bos_token_id is not None and self.bos_token_id == self.pad_token_id:
            raise ConfigError("bos_token_id and pad_token_id must differ")
        if self.mlp_layout is not None and (len(self.mlp_layout) != n or set(self.mlp_layout) - set(MLP_KINDS)):
            raise ConfigError(
                f"mlp_layout must give one of {sorted(MLP_KINDS)} per block ({n} blocks), got {self.mlp_layout!r}"
            )
        if "e" in self.mlp_kinds and not (
            0 < self.moe_top_k <= self.moe_experts and (self.moe_intermediate_size or 0) > 0
        ):
            raise ConfigError(
                "mixture-of-experts blocks need moe_experts ≥ moe_top_k ≥ 1 and moe_intermediate_size > 0; got "
                f"{self.moe_experts}, {self.moe_top_k}, {self.moe_intermediate_size}"
            )
        if self.loop is not None and not 0 <= self.loop[0] < self.loop[1] <= n:
            raise ConfigError(
                f"loop={tuple(self.loop)} must be a block range [start, end) with 0 ≤ start < end ≤ {n} (this model "
                f"has {n} blocks, layout {self.layout!r})"
            )
        if self.max_attention_span is not None and self.attention_span > self.max_attention_span:
            bos = int(self.attention_span > self.window)
            raise ConfigError(
                f"a window of L={self.window} tokens{' + BOS' if bos else ''} exceeds the {self.max_attention_span} "
                f"tokens the attention layers were trained on; use window ≤ {self.max_attention_span - bos}"
            )
        return self

    def serving_problems(self) -> list[str]:
        """What vLLM's CPU kernels cannot serve in this config (spec/vllm-cpu.md §2.2, §3.2); empty if servable.

        Native configs refuse the head sizes at construction (``check_serving``); imported checkpoints load anyway
        and carry the list, so only serving refuses them. Jet layers ('j') are listed, never refused at construction:
        the vLLM plugin has no Jet layer yet, the torch engine runs them.
        """
        problems = self._kernel_problems()
        if "j" in self.layout:
            problems.append("Jet layers ('j' in layout) are not implemented by the vLLM plugin; serve with TorchEngine")
        return problems

    def _kernel_problems(self) -> list[str]:
        """Head sizes vLLM's CPU kernels cannot serve."""
        problems = []
        if self.attn_head_dim < MIN_ATTN_HEAD_DIM or self.attn_head_dim % 2:  # type: ignore[operator]
            problems.append(
                f"attn_head_dim must be even and ≥ {MIN_ATTN_HEAD_DIM} (vLLM CPU attention), got {self.attn_head_dim}; "
                "use fewer heads or a wider model"
            )
        if "g" in self.layout and (
            self.gdn_head_dim not in SERVABLE_GDN_HEAD_DIMS or self.gdn_v_head_dim not in SERVABLE_GDN_HEAD_DIMS
        ):
            problems.append(
                f"GDN head sizes must be one of {SERVABLE_GDN_HEAD_DIMS} (vLLM's GDN kernels), "
                f"got d_k={self.gdn_head_dim}, d_v={self.gdn_v_head_dim}"
            )
        return problems

    @property
    def attention_span(self) -> int:
        """The most tokens one query can attend to: L (+ BOS, which opens every window under hard eviction)."""
        return self.window + int(self.bos_token_id is not None and self.eviction == "hard")

    @property
    def mlp_kinds(self) -> str:
        """One MLP kind per block ('d' SwiGLU, 'e' experts, '-' none)."""
        return self.mlp_layout if self.mlp_layout is not None else "d" * len(self.layout)

    def loop_range(self) -> tuple[int, int]:
        """The blocks [start, end) that sleep passes 2..N run (the whole stack unless ``loop`` is set)."""
        return (self.loop[0], self.loop[1]) if self.loop is not None else (0, len(self.layout))

    @property
    def n_layers(self) -> int:
        return len(self.layout)


@dataclass
class WindowCache:
    """Everything that lives only inside the current window during wake decoding (batch of B streams).

    The attention K/V hold the retained prefix (sliding) plus this window's tokens: never more than L (+ BOS) + L−1.
    """

    state: FastWeights  # the state the window started from (S^(n−1,N), retained prefix)
    layers: list[LayerState]  # running per-layer state after pass 1 over the window's tokens so far
    h: Tensor  # [B, t, d] pass-1 outputs of the window's slots (BOS included): the input of sleep passes 2..N
    ids: Tensor  # [B, t] the window's slots
    key_valid: Tensor  # [B, P + t] bool, prefix + window
    n_fresh: int  # window tokens excluding BOS (≤ L)

    @property
    def prefix_len(self) -> int:
        return self.key_valid.shape[1] - self.ids.shape[1]


class SleepHybrid(nn.Module):
    """Embed → [blocks in `layout`]^×N → final norm → unembedding (paper Eq. 6)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        if building_on_meta():  # skip nn.Embedding's normal_ init: the weights are about to be loaded
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, _weight=torch.empty(0).new_empty(
                config.vocab_size, config.d_model))  # fmt: skip
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, kind, mlp) for kind, mlp in zip(config.layout, config.mlp_kinds))
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.norm_offset)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not self.embed_tokens.weight.is_meta:  # on meta, weights are about to be loaded: no init work
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # residual projections scaled per GPT-2 paper
                if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, 0.0, config.init_std / math.sqrt(2 * config.n_layers))
        self._fingerprint: Fingerprint | None = None
        self.source_dir: Path | None = None  # the directory it was loaded from (its tokenizer files travel along)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)

    # ------------------------------------------------------------------ identity

    @property
    def fingerprint(self) -> Fingerprint:
        """Hash of the weights and the config values that change the computation (rule v2, `model.fingerprint`),
        computed once and cached; call `refresh_fingerprint` after changing weights. It is a ``str`` that also carries
        the legacy fingerprints this model answers to (``.aliases``: its v1 fingerprint, if it has one)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.config, self.state_dict())
        return self._fingerprint

    def refresh_fingerprint(self) -> Fingerprint:
        self._fingerprint = None
        return self.fingerprint

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """Every fingerprint this model answers to: the current one first, then legacy aliases."""
        return self.fingerprint.accepted

    def accepts(self, fingerprint: str) -> bool:
        """True if a state or snapshot tagged ``fingerprint`` was made by this model (under any fingerprint rule)."""
        return accepts(self.fingerprint, fingerprint)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights and activations (S is float32 regardless)."""
        return self.embed_tokens.weight.dtype

    def _gdn_layers(self) -> list[Block]:
        return [b for b in self.layers if b.kind in MEMORY_KINDS]  # type: ignore[misc]

    def _attn_layers(self) -> list[Block]:
        return [b for b in self.layers if b.kind == "a"]  # type: ignore[misc]

    # ------------------------------------------------------------------ state

    def init_state(self, batch: int = 1) -> FastWeights:
        """Zero fast weights for ``batch`` streams (S is zero once per sequence, paper §3.1)."""
        dev = self.device
        ssm = [
            torch.zeros(batch, b.linear_attn.h_v, b.linear_attn.d_k, b.linear_attn.d_v, device=dev)
            for b in self._gdn_layers()
        ]
        kv: list[tuple[Tensor, Tensor]] = []
        kv_valid = None
        if self.config.eviction == "sliding":
            for b in self._attn_layers():
                a = b.self_attn
                kv.append(
                    (torch.zeros(batch, a.n_kv, 0, a.head_dim, device=dev, dtype=self._kv_dtype()),
                     torch.zeros(batch, a.n_kv, 0, a.head_dim, device=dev, dtype=self._kv_dtype()))
                )  # fmt: skip
            kv_valid = torch.zeros(batch, 0, device=dev)
        return FastWeights(ssm=ssm, kv=kv, kv_valid=kv_valid, fingerprint=self.fingerprint, batch=batch)

    def state_shapes(self, batch: int = 1) -> dict[str, list[int]]:
        """Shapes a compatible state must have (retained K/V lengths vary, so sliding states are checked by layer)."""
        return {k: v for k, v in self.init_state(batch).shapes().items() if k.startswith("ssm.")}

    def check_state(self, state: FastWeights, batch: int | None = None) -> None:
        """Raise `SnapshotMismatch` unless ``state`` was made by this model (any of its `fingerprints`) and fits it."""
        if not self.accepts(state.fingerprint):
            raise mismatch(self.fingerprint, state.fingerprint, "state")
        want = self.init_state(batch or state.batch_size)
        if [list(s.shape) for s in state.ssm] != [list(s.shape) for s in want.ssm] or len(state.kv) != len(want.kv):
            raise SnapshotMismatch(f"state shapes {state.shapes()} do not fit this model ({want.shapes()})")

    def adopt_state(self, state: FastWeights, batch: int | None = None) -> FastWeights:
        """`check_state`, then the same state (tensors shared) tagged with this model's current fingerprint, so that
        whatever is computed and saved from it carries the current rule (a legacy-tagged snapshot moves on)."""
        self.check_state(state, batch)
        if state.fingerprint is self.fingerprint:
            return state
        return replace(state, fingerprint=self.fingerprint)

    # ------------------------------------------------------------------ one pass, one window

    def _mask(self, n_new: int, past_len: int, key_valid: Tensor) -> Tensor:
        """[B, n_new, past_len + n_new] bool: causal, key not padding, and (sliding) within L of the query."""
        dev = key_valid.device
        qi = torch.arange(n_new, device=dev)[:, None] + past_len  # query slots
        kj = torch.arange(past_len + n_new, device=dev)[None, :]
        allowed = kj <= qi
        if self.config.eviction == "sliding":
            allowed = allowed & (qi - kj < self.config.window)
        allowed = allowed[None] & key_valid[:, None, :]
        return allowed | (kj == qi)[None]  # a token may always see itself: no empty softmax row at a pad

    def _kv_dtype(self) -> torch.dtype:
        """Cached keys/values share the activations' dtype; float32 models keep float32 (today's states)."""
        return torch.float32 if self.dtype == torch.float32 else self.dtype

    def _slots(self) -> tuple[list[int], list[int]]:
        """For every block, its index among the GDN layers (state S) and among the attention layers (K/V); −1 if
        it has none."""
        ssm_slot, kv_slot, n_g, n_a = [], [], 0, 0
        for blk in self.layers:
            ssm_slot.append(n_g if blk.kind in MEMORY_KINDS else -1)
            kv_slot.append(n_a if blk.kind == "a" else -1)
            n_g, n_a = n_g + (blk.kind in MEMORY_KINDS), n_a + (blk.kind == "a")
        return ssm_slot, kv_slot

    def _pass(
        self,
        h: Tensor,
        ctx: PassContext,
        ssm: list[Tensor],
        prefix: list[tuple[Tensor, Tensor]],
        kvs: list[tuple[Tensor, Tensor] | None] | None = None,
        start: int = 0,
        end: int | None = None,
    ) -> tuple[Tensor, list[Tensor], list[tuple[Tensor, Tensor]]]:
        """Blocks [start, end) once (default: every block). GDN layers start from their entry of ``ssm``; attention
        layers see ``prefix`` (read-only) + this input. Returns h, and ``ssm`` / ``kvs`` (one entry per GDN /
        attention layer) with the entries of the blocks that ran replaced."""
        end = len(self.layers) if end is None else end
        ssm_slot, kv_slot = self._slots()
        new_ssm = list(ssm)
        new_kv: list = list(kvs) if kvs is not None else [None] * sum(b.kind == "a" for b in self.layers)
        for i in range(start, end):
            blk = self.layers[i]
            if blk.kind == "a":
                j = kv_slot[i]
                h, out = blk(h, ctx, LayerState(kv=prefix[j] if prefix else None))
                new_kv[j] = out.kv
            else:
                j = ssm_slot[i]
                h, out = blk(h, ctx, LayerState(ssm=new_ssm[j]))
                new_ssm[j] = out.ssm  # type: ignore[assignment]
        return h, new_ssm, new_kv

    def _valid(self, ids: Tensor) -> Tensor:
        """[B, T] bool: False at padding."""
        pad = self.config.pad_token_id
        return ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)

    def _window_slots(self, tokens: Tensor, state: FastWeights) -> tuple[Tensor, Tensor, bool]:
        """Window slots (BOS + tokens) and their validity. BOS opens every window under hard eviction and only the
        stream's first window under sliding eviction (later windows start with retained tokens instead)."""
        cfg = self.config
        valid = self._valid(tokens)
        stream_start = not state.kv or state.kv[0][0].shape[2] == 0
        if cfg.bos_token_id is None or (cfg.eviction == "sliding" and not stream_start):
            return tokens, valid, False
        bos = torch.full_like(tokens[:, :1], cfg.bos_token_id)
        bos_valid = valid.any(dim=1, keepdim=True)  # an all-padding window stays inert, BOS included
        return torch.cat([bos, tokens], 1), torch.cat([bos_valid, valid], 1), True

    def _window_context(
        self, tokens: Tensor, state: FastWeights
    ) -> tuple[Tensor, Tensor, bool, list[tuple[Tensor, Tensor]], Tensor, PassContext]:
        """What every pass over a window shares: slot ids and validity (`_window_slots`), whether a BOS opened it,
        the state's K/V prefix, key validity [B, P + n] and the pass context."""
        ids, valid, has_bos = self._window_slots(tokens, state)
        prefix = list(state.kv)
        P = prefix[0][0].shape[2] if prefix else 0
        prefix_valid = state.kv_valid.bool() if state.kv_valid is not None else valid.new_zeros(valid.shape[0], 0)
        key_valid = torch.cat([prefix_valid, valid], 1)
        return ids, valid, has_bos, prefix, key_valid, self._pass_context(ids.shape[1], P, key_valid)

    def _pass_context(self, n: int, P: int, key_valid: Tensor) -> PassContext:
        """The context of a pass over ``n`` window slots after ``P`` prefix keys (key_valid [B, P + n] bool):
        positions, the attention mask, and the slots' validity where padding exists (None otherwise: no masking)."""
        valid = key_valid[:, P:]
        any_pad = self.config.pad_token_id is not None and not bool(valid.all())
        positions = torch.arange(n, device=key_valid.device).expand(key_valid.shape[0], n)
        return PassContext(positions=positions, mask=self._mask(n, P, key_valid), valid=valid if any_pad else None)

    def _next_state(
        self, ssm: list[Tensor], kvs: list[tuple[Tensor, Tensor]], key_valid: Tensor, n_slots: int, fp: str
    ) -> FastWeights:
        """The state that crosses into the next window: S, and under sliding eviction the last L−1 K/V re-rotated into
        the next window's frame (it starts ``n_slots`` positions later)."""
        B = key_valid.shape[0]
        if self.config.eviction == "hard":
            return FastWeights(ssm=ssm, fingerprint=fp, batch=B)
        keep = self.config.window - 1
        kv = []
        for blk, (k, v) in zip(self._attn_layers(), kvs):
            a = blk.self_attn
            start = k.shape[2] - min(keep, k.shape[2])
            kv.append((shift_keys(k[:, :, start:], -n_slots, a.rotary_dim, a.theta), v[:, :, start:]))
        kv_valid = key_valid[:, key_valid.shape[1] - min(keep, key_valid.shape[1]) :].float()
        return FastWeights(ssm=ssm, kv=kv, kv_valid=kv_valid, fingerprint=fp, batch=B)

    def _run_window(
        self,
        tokens: Tensor,
        state: FastWeights,
        passes: int,
        use_checkpoint: bool = False,
        coda_read: bool = False,
        wake_features: bool = False,
    ) -> tuple[Tensor, FastWeights, bool]:
        """Run ``passes`` passes over one window. Returns (last pass's features [B, slots, d], next state, has_bos).

        With a ``loop`` that ends before the last block and passes > 1, the last pass ends at the loop's last block;
        ``coda_read`` then runs the blocks after it once more over those features, from the window's starting S and
        keeping none of what they write, so the features are those of prelude → loop^N → coda.
        ``wake_features`` returns pass 1's features instead (what wake decoding predicts from, before the window is
        slept) with the state after all ``passes``: a window as an engine lives it (chat fine-tuning).
        """
        T = tokens.shape[1]
        if T > self.config.window:
            raise WindowOverflow(f"{T} tokens do not fit a window of L={self.config.window}; split them or sleep")
        if passes < 1:
            raise InvalidInput(f"passes must be ≥ 1, got {passes}")
        ids, _, has_bos, prefix, key_valid, ctx = self._window_context(tokens, state)
        n = ids.shape[1]
        h = self.embed_tokens(ids)
        ssm = list(state.ssm)
        kvs: list = []
        lo, hi = self.config.loop_range()
        n_blocks = len(self.layers)

        def run(*args: Any) -> tuple[Tensor, list[Tensor], list]:
            if use_checkpoint and torch.is_grad_enabled():
                return checkpoint(self._pass, *args, use_reentrant=False)
            return self._pass(*args)

        # Pass 1 runs every block: up to the loop's end, then the coda (blocks after the loop), which thereby writes
        # its S once per window. Passes 2..N run blocks [lo, hi) on pass j−1's output of block hi−1 (paper §2.5).
        h, ssm, kvs = run(h, ctx, ssm, prefix, None, 0, hi)
        h_loop = h
        if hi < n_blocks:
            h, ssm, kvs = run(h, ctx, ssm, prefix, kvs, hi, n_blocks)
        for _ in range(passes - 1):
            h_loop, ssm, kvs = run(h_loop, ctx, ssm, prefix, kvs, lo, hi)
        if passes > 1 and not wake_features:
            h = h_loop
            if coda_read and hi < n_blocks:  # whole-model features: the coda over the refined loop output, read-only
                h = self._pass(h, ctx, list(state.ssm), prefix, kvs, hi, n_blocks)[0]
        return h, self._next_state(ssm, kvs, key_valid, n, state.fingerprint), has_bos

    def logits(self, h: Tensor) -> Tensor:
        """OutProj: final norm + unembedding, applied once after the last pass (paper §2.3)."""
        return self.lm_head(self.norm(h))

    # ------------------------------------------------------------------ public window API

    def forward_chunk(self, tokens: Tensor, state: FastWeights, passes: int = 1) -> tuple[Tensor, FastWeights]:
        """Run one window of ≤ L tokens ``passes`` times from ``state``.

        Args:
            tokens: [B, T] with T ≤ L. state: the state entering the window.
            passes: block-stack passes over the window (1 = ordinary single pass).

        Returns:
            logits [B, T, vocab] (logits[:, i] predicts the token after tokens[:, i], from the last pass);
            the state leaving the window (the caller evicts the window's K/V).
        """
        h, new_state, has_bos = self._run_window(tokens, state, passes, coda_read=True)
        return self.logits(h[:, int(has_bos) :]), new_state

    @torch.no_grad()
    def sleep(self, tokens: Tensor, state: FastWeights, passes: int | None = None) -> FastWeights:
        """Consolidate a window into S with N passes and return the new state (no logits, no parameter change)."""
        return self._run_window(tokens, state, passes or self.config.passes)[1]

    # ------------------------------------------------------------------ Algorithm 1

    def forward(
        self, tokens: Tensor, loss_mask: Tensor, passes: int | None = None, *, use_checkpoint: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Algorithm 1 ("LLM sleep training with hard eviction"; sliding eviction keeps the last L−1 K/V too).

        Args:
            tokens, loss_mask: [B, T]; loss_mask 1 = token is a target. Every row shares the chunk layout (A24).
            passes: N for label-free windows (default ``config.passes``); windows with any target get one pass.
            use_checkpoint: activation checkpointing per (window, pass), so memory stays flat as N grows.

        Returns:
            logits [B, T, vocab], *target-aligned*: logits[:, i] is the prediction for tokens[:, i] (zeros where there
            is none: label-free windows, and a window's first token when windows have no BOS);
            loss: mean cross-entropy over targets.
        """
        if tokens.shape != loss_mask.shape or tokens.dim() != 2:
            raise InvalidInput(
                f"tokens and loss_mask must both be [B, T]; got {tuple(tokens.shape)}, {tuple(loss_mask.shape)}"
            )
        N = passes or self.config.passes
        B, T = tokens.shape
        L = self.config.window
        state = self.init_state(B)
        out = torch.zeros(B, T, self.config.vocab_size, device=tokens.device, dtype=self.lm_head.weight.dtype)
        loss_sum = torch.zeros((), device=tokens.device)
        n_targets = 0
        for s in range(0, T, L):
            x, m = tokens[:, s : s + L], loss_mask[:, s : s + L].bool()
            scored = bool(m.any())
            h, state, has_bos = self._run_window(x, state, 1 if scored else N, use_checkpoint)
            if not scored:
                continue  # h and this window's K/V go out of scope; only `state` continues
            logits = self.logits(h)  # [B, slots, V]; slot i predicts slot i+1
            aligned = logits[:, : x.shape[1]] if has_bos else F.pad(logits[:, :-1], (0, 0, 1, 0))
            if not has_bos:
                m = m.clone()
                m[:, 0] = False  # nothing can predict a window's first token without a BOS (generators avoid it)
            out[:, s : s + x.shape[1]] = aligned
            loss_sum = loss_sum + F.cross_entropy(aligned[m], x[m], reduction="sum")
            n_targets += int(m.sum())
        if n_targets == 0:
            raise InvalidInput("loss_mask selects no predictable target")
        return out, loss_sum / n_targets

    def loss(self, tokens: Tensor, loss_mask: Tensor, passes: int | None = None) -> Tensor:
        """Mean masked cross-entropy of Algorithm 1 (see `forward`)."""
        return self.forward(tokens, loss_mask, passes)[1]

    # ------------------------------------------------------------------ incremental wake decoding

    @torch.no_grad()
    def start_window(self, state: FastWeights) -> WindowCache:
        """Open a window on ``state`` (runs BOS, if any, through pass 1)."""
        B = state.batch_size
        it_ssm, it_kv = iter(state.ssm), iter(state.kv)
        layers: list[LayerState] = []
        for blk in self.layers:
            if blk.kind == "a":
                a = blk.self_attn
                empty = torch.zeros(B, a.n_kv, 0, a.head_dim, device=self.device, dtype=self._kv_dtype())
                layers.append(LayerState(kv=next(it_kv, (empty, empty))))
            else:
                layers.append(LayerState(ssm=next(it_ssm)))
        prefix_valid = (
            state.kv_valid.bool() if state.kv_valid is not None else torch.zeros(B, 0, dtype=torch.bool)
        ).to(self.device)
        cache = WindowCache(
            state=state,
            layers=layers,
            h=torch.zeros(B, 0, self.config.d_model, device=self.device, dtype=self._kv_dtype()),
            ids=torch.zeros(B, 0, dtype=torch.long, device=self.device),
            key_valid=prefix_valid,
            n_fresh=0,
        )
        bos = self.config.bos_token_id
        if bos is not None and (self.config.eviction == "hard" or cache.prefix_len == 0):
            self._extend_slots(cache, torch.full((B, 1), bos, dtype=torch.long, device=self.device))
        return cache

    @torch.no_grad()
    def extend(self, cache: WindowCache, tokens: Tensor) -> Tensor:
        """Feed new tokens [B, T] into the open window (one pass each); returns logits [B, T, vocab].

        Raises `WindowOverflow` if the window would hold more than L tokens: sleep first.
        """
        if cache.n_fresh + tokens.shape[1] > self.config.window:
            raise WindowOverflow(
                f"window holds {cache.n_fresh} of L={self.config.window} tokens; {tokens.shape[1]} more do not fit — "
                "sleep first"
            )
        h = self._extend_slots(cache, tokens)
        cache.n_fresh += tokens.shape[1]
        return self.logits(h)

    def _extend_slots(self, cache: WindowCache, ids: Tensor) -> Tensor:
        B, T = ids.shape
        valid = self._valid(ids)
        past = cache.key_valid.shape[1]
        key_valid = torch.cat([cache.key_valid, valid], 1)
        positions = (torch.arange(T, device=ids.device) + cache.ids.shape[1]).expand(B, T)
        any_pad = self.config.pad_token_id is not None and not bool(valid.all())
        ctx = PassContext(positions=positions, mask=self._mask(T, past, key_valid), valid=valid if any_pad else None)
        h = self.embed_tokens(ids)
        loop_end = self.config.loop_range()[1]
        h_loop = h
        for i, blk in enumerate(self.layers):
            h, cache.layers[i] = blk(h, ctx, cache.layers[i])
            if i == loop_end - 1:
                h_loop = h  # the input of sleep passes 2..N: the loop's output (the last block's without a loop)
        cache.h = torch.cat([cache.h, h_loop], 1)
        cache.ids = torch.cat([cache.ids, ids], 1)
        cache.key_valid = key_valid
        return h

    @torch.no_grad()
    def sleep_window(self, cache: WindowCache, passes: int | None = None) -> FastWeights:
        """Sleep on the open window: passes 2..N (of the ``loop`` blocks) over its cached pass-1 features, then evict
        (returns the new state).

        Equals `sleep(window tokens, cache.state, passes)`: pass 1 already ran token by token in `extend`.
        """
        N = passes or self.config.passes
        if N < 1:
            raise InvalidInput(f"passes must be ≥ 1, got {N}")
        ssm = [st.ssm for st in cache.layers if st.ssm is not None]
        kvs: list = [st.kv for st in cache.layers if st.kv is not None]
        n, P = cache.ids.shape[1], cache.prefix_len
        if N > 1 and n > 0:
            ctx = self._pass_context(n, P, cache.key_valid)
            h, prefix = cache.h, list(cache.state.kv)
            lo, hi = self.config.loop_range()
            for _ in range(N - 1):
                h, ssm, kvs = self._pass(h, ctx, ssm, prefix, kvs, lo, hi)  # type: ignore[arg-type]
        return self._next_state(ssm, kvs, cache.key_valid, n, cache.state.fingerprint)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, path: str | Path, extra_config: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (the directory vLLM serves too)."""
        from agentsleep.model.checkpoint import save_checkpoint

        return save_checkpoint(self, path, extra_config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        for_serving: bool = False,
        **overrides: Any,
    ) -> SleepHybrid:
        """Load a checkpoint directory: one written by `save_pretrained` (or `agentsleep train`), or a Hugging Face
        one of a supported family (``qwen3_5_text``, ``qwen3_5``, ``qwen3_next``, ``qwen3``, ``qwen2``; see
        docs/pretrained.md).

        Args:
            device: where the weights go.
            dtype: e.g. ``torch.bfloat16`` to halve memory; default: as stored.
            for_serving: refuse (`ConfigError`) a model vLLM's kernels cannot serve (`HybridConfig.serving_problems`);
                otherwise such a model loads and only the problems are logged.
            overrides: HybridConfig fields, e.g. ``window`` (L), ``passes`` (N), ``eviction``, ``loop=(start, end)``
                (only those blocks repeat in sleep passes 2..N), plus ``insert_memory=[i, ...]`` (a fresh GDN memory
                layer without MLP after each listed block, zero output at insertion). Indices count the blocks of the
                directory being loaded.

        Raises:
            CheckpointError: missing/unreadable files, unsupported ``model_type``, weights that do not fit the config.
            ConfigError: overrides that do not fit the model (a window beyond its trained span, a bad loop range),
                or ``for_serving`` and unservable head sizes.
            InvalidInput: an unknown override.
        """
        from agentsleep.model.checkpoint import MODEL_TYPE, load_checkpoint, read_config

        path = Path(path)
        raw = read_config(path)
        if raw.get("model_type") in (MODEL_TYPE, None):
            model = load_checkpoint(path, device, overrides=overrides, dtype=dtype)
        else:
            from agentsleep.model.hf.loader import load_hf

            model = load_hf(path, raw, overrides=overrides, dtype=dtype, device=device)
            model.source_dir = path
        if not isinstance(model, cls):
            raise CheckpointError(f"{path} does not hold a {cls.__name__}")
        problems = model.config.serving_problems()
        if problems and for_serving:
            raise ConfigError(f"{path} cannot be served by vLLM: " + "; ".join(problems))
        for p in problems:
            logger.warning("%s: %s (fine for TorchEngine; vLLM would refuse it)", path, p)
        return model
