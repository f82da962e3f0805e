"""Conversion between backend-neutral `FastWeights` and vLLM's per-request cache pages, and the window *header*.

The snapshot convention (DESIGN.md, `agentsleep.runtime`): a snapshot is (the fast weights S the current window
started from, the window's token ids without BOS); reviving re-runs the window tokens from S. On vLLM a request is
``[BOS] + window tokens + new input``. The KV connector can only inject state by claiming a prefix of the prompt as
"already computed" (spec/vllm-cpu.md §8.6), and at least one prompt token must remain to be computed. So the connector
claims exactly one token, the *header* (the BOS, or the first window token when the checkpoint has no BOS), and fills
everything vLLM would have cached after computing that token from S:

* every GDN layer: the recurrent state S' (after the header) and the short-conv state (the header's conv input,
  preceded by zeros: the conv restarts every window);
* every attention layer: the header's K (after q/k-norm and RoPE at position 0) and V.

These depend on S through the layers below them, so they are computed by the float32 PyTorch reference
(`SleepHybrid.start_window`) on the same weights, then cast to vLLM's dtypes. Snapshots therefore hold no attention
K/V and no vLLM layout: the store never sees pages.

Layouts (vLLM 0.32.0, read from the sources and pinned by tests/serving): vLLM *declares* the GDN state as
``[H_v, d_v, d_k]`` (value-major, the layout of its GPU kernels); the CPU kernel reinterprets the same memory as
``[H_v, d_k, d_v]`` with a view (mamba/ops/cpu/gdn_attention.py), i.e. key-major, our `FastWeights` orientation.
The conv state is ``[K-1, conv_dim]`` ("SD") or ``[conv_dim, K-1]`` ("DS", `is_conv_state_dim_first()`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from agentsleep.errors import InvalidInput
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.model.state import FastWeights


def write_ssm(page: Tensor, state: Tensor, *, key_major: bool) -> None:
    """Write one layer's S into a vLLM state slot.

    Args:
        page: the slot, as vLLM declares it: ``[H_v, d_v, d_k]``.
        state: S in `FastWeights` orientation, ``[H_v, d_k, d_v]`` (key-major).
        key_major: True where the kernel reads the slot key-major (vLLM's CPU kernel); False for value-major kernels
            (the GPU kernels: FLA, FlashInfer, CuTe-DSL document ``[N, H, V, K]``).
    """
    H, V, K = page.shape
    if tuple(state.shape) != (H, K, V):
        raise InvalidInput(f"state shape {tuple(state.shape)} does not fit a [{H}, {K}, {V}] (H, d_k, d_v) slot")
    if key_major:
        page.view(H, K, V).copy_(state)
    else:
        page.copy_(state.transpose(-1, -2))


def read_ssm(page: Tensor, *, key_major: bool) -> Tensor:
    """Inverse of `write_ssm`: one slot ``[H_v, d_v, d_k]`` as declared → S ``[H_v, d_k, d_v]`` float32 (a copy)."""
    H, V, K = page.shape
    s = page.view(H, K, V) if key_major else page.transpose(-1, -2)
    return s.to(torch.float32, copy=True)


def write_conv(page: Tensor, conv: Tensor, *, dim_first: bool) -> None:
    """Write one layer's conv state ``[conv_dim, K-1]`` (oldest input first) into a slot (SD or DS orientation)."""
    page.copy_(conv if dim_first else conv.transpose(0, 1))


@dataclass(frozen=True)
class Header:
    """What vLLM would have cached after computing the window's first token (the header) from S.

    ``ssm[i]``: ``[H_v, d_k, d_v]`` float32 and ``conv[i]``: ``[conv_dim, K-1]`` for the i-th GDN layer;
    ``k[j]``, ``v[j]``: ``[H_kv, D]`` for the j-th attention layer (k after q/k-norm and RoPE at position 0).
    """

    token: int
    ssm: list[Tensor]
    conv: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]


@torch.no_grad()
def compute_header(model: SleepHybrid, state: FastWeights, first_token: int | None = None) -> Header:
    """Run the header through the reference model from ``state`` (batch of one) and collect the per-layer caches.

    The header is the BOS when the checkpoint has one (then ``first_token`` is ignored), else ``first_token``.
    """
    if state.batch_size != 1:
        raise InvalidInput(f"compute_header takes one agent's state, got a batch of {state.batch_size}")
    model.check_state(state, 1)
    bos = model.config.bos_token_id
    cache = model.start_window(state.to(model.device))
    if bos is None:
        if first_token is None:
            raise InvalidInput("this checkpoint has no BOS: the header is the window's first token, pass it")
        model.extend(cache, torch.tensor([[first_token]], device=model.device))
        token = first_token
    else:
        token = bos
    ssm, conv, k, v = [], [], [], []
    for st in cache.layers:
        if st.kv is not None:  # attention: [1, H_kv, 1, D]
            k.append(st.kv[0][0, :, 0].float().cpu())
            v.append(st.kv[1][0, :, 0].float().cpu())
        else:
            assert st.ssm is not None and st.conv is not None  # a GDN layer after one token has both
            ssm.append(st.ssm[0].float().cpu())
            conv.append(st.conv[0].float().cpu())
    return Header(token=token, ssm=ssm, conv=conv, k=k, v=v)


__all__ = ["Header", "compute_header", "read_ssm", "write_conv", "write_ssm"]
