"""FastWeights <-> vLLM page layout and the window header (no vLLM needed): K ≠ V catches a missing transpose."""

from __future__ import annotations

import pytest
import torch

from agentsleep.errors import InvalidInput
from agentsleep.model.state import FastWeights
from agentsleep.serving.pages import compute_header, read_ssm, write_conv, write_ssm

from .helpers import BOS, make_model


@pytest.mark.parametrize("key_major", [True, False], ids=["cpu-key-major", "gpu-value-major"])
def test_ssm_round_trip_and_orientation_with_k_ne_v(key_major: bool) -> None:
    H, K, V = 2, 128, 64
    S = torch.randn(H, K, V)
    page = torch.zeros(H, V, K)  # as vLLM declares a GDN state slot: value-major
    write_ssm(page, S, key_major=key_major)
    assert torch.equal(read_ssm(page, key_major=key_major), S)
    if key_major:  # the CPU kernel's view of the same memory (mamba/ops/cpu/gdn_attention.py) sees S itself
        assert torch.equal(page.view(H, K, V), S)
    else:  # value-major kernels read S^T per head
        assert torch.equal(page, S.transpose(-1, -2))
    with pytest.raises(InvalidInput, match="does not fit"):
        write_ssm(page, torch.randn(H, V, K), key_major=key_major)


@pytest.mark.parametrize("dim_first", [True, False], ids=["DS", "SD"])
def test_conv_orientation(dim_first: bool) -> None:
    conv = torch.randn(768, 3)  # [conv_dim, K-1], oldest input first
    page = torch.zeros(768, 3) if dim_first else torch.zeros(3, 768)
    write_conv(page, conv, dim_first=dim_first)
    assert torch.equal(page if dim_first else page.T, conv)


def test_header_equals_reference_window_start() -> None:
    model = make_model()
    S = FastWeights(ssm=[torch.randn_like(s) for s in model.init_state(1).ssm], fingerprint=model.fingerprint)
    head = compute_header(model, S)
    assert head.token == BOS
    cache = model.start_window(S)
    gdn = [st for st in cache.layers if st.ssm is not None]
    attn = [st for st in cache.layers if st.kv is not None]
    assert len(head.ssm) == len(gdn) == 2 and len(head.k) == len(attn) == 2
    for h, st in zip(head.ssm, gdn):
        assert torch.equal(h, st.ssm[0])
    for h, st in zip(head.conv, gdn):
        assert torch.equal(h, st.conv[0])
        assert not h[:, :-1].any()  # the conv restarts every window: only the header's own input is non-zero
    for k, v, st in zip(head.k, head.v, attn):
        assert torch.equal(k, st.kv[0][0, :, 0]) and torch.equal(v, st.kv[1][0, :, 0])
    # the header depends on S (the whole point of computing it from the restored state)
    zero = compute_header(model, model.init_state(1))
    assert not torch.allclose(zero.k[0], head.k[0]) or not torch.allclose(zero.k[1], head.k[1])
