"""Independent oracle: flash-linear-attention's naive PyTorch references (code nobody on the team wrote).

Needs the `fla` extra (fla-core, triton for import, einops, packaging); CI installs it, so these run there for real.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentsleep.model.ops import gated_delta_rule

naive = pytest.importorskip(
    "fla.ops.gated_delta_rule.naive", reason="fla-core + triton (the `fla` extra) are not installed"
)

pytestmark = pytest.mark.fla


@pytest.mark.parametrize("T", [1, 50, 100, 130])
@pytest.mark.parametrize("with_state", [False, True], ids=["S0=0", "S0=rand"])
def test_matches_fla_naive_references(T, with_state):
    B, H, K, V = 2, 2, 16, 12
    q = F.normalize(torch.randn(B, T, H, K), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = -torch.rand(B, T, H) * 0.5
    beta = torch.rand(B, T, H)
    s0 = torch.randn(B, H, K, V) if with_state else None
    o, s = gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0)
    # fla scales q by `scale` itself (default K**-0.5); ours leaves scaling to the layer, so pass scale=1.
    o_rec, s_rec = naive.naive_recurrent_gated_delta_rule(
        q, k, v, beta=beta, g=g, scale=1.0, initial_state=s0, output_final_state=True
    )
    o_chk, s_chk = naive.naive_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, scale=1.0, initial_state=s0, output_final_state=True
    )
    for name, ref_o, ref_s in (("recurrent", o_rec, s_rec), ("chunk", o_chk, s_chk)):
        torch.testing.assert_close(o, ref_o.to(o.dtype), rtol=1e-5, atol=1e-5, msg=f"o vs fla {name}")
        torch.testing.assert_close(s, ref_s.float(), rtol=1e-5, atol=1e-5, msg=f"state vs fla {name}")
