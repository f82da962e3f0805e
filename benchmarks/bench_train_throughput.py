"""Claim: training throughput falls about as 1/N with the number of sleep passes (paper §6.5), and activation
checkpointing per (window, pass) keeps activation memory flat as N grows, for ~1.3x the compute.

One optimizer step of `agentsleep.train` (Algorithm 1 loss, backward, Muon + AdamW) on Rule 110 batches, for
N ∈ {1, 2, 4}, with and without activation checkpointing. Reported per setting: step time (median of CPU process time
and of wall time), training tokens/s (sequence tokens, the unit of "equal training tokens"), the ratio to N = 1, and
the activation memory = bytes of tensors autograd saves for backward during the forward pass (measured with
saved-tensor hooks; on CPU this is the part of peak memory that grows with N).

Usage: python -m benchmarks.bench_train_throughput [--layout agag] [--batch 32] [--width 16] [--passes 1 2 4]
Test: tests/train/test_trainer.py (the loop this times); the N-trend itself: evals/results/.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agentsleep.train.optim import Optimizers
from agentsleep.train.trainer import TrainConfig, batch_loss, build_model, make_task, step_seed
from benchmarks._common import banner, setup


def saved_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    """Bytes of every tensor autograd saves for backward while ``fn`` runs (activation memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def bench(cfg: TrainConfig, repeat: int) -> dict[str, float]:
    task = make_task(cfg)
    model = build_model(cfg, task)
    opts = Optimizers(model, name=cfg.optimizer)
    cpu, wall = [], []
    tokens = 0
    for i in range(repeat + 1):
        batch = task.generate("train", cfg.batch_size, step_seed(0, i))
        c0, w0 = time.process_time(), time.perf_counter()
        loss, _ = batch_loss(model, batch, cfg.passes, cfg)
        opts.zero_grad()
        loss.backward()
        opts.step()
        if i:  # the first step warms allocator and caches
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            tokens = int(batch.lengths.sum())
    batch = task.generate("train", cfg.batch_size, 0)
    act = saved_bytes(lambda: batch_loss(model, batch, cfg.passes, cfg))
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall), "tokens": tokens, "act_mb": act / 2**20}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layout", default="agag")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=16, help="Rule 110 W = L")
    p.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    setup()
    banner("training tokens/s ≈ 1/N; activation checkpointing keeps activation memory flat in N")
    print(f"# rule110 W=L={args.width}, 4 states, layout {args.layout}, d=64, batch {args.batch}, Muon + AdamW")
    print("| N | checkpointing | CPU s/step | wall s/step | tokens/s (CPU) | vs N=1 | 1/N | activation MB |")
    print("|---|---|---|---|---|---|---|---|")
    base: dict[bool, float] = {}
    for ckpt in (False, True):
        for n in args.passes:
            cfg = TrainConfig(
                task_overrides={"W": args.width, "t": 2}, model={"layout": args.layout}, passes=n,
                batch_size=args.batch, activation_checkpointing=ckpt,
            )  # fmt: skip
            r = bench(cfg, args.repeat)
            tps = r["tokens"] / r["cpu"]
            base.setdefault(ckpt, tps)
            print(f"| {n} | {'yes' if ckpt else 'no'} | {r['cpu']:.3f} | {r['wall']:.3f} | {tps:,.0f} | "
                  f"{tps / base[ckpt]:.2f} | {1 / n:.2f} | {r['act_mb']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
