"""Claim: without activation checkpointing the peak memory of a training step grows linearly in the number of sleep
passes N (every pass's activations are kept for backward); with checkpointing per (window, pass) it grows only by the
tensors that cross a (window, pass) boundary — features [B, L, d], each memory layer's S [B, H, K, V] and the pass's
K/V — while one pass's activations are recomputed at a time (paper §6, "activation checkpointing along the chunk
axis"). At real scale (L in the thousands) those boundary tensors are a small fraction of a pass's activations.

One optimizer step of `agentsleep.train` (Algorithm 1 loss, backward, Muon + AdamW) on Rule 110 batches, for each N,
with and without checkpointing. Peak memory of the step:

* CPU: each setting runs in a fresh process (glibc told to map large blocks separately, so that RSS follows live
  memory rather than heap fragmentation); after one warm-up step (optimizer state exists), freed heap is returned
  to the OS (``malloc_trim``) and the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``); the step's peak =
  the peak RSS during the next step (``VmHWM``) minus the RSS just before it.
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the step, minus the allocation before it.

Ratios to N = 1 are what to read; absolute numbers depend on the allocator.

``--compile`` compiles every block first (`agentsleep train --compile`; on CPU it needs a C compiler and the warm-up
step pays the compilation), to check that compiled blocks keep the flat profile.

Usage: python -m benchmarks.bench_train_memory [--passes 1 2 4 8] [--batch 64] [--width 16] [--device cpu] [--compile]
Test: tests/model/test_hybrid.py::test_activation_checkpointing_gives_the_same_loss_and_grads (same numbers).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

import torch

from agentsleep.train.optim import Optimizers
from agentsleep.train.trainer import TrainConfig, batch_loss, build_model, compile_blocks, make_task, step_seed
from benchmarks._common import banner, setup

# glibc keeps freed heap inside the process, so its RSS would also count fragmentation (measured: half of the growth
# with N under checkpointing); with blocks ≥ 64 KiB mapped and unmapped on their own, RSS follows live memory.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: peak resident since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Give freed heap back to the OS, then reset the peak RSS to the current RSS (Linux ≥ 4.0: clear_refs 5)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one_step_peak(cfg: TrainConfig, device: str) -> dict[str, float]:
    """Peak memory of one training step beyond what was allocated before it, in MiB."""
    task = make_task(cfg)
    model = build_model(cfg, task).to(device)
    if cfg.compile:
        compile_blocks(model)
    opts = Optimizers(model, name=cfg.optimizer)

    def step(i: int) -> None:
        batch = task.generate("train", cfg.batch_size, step_seed(0, i))
        loss, _ = batch_loss(model, batch, cfg.passes, cfg)
        opts.zero_grad()
        loss.backward()
        opts.step()

    step(0)  # warm-up: optimizer state, allocator caches
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(1)
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}
    reset_peak_rss()
    before = status_kib("VmRSS")
    step(1)
    return {"peak_mb": (status_kib("VmHWM") - before) / 1024}


def config(args: argparse.Namespace, n: int, ckpt: bool) -> TrainConfig:
    return TrainConfig(
        task_overrides={"W": args.width, "t": 2}, model={"layout": args.layout}, passes=n, batch_size=args.batch,
        activation_checkpointing=ckpt, device=args.device, compile=args.compile,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layout", default="agag")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=16, help="Rule 110 W = L")
    p.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--child", nargs=2, metavar=("N", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    setup()
    if args.child:  # one measurement in this fresh process
        n, ckpt = int(args.child[0]), args.child[1] == "1"
        print(json.dumps(one_step_peak(config(args, n, ckpt), args.device)))
        return
    banner("step peak memory: ~linear in N without checkpointing; with it only the (window, pass) boundary grows")
    print(f"# rule110 W=L={args.width}, 4 states, layout {args.layout}, d=64, batch {args.batch}, device {args.device}"
          f"{', compiled blocks' if args.compile else ''}")  # fmt: skip
    print("| N | checkpointing | step peak MiB | vs N=1 |")
    print("|---|---|---|---|")
    for ckpt in (False, True):
        base = None
        for n in args.passes:
            if args.device.startswith("cuda"):
                r = one_step_peak(config(args, n, ckpt), args.device)
            else:
                cmd = [sys.executable, "-m", "benchmarks.bench_train_memory", "--layout", args.layout, "--batch",
                       str(args.batch), "--width", str(args.width), "--device", args.device, "--child", str(n),
                       str(int(ckpt))] + (["--compile"] if args.compile else [])  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **MALLOC})
                r = json.loads(out.stdout.splitlines()[-1])
            base = base or r["peak_mb"]
            print(f"| {n} | {'yes' if ckpt else 'no'} | {r['peak_mb']:.1f} | {r['peak_mb'] / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
