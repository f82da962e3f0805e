"""Muon: momentum whose update is orthogonalised by a Newton–Schulz iteration (for 2-D weight matrices only).

Algorithm (K. Jordan et al., https://kellerjordan.github.io/posts/muon/; written from the description, not copied):

    B_t = μ B_{t−1} + G_t                       momentum buffer
    U_t = G_t + μ B_t   (Nesterov)   or  B_t
    O_t = NS(U_t) ≈ U Vᵀ  where U_t = U Σ Vᵀ      "zeroth power": every singular value pushed towards 1
    W_t = W_{t−1} − lr · scale(W) · O_t

The paper trains every model with Muon for the matrices plus AdamW for the rest (paper.md §6). Embeddings, the output
head, norms and gate vectors are *not* Muon parameters (their rows are looked up or read out one at a time, so
orthogonalising them makes no sense); see `agentsleep.train.optim`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from agentsleep.train.distributed import full, is_sharded, like

# Quintic coefficients that maximise the slope at zero (Jordan et al.): after 5 steps every singular value of a
# normalised matrix lies in roughly [0.7, 1.2] instead of exactly 1, which is what the update needs and costs 5 matmuls.
QUINTIC = (3.4445, -4.7750, 2.0315)
# Classic cubic Newton–Schulz (a, b, c) = (1.5, −0.5, 0): converges to exactly U Vᵀ, slowly. Used by tests.
CUBIC = (1.5, -0.5, 0.0)

Scale = Literal["rms", "shape"]


def newton_schulz(G: Tensor, steps: int = 5, coeffs: tuple[float, float, float] = QUINTIC, eps: float = 1e-7) -> Tensor:
    """Approximate the orthogonal polar factor U Vᵀ of G = U Σ Vᵀ by the odd polynomial iteration
    X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X, starting from G / ‖G‖_F (so every singular value starts in (0, 1]).

    Args:
        G: ``[m, n]`` (or a batch ``[..., m, n]``).
        steps: iterations; coeffs: (a, b, c).

    Returns:
        ``[m, n]`` in G's dtype, with singular values ≈ 1 (exactly 1 in the limit for `CUBIC`).
    """
    a, b, c = coeffs
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide side: X Xᵀ is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def orthogonalise(u: Tensor, steps: int) -> Tensor:
    """`newton_schulz` of the whole matrix ``u``. A sharded ``u`` (FSDP2: a DTensor holding rows of the matrix on each
    rank) is gathered first and every rank keeps its own rows of the result: orthogonalising the shards separately
    would give a different update (the polar factor of a matrix is not the stack of its row blocks' polar factors).
    Under DDP ``u`` is already whole on every rank (the averaged gradient), so every rank computes the same update."""
    if not is_sharded(u):
        return newton_schulz(u, steps)
    return like(newton_schulz(full(u), steps), u)


def update_scale(shape: torch.Size, mode: Scale) -> float:
    """Per-matrix multiplier of the orthogonalised update.

    ``rms``: 0.2·√max(m, n), which gives the update the RMS of a typical AdamW step (≈ 0.2), so a learning rate tuned
    for AdamW transfers (Liu et al. 2025, "Muon is scalable for LLM training", Moonlight). ``shape``: √max(1, m/n)
    (Jordan's original scaling; wants learning rates around 0.02).
    """
    m, n = shape[-2], shape[-1]
    return 0.2 * math.sqrt(max(m, n)) if mode == "rms" else math.sqrt(max(1.0, m / n))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Decoupled weight decay as in AdamW.

    Args:
        params: 2-D tensors (or param groups of them).
        lr: learning rate. momentum: μ. nesterov: use the Nesterov form of the update.
        ns_steps: Newton–Schulz iterations. weight_decay: decoupled decay (W ← W − lr·wd·W).
        scale: how the orthogonal update is scaled per matrix (`update_scale`).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 2e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        scale: Scale = "rms",
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"invalid Muon settings: lr={lr}, momentum={momentum}, ns_steps={ns_steps}")
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay, scale=scale
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                u = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                o = orthogonalise(u, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"] * update_scale(p.shape, group["scale"]))
        return loss
