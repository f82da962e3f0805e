"""Muon: the Newton–Schulz iteration orthogonalises, and the optimizer only takes matrices."""

from __future__ import annotations

import pytest
import torch

from agentsleep.train.muon import CUBIC, Muon, newton_schulz, update_scale


@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (256, 64), (37, 11)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_newton_schulz_pushes_singular_values_to_one(shape: tuple[int, int]) -> None:
    m, n = shape
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n)))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n)))
    G = U @ torch.diag(torch.logspace(-1.5, 1, min(m, n))) @ V.T  # condition number ~300
    sv = torch.linalg.svdvals(newton_schulz(G, steps=5))
    assert sv.min() > 0.55 and sv.max() < 1.25, sv  # the tuned quintic stops in roughly [0.7, 1.2]
    # The classic cubic converges to the exact polar factor U Vᵀ.
    exact = newton_schulz(G.double(), steps=60, coeffs=CUBIC)
    torch.testing.assert_close(torch.linalg.svdvals(exact), torch.ones(min(shape), dtype=torch.float64), atol=1e-3,
                               rtol=0)  # fmt: skip
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    torch.testing.assert_close(exact, U @ Vh, atol=1e-3, rtol=0)


def test_muon_step_is_scaled_orthogonal_update() -> None:
    p = torch.nn.Parameter(torch.randn(32, 16))
    p.grad = torch.randn(32, 16)
    before = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, scale="shape")
    opt.step()
    step = (before - p.detach()) / (0.1 * update_scale(p.shape, "shape"))
    sv = torch.linalg.svdvals(step)
    assert sv.min() > 0.55 and sv.max() < 1.25


def test_muon_rejects_vectors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
