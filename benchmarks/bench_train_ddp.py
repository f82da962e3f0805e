"""Claim: ``torchrun --nproc_per_node K agentsleep train`` divides a step's work among K processes (DDP, or FSDP2
with ``--fsdp``): training time per step falls towards 1/K of one process's, at the same global batch and the same
weights (tests/train/test_distributed.py pins the weights).

Runs the same training job once in one process and once under ``torchrun`` with K processes (gloo on CPU, NCCL on
GPUs), one thread each, and compares the training wall time the runs record (``resume/trainer_state.json``: optimizer
steps only — no start-up, evaluation or checkpoint writing). Speed-up = one process's time / K processes' time.

Usage: python -m benchmarks.bench_train_ddp [--procs 2] [--steps 20] [--batch 64] [--passes 2] [--fsdp]
Test: tests/train/test_distributed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import banner, setup


def run(out: Path, procs: int, args: argparse.Namespace) -> float:
    job = ["train", "--task", "depo", "--preset", "micro", "--model", "layout=ag", "--passes", str(args.passes),
           "--steps", str(args.steps), "--batch-size", str(args.batch), "--eval-every", "0", "--final-eval-size",
           "16", "--save-every", "0", "--device", args.device, "--no-progress", "--out", str(out)]  # fmt: skip
    if args.fsdp:
        job.append("--fsdp")
    head = [sys.executable, "-m", "agentsleep.cli"]
    if procs > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m",
                "agentsleep.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(head + job, check=True, capture_output=True, text=True, env=env)
    return float(json.loads((out / "resume" / "trainer_state.json").read_text())["wall"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args()
    setup()
    banner(f"{args.procs} processes train a step ~{args.procs}x faster than one (same global batch)")
    print(f"# depo micro, layout ag, N={args.passes}, global batch {args.batch}, {args.steps} steps, "
          f"{'FSDP2' if args.fsdp else 'DDP'}, device {args.device}, {os.cpu_count()} CPUs")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp) / "one", 1, args)
        many = run(Path(tmp) / "many", args.procs, args)
    print("| processes | train wall s | s/step | speed-up |")
    print("|---|---|---|---|")
    print(f"| 1 | {one:.1f} | {one / args.steps:.3f} | 1.00 |")
    print(f"| {args.procs} | {many:.1f} | {many / args.steps:.3f} | {one / many:.2f} |")


if __name__ == "__main__":
    main()
