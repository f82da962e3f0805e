"""Building blocks of the sleep hybrid, in reading order: RMSNorm, rotary embedding, window attention, Gated DeltaNet,
SwiGLU MLP, and the pre-norm block.

Names follow Qwen3-Next (``self_attn.{q,k,v,o}_proj``, ``linear_attn.{in_proj_qkvz, in_proj_ba, conv1d, A_log,
dt_bias, norm, out_proj}``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``) so that a
checkpoint's safetensors keys equal vLLM module names and vLLM's own GDN layer can host the weights.

Per-window semantics (paper §3.4 and the decisions in docs/model.md): attention sees only the current window (plus,
under sliding eviction, the retained keys of the last L-1 tokens); positions restart at 0 every window; the short
convolution restarts from zeros every window and every pass; only the GDN state S crosses a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentsleep.model.ops import gated_delta_rule, gated_delta_rule_reference

# Inputs this short (decoding) take the per-token recurrence: same math, less work than setting up one chunk.
RECURRENT_MAX_T = 8

if TYPE_CHECKING:
    from agentsleep.model.hybrid import HybridConfig


def building_on_meta() -> bool:
    """Whether modules are being built under ``torch.device("meta")`` (to receive loaded weights): random init there
    is wasted work, and its first call costs seconds (it imports torch's Python reference kernels)."""
    return torch.empty(0).device.type == "meta"


def _up(x: Tensor) -> Tensor:
    """Upcast half precision to float32 for reductions; leave float32/float64 alone (float64 tests need it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), computed in float32 (Zhang & Sennrich 2019).

    ``offset = 1`` is the zero-centred form of Qwen3-Next / Qwen3.5 (weights stored as w, applied as 1 + w); the
    weight starts at 1 − offset so a fresh norm always scales by one.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        xf = _up(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.to(xf.dtype)
        if self.offset:
            w = w + self.offset
        return (xf * w).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the GDN output, gated by SiLU(z): the Qwen3-Next ``norm`` of the linear-attention layer."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        xf = _up(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(xf.dtype) * xf * F.silu(gate.to(xf.dtype))).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- rotary


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos/sin tables for integer positions (negative ones allowed: retained keys sit before the window start).

    positions: [...] -> cos, sin: [..., head_dim] (neox "rotate half" layout, as vLLM's default rope).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    freqs = positions.to(dtype)[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, D] by cos/sin [B, 1, T, R] (or broadcastable), R ≤ D: partial RoPE rotates the first R
    dimensions of each head and passes the rest through (Qwen3-Next, ``partial_rotary_factor``)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (_up(x) * cos + _up(rotated) * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- attention


class WindowAttention(nn.Module):
    """Causal softmax attention over the current window (and, under sliding eviction, the retained prefix).

    Keys are cached *after* rotation (as vLLM does), with positions counted from the current window's start.
    Variants of imported checkpoints (all off in the native hybrid): q/k/v and output biases (Qwen2, Qwen3), an
    output gate read from ``q_proj`` (Qwen3-Next: per head ``[q (D), gate (D)]``, out = attn · sigmoid(gate)), and
    partial RoPE (``rotary_dim`` < D).
    """

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim
        self.theta = cfg.rope_theta
        self.rotary_dim: int = cfg.rotary_dim or self.head_dim  # type: ignore[assignment]
        self.gated = cfg.attn_output_gate
        q_out = self.n_heads * self.head_dim * (2 if self.gated else 1)
        self.q_proj = nn.Linear(cfg.d_model, q_out, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.attn_o_bias)
        # Per-head q/k RMSNorm (as Qwen3): keeps logits bounded when the same stack is looped N times.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """
        Args:
            x: [B, T, d] the new tokens.
            positions: [B, T] integer positions of the new tokens (window-relative).
            mask: [B, P+T] ... broadcast to [B, 1, T, P+T] boolean, True = may attend (built by the model).
            past: cached (k, v), each [B, H_kv, P, D], keys already rotated.

        Returns:
            out [B, T, d]; (k, v) of past + new tokens, each [B, H_kv, P+T, D].
        """
        B, T, _ = x.shape
        gate = None
        if self.gated:  # per head [q, gate]: [B, T, H, 2D] -> two [B, T, H, D]
            q, gate = self.q_proj(x).view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            q = q.transpose(1, 2)  # [B, H, T, D]
            gate = gate.reshape(B, T, self.n_heads * self.head_dim)
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(positions, self.rotary_dim, self.theta, _up(q).dtype)  # [B, T, R]
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        if past is not None:  # (a restored snapshot holds float32 K/V; a bf16 model computes in bf16)
            k, v = torch.cat([past[0].to(k.dtype), k], dim=2), torch.cat([past[1].to(v.dtype), v], dim=2)
        rep = self.n_heads // self.n_kv
        kk, vv = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None])  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return self.o_proj(y), (k, v)


def shift_keys(k: Tensor, offset: int, rotary_dim: int, theta: float) -> Tensor:
    """Re-rotate cached keys by ``offset`` positions (RoPE rotations compose): used when retained keys move into the
    next window's frame under sliding eviction. k: [B, H_kv, n, D]; the first ``rotary_dim`` of D are rotated."""
    cos, sin = rope_cos_sin(torch.tensor(float(offset), device=k.device), rotary_dim, theta, _up(k).dtype)
    return apply_rope(k, cos, sin)


# ---------------------------------------------------------------------------------------------------- Gated DeltaNet


def l2_normalize(x: Tensor, eps: float | None = None) -> Tensor:
    """Unit-length last dimension: x / max(|x|, 1e-12) (``eps=None``), or x·rsqrt(|x|² + eps), the form of fla and
    transformers' Qwen3-Next/Qwen3.5 kernels (``use_qk_l2norm_in_kernel``, eps 1e-6)."""
    if eps is None:
        return F.normalize(x, dim=-1)
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer in the Qwen3-Next parameter layout (paper §2.2; Yang et al. arXiv 2412.06464).

    ``in_proj_qkvz`` is grouped per key head as Qwen3-Next does: for each of the ``H_k`` key heads the projection holds
    ``[q (d_k), k (d_k), v (r·d_v), z (r·d_v)]`` with ``r = H_v / H_k``; ``in_proj_ba`` holds ``[b (r), a (r)]`` per key
    head. With ``gdn_in_proj="split"`` (Qwen3.5) the same quantities come from four projections, not grouped:
    ``in_proj_qkv`` = ``[q (all heads), k, v]``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``. Either way value head j
    reads key head j // r (GQA-style value heads), and the causal depthwise conv runs over ``[q (all heads), k, v]``.
    """

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.h_k, self.h_v = cfg.gdn_heads, cfg.gdn_v_heads
        self.d_k, self.d_v = cfg.gdn_head_dim, cfg.gdn_v_head_dim
        self.ratio = self.h_v // self.h_k
        self.key_dim, self.value_dim = self.h_k * self.d_k, self.h_v * self.d_v
        self.conv_size = cfg.conv_size
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.split = cfg.gdn_in_proj == "split"
        self.l2norm_eps = cfg.gdn_l2norm_eps
        if self.split:
            self.in_proj_qkv = nn.Linear(cfg.d_model, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(cfg.d_model, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(cfg.d_model, self.h_v, bias=False)
            self.in_proj_a = nn.Linear(cfg.d_model, self.h_v, bias=False)
        else:
            self.in_proj_qkvz = nn.Linear(cfg.d_model, 2 * self.key_dim + 2 * self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(cfg.d_model, 2 * self.h_v, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=cfg.conv_size, groups=self.conv_dim, bias=False
        )
        if building_on_meta():  # shapes only, the weights are about to be loaded (no init work)
            self.A_log, self.dt_bias = nn.Parameter(torch.empty(self.h_v)), nn.Parameter(torch.empty(self.h_v))
        else:
            # Mamba2-style init (paper.md §2.2): A ~ U[1, 16]; dt ∈ [1e-3, 1e-1] log-uniform, stored as softplus⁻¹(dt).
            self.A_log = nn.Parameter(torch.empty(self.h_v).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(self.h_v).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus (pytorch issue #72759)
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        self.norm = GatedRMSNorm(self.d_v, cfg.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)

    def split_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, d] -> q, k [B, T, H_k, d_k]; v, z [B, T, H_v, d_v]; b, a [B, T, H_v] (Qwen3-Next ordering)."""
        B, T, _ = x.shape
        if self.split:
            q, k, v = self.in_proj_qkv(x).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            return (
                q.reshape(B, T, self.h_k, self.d_k),
                k.reshape(B, T, self.h_k, self.d_k),
                v.reshape(B, T, self.h_v, self.d_v),
                self.in_proj_z(x).reshape(B, T, self.h_v, self.d_v),
                self.in_proj_b(x),
                self.in_proj_a(x),
            )
        qkvz = self.in_proj_qkvz(x).view(B, T, self.h_k, 2 * self.d_k + 2 * self.ratio * self.d_v)
        q, k, v, z = qkvz.split([self.d_k, self.d_k, self.ratio * self.d_v, self.ratio * self.d_v], dim=-1)
        ba = self.in_proj_ba(x).view(B, T, self.h_k, 2 * self.ratio)
        b, a = ba.split([self.ratio, self.ratio], dim=-1)
        return (
            q,
            k,
            v.reshape(B, T, self.h_v, self.d_v),
            z.reshape(B, T, self.h_v, self.d_v),
            b.reshape(B, T, self.h_v),
            a.reshape(B, T, self.h_v),
        )

    def forward(
        self, x: Tensor, state: Tensor, valid: Tensor | None = None, conv_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            x: [B, T, d]. state: S entering this call, [B, H_v, d_k, d_v] float32.
            valid: [B, T] bool, False at padding: pads are inert (α = 1, β = 0, zero conv input; paper.md A23).
            conv_state: the last conv_size-1 conv inputs [B, conv_dim, conv_size-1] from earlier tokens of the *same*
                window and pass (decoding); None = window start (zeros).

        Returns:
            out [B, T, d]; new state [B, H_v, d_k, d_v]; new conv_state [B, conv_dim, conv_size-1].
        """
        B, T, _ = x.shape
        q, k, v, z, b, a = self.split_projections(x)
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)  # [B, T, conv]
        if valid is not None:
            mixed = mixed * valid[..., None].to(mixed.dtype)
        mixed = mixed.transpose(1, 2)  # [B, conv_dim, T]
        if conv_state is None:
            conv_state = mixed.new_zeros(B, self.conv_dim, self.conv_size - 1)
        buf = torch.cat([conv_state, mixed], dim=-1)  # [B, conv_dim, K-1+T]
        mixed = F.silu(F.conv1d(buf, self.conv1d.weight, groups=self.conv_dim)).transpose(1, 2)  # [B, T, conv_dim]
        new_conv = buf[..., buf.shape[-1] - (self.conv_size - 1) :]
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(_up(q.reshape(B, T, self.h_k, self.d_k)), self.l2norm_eps) * self.d_k**-0.5
        k = l2_normalize(_up(k.reshape(B, T, self.h_k, self.d_k)), self.l2norm_eps)
        out, state = self._recur(x, q, k, v.reshape(B, T, self.h_v, self.d_v), z, b, a, state, valid)
        return out, state, new_conv

    def _recur(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, z: Tensor, b: Tensor, a: Tensor, state: Tensor,
        valid: Tensor | None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Gates, the gated delta rule from ``state``, gated norm and output projection (shared with the Jet layer).

        q, k: [B, T, H_k, d_k] normalised (q scaled); v, z: [B, T, H_v, d_v]; b, a: [B, T, H_v] -> out [B, T, d], S.
        """
        B, T, _ = x.shape
        if self.ratio > 1:  # GQA-style: each key head serves r value heads
            q, k = q.repeat_interleave(self.ratio, dim=2), k.repeat_interleave(self.ratio, dim=2)
        beta = _up(b).sigmoid()  # [B, T, H_v]
        g = -_up(self.A_log).exp() * F.softplus(_up(a) + _up(self.dt_bias))  # log α ≤ 0
        if valid is not None:
            beta = beta * valid[..., None]
            g = g * valid[..., None]
        op = gated_delta_rule_reference if T <= RECURRENT_MAX_T else gated_delta_rule
        o, state = op(q, k, _up(v), g=g, beta=beta, initial_state=state)  # o [B, T, H_v, d_v]
        o = self.norm(o.to(x.dtype), z)
        return self.out_proj(o.reshape(B, T, self.value_dim)), state


# ---------------------------------------------------------------------------------------------------- MLP and block


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)) (Shazeer 2020)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts plus a sigmoid-gated shared expert (Qwen3-Next), in plain PyTorch.

    Names follow the Hugging Face checkpoints: ``gate`` (router, [E, d]), ``experts.{e}.{gate,up,down}_proj``,
    ``shared_expert.*``, ``shared_expert_gate`` ([1, d]). Routing: softmax over all experts in float32, keep the top
    k, renormalise them to sum to 1 if ``moe_norm_topk``. Only the experts some token picked run.
    """

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk = cfg.moe_top_k, cfg.moe_norm_topk
        self.gate = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        hidden: int = cfg.moe_intermediate_size  # type: ignore[assignment]
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, hidden) for _ in range(cfg.moe_experts))
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.moe_shared_intermediate_size:
            self.shared_expert = SwiGLU(cfg.d_model, cfg.moe_shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [n, d]
        probs = F.softmax(_up(self.gate(x)), dim=-1)  # [n, E], float32 at least
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [n, k]
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            tok, slot = torch.where(chosen == e)
            out.index_add_(0, tok, self.experts[e](x[tok]) * weights[tok, slot, None])
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


@dataclass
class LayerState:
    """What one block carries between calls inside a window: attention K/V (prefix + tokens so far) or GDN (S, conv)."""

    kv: tuple[Tensor, Tensor] | None = None
    ssm: Tensor | None = None
    conv: Tensor | None = None


@dataclass
class PassContext:
    """Per-call inputs shared by every block of one pass."""

    positions: Tensor  # [B, T] window-relative positions of the new tokens
    mask: Tensor  # [B, T, P+T] bool, True = query may attend to key
    valid: Tensor | None  # [B, T] bool, False at padding


class Block(nn.Module):
    """Pre-norm block: x + Mixer(norm(x)), then x + MLP(norm(x)). The mixer is attention ('a'), GDN ('g') or Jet (GDN
    with a dynamic value conv, 'j': `agentsleep.model.jet`); the MLP is SwiGLU ('d'), a mixture of experts ('e') or
    absent ('-': a memory layer inserted without MLP)."""

    def __init__(self, cfg: HybridConfig, kind: str, mlp: str = "d") -> None:
        super().__init__()
        self.kind = kind
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        if kind == "a":
            self.self_attn = WindowAttention(cfg)
        elif kind == "j":
            from agentsleep.model.jet import JetGatedDeltaNet  # jet.py builds on this module

            self.linear_attn = JetGatedDeltaNet(cfg)
        else:
            self.linear_attn = GatedDeltaNet(cfg)
        self.post_attention_layernorm: RMSNorm | None = None
        self.mlp: nn.Module | None = None
        if mlp != "-":
            self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
            self.mlp = SwiGLU(cfg.d_model, cfg.intermediate_size) if mlp == "d" else SparseMoE(cfg)  # type: ignore[arg-type]

    def forward(self, x: Tensor, ctx: PassContext, st: LayerState) -> tuple[Tensor, LayerState]:
        """x [B, T, d] -> x [B, T, d]; ``st`` holds this layer's state before the call, the result after it."""
        h = self.input_layernorm(x)
        if self.kind == "a":
            y, kv = self.self_attn(h, ctx.positions, ctx.mask, past=st.kv)
            new = LayerState(kv=kv)
        else:
            assert st.ssm is not None  # the model always hands GDN layers a state
            y, ssm, conv = self.linear_attn(h, st.ssm, ctx.valid, st.conv)
            new = LayerState(ssm=ssm, conv=conv)
        x = x + y
        if self.mlp is None or self.post_attention_layernorm is None:
            return x, new
        return x + self.mlp(self.post_attention_layernorm(x)), new
