"""The Jet memory layer (layout letter ``'j'``): Gated DeltaNet whose short convolution is *dynamic*.

Jet-Nemotron (Gu et al. 2025, arXiv 2508.15884; paper.md §2.2 and §2.5) replaces the GDN's fixed depthwise short
convolution by one whose kernel is generated from the current token: per token t and value channel c,

    kernel[t, c, :] = W2 · SiLU(W1 · x_t) + b2              W1: [d/r, d]  W2: [C·W, d/r]  b2: [C·W]
    v'[t, c]        = Σ_w kernel[t, c, w] · v[t − W + 1 + w, c]      (w = W − 1 is the current token)

with x_t the block's normalised input, r the generator reduction (8 in Jet-Nemotron-2B) and W the conv width. As in
Jet-Nemotron's JetBlock, only the values are convolved; q and k lose their static convolution and pass through SiLU.
The bias b2 is the static part of the kernel ("static_conv_init"); the generated part varies per token.

Everything else is the GDN of `agentsleep.model.layers.GatedDeltaNet` (same projections, gates, gated norm and
parameter names), so S has the same shape and meaning and the layer drops into every code path that takes a memory
layer. The convolution restarts from zeros at every window and pass, like the static one (paper.md A3); during
decoding its buffer holds the last W − 1 value inputs of the window.

Two deliberate differences from Jet-Nemotron, both for training from scratch (its layers start from a pretrained
checkpoint): W1 is drawn like every other projection instead of zero (with W1 = 0 and W2 = 0 both gradients are zero
forever: the generator could never learn), and b2 is drawn like PyTorch's default depthwise ``nn.Conv1d`` kernel
(U[±1/√W], what the static conv of a ``'g'`` layer starts from) so that a fresh Jet layer starts as a GDN whose value
conv has the usual scale, plus a small token-dependent part.

Functions (op and its naive reference, same signature): `dynamic_short_conv`, `dynamic_short_conv_reference`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agentsleep.errors import InvalidInput
from agentsleep.model.layers import GatedDeltaNet, _up, building_on_meta, l2_normalize

if TYPE_CHECKING:
    from agentsleep.model.hybrid import HybridConfig


def _check_conv(x: Tensor, kernels: Tensor, conv_state: Tensor | None) -> int:
    if x.dim() != 3 or kernels.dim() != 4 or kernels.shape[:3] != x.shape:
        raise InvalidInput(
            f"x must be [B, T, C] and kernels [B, T, C, W]; got {tuple(x.shape)} and {tuple(kernels.shape)}"
        )
    W = kernels.shape[-1]
    B, _, C = x.shape
    if conv_state is not None and conv_state.shape != (B, C, W - 1):
        raise InvalidInput(f"conv_state must be [B, C, W-1] = [{B}, {C}, {W - 1}]; got {tuple(conv_state.shape)}")
    return W


def dynamic_short_conv_reference(x: Tensor, kernels: Tensor, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token loop: the definition of the causal dynamic convolution.

    Args:
        x: ``[B, T, C]`` inputs. kernels: ``[B, T, C, W]``, one kernel per token and channel; tap ``W − 1`` multiplies
            the current token, tap 0 the token ``W − 1`` positions back.
        conv_state: ``[B, C, W − 1]`` the inputs of the ``W − 1`` tokens before ``x`` (oldest first); None = zeros.

    Returns:
        y: ``[B, T, C]``; new conv_state ``[B, C, W − 1]`` (the last W − 1 inputs, history included).
    """
    W = _check_conv(x, kernels, conv_state)
    B, T, C = x.shape
    hist = x.new_zeros(B, C, W - 1) if conv_state is None else conv_state.to(x.dtype)
    buf = torch.cat([hist, x.transpose(1, 2)], dim=-1)  # [B, C, W-1+T]
    ys = [(buf[:, :, t : t + W] * kernels[:, t]).sum(-1) for t in range(T)]  # each [B, C]
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, C)
    return y, buf[..., buf.shape[-1] - (W - 1) :]


def dynamic_short_conv(x: Tensor, kernels: Tensor, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal dynamic depthwise convolution, vectorised over tokens: W shifted multiply-adds instead of a loop over T.

    Same arguments, results and conventions as `dynamic_short_conv_reference`.
    """
    W = _check_conv(x, kernels, conv_state)
    B, T, C = x.shape
    hist = x.new_zeros(B, W - 1, C) if conv_state is None else conv_state.to(x.dtype).transpose(1, 2)
    buf = torch.cat([hist, x], dim=1)  # [B, W-1+T, C]
    y = buf[:, W - 1 :] * kernels[..., W - 1]  # tap W-1: the current token
    for w in range(W - 1):  # tap w looks W-1-w tokens back
        y = y + buf[:, w : w + T] * kernels[..., w]
    return y, buf[:, buf.shape[1] - (W - 1) :].transpose(1, 2)


class DynamicShortConv(nn.Module):
    """Kernel generator (``kernel_generator.{w1, act, w2}``, Jet-Nemotron's names) + the causal dynamic conv."""

    def __init__(self, d_model: int, channels: int, width: int, reduction: int) -> None:
        super().__init__()
        self.channels, self.width = channels, width
        hidden = max(1, channels // reduction)
        self.kernel_generator = nn.Sequential(
            OrderedDict(
                w1=nn.Linear(d_model, hidden, bias=False),
                act=nn.SiLU(),
                w2=nn.Linear(hidden, channels * width, bias=True),
            )
        )
        if not building_on_meta():
            bound = 1.0 / math.sqrt(width)  # nn.Conv1d's default for a depthwise kernel (fan_in = width)
            with torch.no_grad():
                self.kernel_generator.w2.bias.uniform_(-bound, bound)

    def kernels(self, x: Tensor) -> Tensor:
        """x ``[B, T, d]`` (the block's normalised input) -> kernels ``[B, T, C, W]``."""
        B, T, _ = x.shape
        return self.kernel_generator(x).view(B, T, self.channels, self.width)


class JetGatedDeltaNet(GatedDeltaNet):
    """GDN with Jet-Nemotron's dynamic value convolution (module docstring). Parameter names are the GDN's
    (``in_proj_qkvz``/``in_proj_ba`` or the split form, ``A_log``, ``dt_bias``, ``norm``, ``out_proj``) plus
    ``dynamic_conv1d.kernel_generator.{w1,w2}``; there is no static ``conv1d``."""

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__(cfg)
        self.conv1d = None  # type: ignore[assignment]  # q, k: no conv; v: the dynamic one below
        self.dynamic_conv1d = DynamicShortConv(cfg.d_model, self.value_dim, cfg.conv_size, cfg.jet_generator_reduction)

    def forward(
        self, x: Tensor, state: Tensor, valid: Tensor | None = None, conv_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            x: [B, T, d]. state: S entering this call, [B, H_v, d_k, d_v] float32.
            valid: [B, T] bool, False at padding (α = 1, β = 0, zero conv input: pads are inert).
            conv_state: the last conv_size−1 *value* inputs [B, H_v·d_v, conv_size−1] of the same window and pass
                (decoding); None = window start (zeros).

        Returns:
            out [B, T, d]; new state [B, H_v, d_k, d_v]; new conv_state [B, H_v·d_v, conv_size−1].
        """
        B, T, _ = x.shape
        q, k, v, z, b, a = self.split_projections(x)
        v = v.reshape(B, T, self.value_dim)  # [B, T, C]
        if valid is not None:
            v = v * valid[..., None].to(v.dtype)
        kernels = self.dynamic_conv1d.kernels(x)  # [B, T, C, W]
        v, new_conv = dynamic_short_conv(v, kernels.to(v.dtype), conv_state)
        v = F.silu(v).reshape(B, T, self.h_v, self.d_v)
        q = l2_normalize(F.silu(_up(q)), self.l2norm_eps) * self.d_k**-0.5  # [B, T, H_k, d_k]
        k = l2_normalize(F.silu(_up(k)), self.l2norm_eps)
        out, state = self._recur(x, q, k, v, z, b, a, state, valid)
        return out, state, new_conv
