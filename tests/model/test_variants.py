"""Layer variants of imported checkpoints against their naive references (agentsleep/model/reference.py), on random
weights and inputs in float64: (1 + w) RMSNorm, partial RoPE, output-gated / biased / GQA attention, the GDN with
fused or split input projections and GQA-style value heads, the mixture of experts."""

from __future__ import annotations

import pytest
import torch

from agentsleep.model.hybrid import HybridConfig
from agentsleep.model.layers import GatedDeltaNet, RMSNorm, SparseMoE, WindowAttention, apply_rope, rope_cos_sin
from agentsleep.model.reference import (
    attention_reference,
    gdn_reference,
    moe_reference,
    rms_norm_reference,
    rope_reference,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randomise(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every parameter (norm weights and biases included, never the init's ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if name.endswith("A_log") else 0.5 if p.dim() < 2 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return dict(module.named_parameters())


def cfg(**kw) -> HybridConfig:
    base = dict(vocab_size=16, d_model=48, check_serving=False, norm_eps=1e-5)
    return HybridConfig(**{**base, **kw})


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["w", "1+w"])
def test_rms_norm_with_offset(offset: float) -> None:
    norm = RMSNorm(24, 1e-5, offset).double()
    assert torch.allclose(norm.weight + offset, torch.ones(24, dtype=torch.float64))  # fresh norm scales by one
    w = _randomise(norm, 0)["weight"]
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    assert _rel(norm(x), rms_norm_reference(x, w, 1e-5, offset)) < 1e-12


@pytest.mark.parametrize("rotary_dim", [32, 16, 8], ids=["full", "half", "quarter"])
def test_partial_rope(rotary_dim: int) -> None:
    x = torch.randn(2, 3, 7, 32, dtype=torch.float64)
    pos = torch.randint(-5, 40, (2, 7))
    cos, sin = rope_cos_sin(pos, rotary_dim, 1000.0, torch.float64)
    out = apply_rope(x, cos[:, None], sin[:, None])
    assert _rel(out, rope_reference(x, pos, rotary_dim, 1000.0)) < 1e-12
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


ATTN_CASES = {
    "plain": dict(attn_heads=2, attn_head_dim=16),
    "qwen2-bias-gqa": dict(attn_heads=4, attn_kv_heads=2, attn_head_dim=16, attn_qkv_bias=True, qk_norm=False),
    "qwen3-bias": dict(attn_heads=2, attn_head_dim=24, attn_qkv_bias=True, attn_o_bias=True),
    "next-gate-partial": dict(
        attn_heads=4, attn_kv_heads=1, attn_head_dim=16, attn_output_gate=True, rotary_dim=4, norm_offset=1.0
    ),
}


@pytest.mark.parametrize("case", ATTN_CASES, ids=list(ATTN_CASES))
def test_attention_variants(case: str) -> None:
    c = cfg(**ATTN_CASES[case], rope_theta=500.0)
    attn = WindowAttention(c).double()
    w = _randomise(attn, 1)
    B, T = 2, 9
    x = torch.randn(B, T, c.d_model, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone()
    mask[1, :, 0] = False  # a masked key
    mask[1, 0, 0] = True
    out, (k, _) = attn(x, pos, mask)
    ref = attention_reference(
        x, w, pos, mask, n_heads=c.attn_heads, n_kv=c.attn_kv_heads, head_dim=c.attn_head_dim,
        rotary_dim=c.rotary_dim or c.attn_head_dim, theta=c.rope_theta, qk_norm=c.qk_norm, norm_eps=c.norm_eps,
        norm_offset=c.norm_offset, gated=c.attn_output_gate,
    )  # fmt: skip
    assert _rel(out, ref) < 1e-10
    assert k.shape == (B, c.attn_kv_heads, T, c.attn_head_dim)
    # incremental decoding with the returned K/V equals the parallel call
    out1, kv1 = attn(x[:, :5], pos[:, :5], mask[:, :5, :5])
    out2, _ = attn(x[:, 5:], pos[:, 5:], mask[:, 5:, :], past=kv1)
    assert _rel(torch.cat([out1, out2], 1), out) < 1e-12


GDN_CASES = {
    "next-fused-r1": dict(gdn_heads=2, gdn_head_dim=16, gdn_in_proj="qkvz"),
    "next-fused-r2-kv": dict(gdn_heads=1, gdn_v_heads=2, gdn_head_dim=16, gdn_v_head_dim=8, gdn_in_proj="qkvz"),
    "q35-split-r2": dict(gdn_heads=2, gdn_v_heads=4, gdn_head_dim=8, gdn_in_proj="split", gdn_l2norm_eps=1e-6),
    "q35-split-r3-kv": dict(
        gdn_heads=1, gdn_v_heads=3, gdn_head_dim=16, gdn_v_head_dim=8, gdn_in_proj="split", gdn_l2norm_eps=1e-6
    ),
}


@pytest.mark.parametrize("T", [5, 40], ids=["recurrent", "chunked"])
@pytest.mark.parametrize("case", GDN_CASES, ids=list(GDN_CASES))
def test_gdn_variants(case: str, T: int) -> None:
    c = cfg(layout="g", **GDN_CASES[case])
    gdn = GatedDeltaNet(c).double()
    w = _randomise(gdn, 2)
    B = 2
    x = torch.randn(B, T, c.d_model, dtype=torch.float64)
    s0 = torch.randn(B, gdn.h_v, gdn.d_k, gdn.d_v, dtype=torch.float64) * 0.3
    out, S, _ = gdn(x, s0)
    ref, S_ref = gdn_reference(
        x, w, s0, h_k=gdn.h_k, h_v=gdn.h_v, d_k=gdn.d_k, d_v=gdn.d_v, split=gdn.split, norm_eps=c.norm_eps,
        l2norm_eps=c.gdn_l2norm_eps,
    )  # fmt: skip
    assert _rel(out, ref) < 1e-10
    assert _rel(S, S_ref) < 1e-10


@pytest.mark.parametrize("shared", [0, 24], ids=["no-shared", "shared"])
@pytest.mark.parametrize("norm_topk", [True, False], ids=["renorm", "raw"])
def test_mixture_of_experts(shared: int, norm_topk: bool) -> None:
    c = cfg(
        layout="a", mlp_layout="e", moe_experts=5, moe_top_k=2, moe_intermediate_size=12,
        moe_shared_intermediate_size=shared, moe_norm_topk=norm_topk, attn_heads=2, attn_head_dim=16,
    )  # fmt: skip
    moe = SparseMoE(c).double()
    w = {k: v.detach() for k, v in _randomise(moe, 3).items()}
    x = torch.randn(2, 6, c.d_model, dtype=torch.float64)
    out = moe(x)
    assert _rel(out, moe_reference(x, w, n_experts=5, top_k=2, norm_topk=norm_topk)) < 1e-12
    assert ("shared_expert_gate.weight" in w) == bool(shared)


@pytest.mark.parametrize("rotary_dim", [32, 8], ids=["full", "partial"])
def test_shift_keys_moves_rotated_keys_to_another_frame(rotary_dim: int) -> None:
    """Sliding eviction re-rotates retained keys by −(window slots): rotating at p then shifting by o == rotating at
    p + o, for partial RoPE too (the unrotated dims stay put)."""
    from agentsleep.model.layers import shift_keys

    k = torch.randn(1, 2, 5, 32, dtype=torch.float64)
    pos = torch.arange(5)[None] + 7
    cos, sin = rope_cos_sin(pos, rotary_dim, 1000.0, torch.float64)
    cos2, sin2 = rope_cos_sin(pos - 7, rotary_dim, 1000.0, torch.float64)
    shifted = shift_keys(apply_rope(k, cos[:, None], sin[:, None]), -7, rotary_dim, 1000.0)
    assert _rel(shifted, apply_rope(k, cos2[:, None], sin2[:, None])) < 1e-12
