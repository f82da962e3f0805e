"""Shared benchmark helpers: a fixed CPU setup, robust timing, and printing the command that ran."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch


def setup(threads: int = 1) -> None:
    # Denormals made a 4-pass chunk ~6× slower (DESIGN.md, CPU practicalities); one thread avoids 10–30× spikes.
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def command() -> str:
    """How this process was started, as a user would type it."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return " ".join(head + sys.argv[1:])


def banner(claim: str) -> None:
    print(f"# command: {command()}")
    print(f"# claim:   {claim}")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}")


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (median: the machine is shared and noisy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]
