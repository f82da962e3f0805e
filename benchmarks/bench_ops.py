"""Claim: the chunked gated delta rule is ≥ 3× faster than the per-token reference loop at T ≥ 256 (forward, and
forward+backward), at the toy model's GDN shape (H=2, K=V=64). Tied to tests/model/test_ops.py (same functions)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from agentsleep.model.ops import gated_delta_rule, gated_delta_rule_reference
from benchmarks._common import banner, setup, timeit


def inputs(B: int, T: int, H: int, D: int, grad: bool):
    q = F.normalize(torch.randn(B, T, H, D), dim=-1)
    k = F.normalize(torch.randn(B, T, H, D), dim=-1)
    v = torch.randn(B, T, H, D)
    g = -torch.rand(B, T, H) * 0.1
    beta = torch.rand(B, T, H)
    ts = [q, k, v, g, beta]
    if grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    args = p.parse_args()
    setup()
    banner("chunked / reference speedup ≥ 3× at T ≥ 256")
    print(f"{'T':>6} {'mode':>9} {'chunk ms':>10} {'loop ms':>10} {'speedup':>8}")
    for T in args.lengths:
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            q, k, v, g, beta = inputs(args.batch, T, args.heads, args.dim, grad)

            def run(op, q=q, k=k, v=v, g=g, beta=beta, grad=grad):
                def f():
                    o, s = op(q, k, v, g=g, beta=beta)
                    if grad:
                        (o.sum() + s.sum()).backward()

                return f

            rep = 3 if T >= 4096 else 5
            tc = timeit(run(gated_delta_rule), repeat=rep)
            tr = timeit(run(gated_delta_rule_reference), repeat=rep)
            print(f"{T:>6} {mode:>9} {tc * 1e3:>10.2f} {tr * 1e3:>10.2f} {tr / tc:>7.1f}×")


if __name__ == "__main__":
    main()
