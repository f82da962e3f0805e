"""Naive references of the layer variants pretrained checkpoints need, the oracles of `layers.py` in tests.

Each function is written from the definition, one token / head / expert at a time, on the checkpoint's own tensors
(a mapping from the module's parameter names, e.g. ``"q_proj.weight"``, to tensors), so it shares no code with the
fast layers. Compute happens in the inputs' dtype (tests use float64). Shapes:

    x: [B, T, d]   positions: [B, T]   mask: [B, T, T] bool (True = query t may read key s)   state S: [B, H_v, K, V]

Sources: Qwen3-Next / Qwen3.5 as implemented by Hugging Face transformers 5 (``modeling_qwen3_next.py``,
``modeling_qwen3_5.py``): output-gated attention with partial RoPE and (1 + w) RMSNorm, the Gated DeltaNet with its
z-gated RMSNorm and GQA-style value heads, the top-k mixture of experts with a gated shared expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

Weights = Mapping[str, Tensor]


def _linear(x: Tensor, w: Weights, name: str) -> Tensor:
    y = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def _silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def _sigmoid(x: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-x))


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """x [..., D] / sqrt(mean of squares + eps) · (offset + weight); offset 1 is Qwen3-Next's zero-centred norm."""
    D = x.shape[-1]
    ms = sum(x[..., i] * x[..., i] for i in range(D)) / D
    return x / torch.sqrt(ms + eps)[..., None] * (offset + weight)


def rope_reference(x: Tensor, positions: Tensor, rotary_dim: int, theta: float) -> Tensor:
    """Rotate pairs (i, i + R/2) of the first R = rotary_dim dims of x [B, H, T, D] by position · θ^(−2i/R) ("rotate
    half" / neox layout); dims R..D pass through. positions: [B, T]."""
    half = rotary_dim // 2
    out = x.clone()
    for i in range(half):
        angle = positions.to(x.dtype) * theta ** (-2 * i / rotary_dim)  # [B, T]
        c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]  # [B, 1, T]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


def attention_reference(
    x: Tensor,
    w: Weights,
    positions: Tensor,
    mask: Tensor,
    *,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    rotary_dim: int,
    theta: float,
    qk_norm: bool,
    norm_eps: float,
    norm_offset: float,
    gated: bool,
) -> Tensor:
    """Causal softmax attention, head by head and query by query.

    ``w``: ``q_proj.weight`` ([H·D·(2 if gated)], d), ``k_proj.weight``, ``v_proj.weight``, ``o_proj.weight``,
    optional ``*.bias``, and ``q_norm.weight`` / ``k_norm.weight`` if ``qk_norm``. With ``gated``, q_proj holds per head
    ``[q (D), gate (D)]`` and the attention output of head h is multiplied by sigmoid(gate_h) before ``o_proj``.
    Query head h reads key/value head h // (H / H_kv). Returns [B, T, d].
    """
    B, T, _ = x.shape
    qg = _linear(x, w, "q_proj").reshape(B, T, n_heads, -1)
    q, gate = (qg[..., :head_dim], qg[..., head_dim:]) if gated else (qg, None)
    k = _linear(x, w, "k_proj").reshape(B, T, n_kv, head_dim)
    v = _linear(x, w, "v_proj").reshape(B, T, n_kv, head_dim)
    if qk_norm:
        q = rms_norm_reference(q, w["q_norm.weight"], norm_eps, norm_offset)
        k = rms_norm_reference(k, w["k_norm.weight"], norm_eps, norm_offset)
    q = rope_reference(q.transpose(1, 2), positions, rotary_dim, theta)  # [B, H, T, D]
    k = rope_reference(k.transpose(1, 2), positions, rotary_dim, theta)
    v = v.transpose(1, 2)
    out = torch.zeros(B, T, n_heads, head_dim, dtype=x.dtype)
    group = n_heads // n_kv
    for b in range(B):
        for h in range(n_heads):
            kh = h // group
            for t in range(T):
                keys = mask[b, t].nonzero().flatten()
                scores = torch.stack([q[b, h, t] @ k[b, kh, s] for s in keys]) / math.sqrt(head_dim)
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                out[b, t, h] = sum(p[i] * v[b, kh, s] for i, s in enumerate(keys))
    if gate is not None:
        out = out * _sigmoid(gate)
    return _linear(out.reshape(B, T, n_heads * head_dim), w, "o_proj")


def gdn_reference(
    x: Tensor,
    w: Weights,
    state: Tensor,
    *,
    h_k: int,
    h_v: int,
    d_k: int,
    d_v: int,
    split: bool,
    norm_eps: float,
    l2norm_eps: float | None,
) -> tuple[Tensor, Tensor]:
    """Gated DeltaNet layer, token by token, from zero conv history (a window start).

    ``w`` holds either the fused Qwen3-Next projections (``in_proj_qkvz.weight``: per key head ``[q, k, v (r·d_v),
    z (r·d_v)]``; ``in_proj_ba.weight``: per key head ``[b (r), a (r)]``) or Qwen3.5's split ones (``in_proj_qkv``,
    ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), plus ``conv1d.weight`` [C, 1, K], ``A_log``, ``dt_bias`` [H_v],
    ``norm.weight`` [d_v] and ``out_proj.weight``. Per token: causal depthwise conv + SiLU over [q, k, v]; q, k
    L2-normalised (q also scaled by d_k^−½); value head j reads key head j // r;
    S ← e^g S + β k (v − Sᵀk)ᵀ with g = −e^{A_log}·softplus(a + dt_bias), β = sigmoid(b); o = Sᵀq; out =
    out_proj(norm(o) · silu(z)) per value head. Returns out [B, T, d] and the final S [B, H_v, d_k, d_v].
    """
    B, T, _ = x.shape
    r = h_v // h_k
    key_dim, value_dim = h_k * d_k, h_v * d_v
    if split:
        qkv = _linear(x, w, "in_proj_qkv")
        q, k, v = qkv[..., :key_dim], qkv[..., key_dim : 2 * key_dim], qkv[..., 2 * key_dim :]
        z = _linear(x, w, "in_proj_z")
        b, a = _linear(x, w, "in_proj_b"), _linear(x, w, "in_proj_a")
    else:  # undo the per-key-head grouping, one group at a time
        qkvz = _linear(x, w, "in_proj_qkvz").reshape(B, T, h_k, -1)
        ba = _linear(x, w, "in_proj_ba").reshape(B, T, h_k, -1)
        qs, ks, vs, zs, bs, as_ = [], [], [], [], [], []
        for g in range(h_k):
            grp = qkvz[:, :, g]
            qs.append(grp[..., :d_k])
            ks.append(grp[..., d_k : 2 * d_k])
            vs.append(grp[..., 2 * d_k : 2 * d_k + r * d_v])
            zs.append(grp[..., 2 * d_k + r * d_v :])
            bs.append(ba[:, :, g, :r])
            as_.append(ba[:, :, g, r:])
        q, k, v, z = (torch.cat(p, -1) for p in (qs, ks, vs, zs))
        b, a = torch.cat(bs, -1), torch.cat(as_, -1)
    mixed = torch.cat([q, k, v], -1)  # [B, T, C]
    kernel = w["conv1d.weight"][:, 0]  # [C, K]; tap K-1 multiplies the current token
    K = kernel.shape[1]
    conv = torch.zeros_like(mixed)
    for t in range(T):
        for j in range(K):  # tap K-1-j looks j tokens back; nothing before the window start
            if t - j >= 0:
                conv[:, t] += mixed[:, t - j] * kernel[:, K - 1 - j]
    conv = _silu(conv)
    q = conv[..., :key_dim].reshape(B, T, h_k, d_k)
    k = conv[..., key_dim : 2 * key_dim].reshape(B, T, h_k, d_k)
    v = conv[..., 2 * key_dim :].reshape(B, T, h_v, d_v)

    def unit(u: Tensor) -> Tensor:
        sq = (u * u).sum(-1, keepdim=True)
        return u / torch.sqrt(sq).clamp_min(1e-12) if l2norm_eps is None else u / torch.sqrt(sq + l2norm_eps)

    q, k = unit(q) / math.sqrt(d_k), unit(k)
    beta = _sigmoid(b)  # [B, T, H_v]
    g = -torch.exp(w["A_log"]) * torch.log1p(torch.exp(a + w["dt_bias"]))
    S = state.clone().to(x.dtype)
    o = torch.zeros(B, T, h_v, d_v, dtype=x.dtype)
    for t in range(T):
        for j in range(h_v):
            kh = j // r
            kt, qt = k[:, t, kh], q[:, t, kh]  # [B, d_k]
            Sj = S[:, j] * torch.exp(g[:, t, j])[:, None, None]
            pred = torch.einsum("bk,bkv->bv", kt, Sj)
            Sj = Sj + kt[:, :, None] * (beta[:, t, j, None] * (v[:, t, j] - pred))[:, None, :]
            S[:, j] = Sj
            o[:, t, j] = torch.einsum("bk,bkv->bv", qt, Sj)
    zz = z.reshape(B, T, h_v, d_v)
    normed = rms_norm_reference(o, w["norm.weight"], norm_eps) * _silu(zz)
    return _linear(normed.reshape(B, T, value_dim), w, "out_proj"), S


def moe_reference(x: Tensor, w: Weights, *, n_experts: int, top_k: int, norm_topk: bool) -> Tensor:
    """Mixture of SwiGLU experts, token by token: softmax router over ``gate.weight`` [E, d], the top-k experts
    (``experts.{e}.{gate,up,down}_proj.weight``) weighted by their (renormalised) probabilities, plus the shared expert
    (``shared_expert.*``) scaled by sigmoid(``shared_expert_gate``) if present. Returns [B, T, d]."""

    def swiglu(u: Tensor, prefix: str) -> Tensor:
        hidden = _silu(_linear(u, w, f"{prefix}.gate_proj")) * _linear(u, w, f"{prefix}.up_proj")
        return _linear(hidden, w, f"{prefix}.down_proj")

    B, T, _ = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            u = x[b, t]
            logits = _linear(u, w, "gate")
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            order = sorted(range(n_experts), key=lambda e: -p[e].item())[:top_k]
            total = sum(float(p[e]) for e in order) if norm_topk else 1.0
            for e in order:
                out[b, t] += (p[e] / total) * swiglu(u, f"experts.{e}")
            if "shared_expert_gate.weight" in w:
                out[b, t] += _sigmoid(_linear(u, w, "shared_expert_gate")) * swiglu(u, "shared_expert")
    return out


__all__ = ["attention_reference", "gdn_reference", "moe_reference", "rms_norm_reference", "rope_reference"]
