"""The chunked gated delta rule equals the per-token reference (values and gradients, with and without S₀)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentsleep.errors import InvalidInput
from agentsleep.model.ops import gated_delta_rule, gated_delta_rule_reference

# float32 tolerance: relative error of the chunked form vs the loop measured ≤ 1e-6 at T ≤ 130; 2e-5 leaves headroom
# for longer sequences and other BLAS paths without hiding a real bug (a wrong mask or decay gives errors ≥ 1e-2).
TOL = {torch.float64: 1e-5 * 1e-6, torch.float32: 2e-5}
CASES = [  # (B, T, H, K, V, chunk) — T not divisible by the chunk, K ≠ V, a one-token decode step
    (1, 1, 1, 8, 8, 64),
    (2, 63, 3, 16, 8, 64),
    (2, 75, 2, 8, 12, 16),
    (1, 130, 2, 16, 16, 32),
    (2, 200, 1, 8, 4, 64),
]


def _inputs(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, *, state: bool):
    q = F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = -torch.rand(B, T, H, dtype=dtype) * 0.5  # log-decay ≤ 0, never all zero
    beta = torch.rand(B, T, H, dtype=dtype) * 0.9 + 0.05
    s0 = torch.randn(B, H, K, V, dtype=dtype) if state else None
    leaves = [q, k, v, g, beta] + ([s0] if s0 is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    return q, k, v, g, beta, s0, leaves


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["S0=0", "S0=rand"])
@pytest.mark.parametrize("B,T,H,K,V,C", CASES, ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-C{c[5]}" for c in CASES])
def test_chunked_equals_reference(B, T, H, K, V, C, dtype, with_state):
    q, k, v, g, beta, s0, leaves = _inputs(B, T, H, K, V, dtype, state=with_state)
    o1, s1 = gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0, chunk_size=C)
    o2, s2 = gated_delta_rule_reference(q, k, v, g=g, beta=beta, initial_state=s0)
    tol = TOL[dtype] if dtype == torch.float32 else 1e-5
    assert _rel(o1, o2) <= tol, "o"
    assert _rel(s1, s2) <= tol, "final_state"
    do, ds = torch.randn_like(o1), torch.randn_like(s1)  # random cotangents for outputs and state
    g1 = torch.autograd.grad((o1 * do).sum() + (s1 * ds).sum(), leaves)
    g2 = torch.autograd.grad((o2 * do).sum() + (s2 * ds).sum(), leaves)
    names = ["dq", "dk", "dv", "dg", "dbeta", "dS0"]
    for name, a, b in zip(names, g1, g2):
        assert _rel(a, b) <= tol, name


@pytest.mark.parametrize("op", [gated_delta_rule, gated_delta_rule_reference], ids=["chunk", "reference"])
def test_split_and_carry_equals_one_call(op):
    q, k, v, g, beta, s0, _ = _inputs(2, 100, 2, 16, 8, torch.float64, state=True)
    o, s = op(q, k, v, g=g, beta=beta, initial_state=s0)
    oa, sa = op(q[:, :37], k[:, :37], v[:, :37], g=g[:, :37], beta=beta[:, :37], initial_state=s0)
    ob, sb = op(q[:, 37:], k[:, 37:], v[:, 37:], g=g[:, 37:], beta=beta[:, 37:], initial_state=sa)
    assert torch.allclose(torch.cat([oa, ob], 1), o, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sb, s, rtol=1e-10, atol=1e-12)


def test_state_matters_and_zero_beta_zero_decay_is_inert():
    q, k, v, g, beta, s0, _ = _inputs(1, 20, 2, 8, 8, torch.float64, state=True)
    o_a, _ = gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0)
    o_b, _ = gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0 * 2)
    assert not torch.allclose(o_a, o_b)
    # padding convention (paper.md A23): g = 0, beta = 0 leaves S exactly unchanged
    _, s_pad = gated_delta_rule(q, k, v, g=torch.zeros_like(g), beta=torch.zeros_like(beta), initial_state=s0)
    assert torch.equal(s_pad, s0.detach()) or torch.allclose(s_pad, s0, rtol=0, atol=1e-14)


def test_low_precision_inputs_keep_float32_state():
    q, k, v, g, beta, s0, _ = _inputs(1, 40, 2, 8, 8, torch.float32, state=True)
    o, s = gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g=g, beta=beta, initial_state=s0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_bad_shapes_raise_invalid_input():
    q, k, v, g, beta, s0, _ = _inputs(1, 10, 2, 8, 8, torch.float32, state=True)
    with pytest.raises(InvalidInput, match=r"v must be"):
        gated_delta_rule(q, k, v[:, :5], g=g, beta=beta)
    with pytest.raises(InvalidInput, match=r"beta must be"):
        gated_delta_rule(q, k, v, g=g, beta=beta[..., :1])
    with pytest.raises(InvalidInput, match=r"initial_state must be"):
        gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0[:, :1])
    with pytest.raises(InvalidInput, match=r"chunk_size"):
        gated_delta_rule(q, k, v, g=g, beta=beta, chunk_size=0)
