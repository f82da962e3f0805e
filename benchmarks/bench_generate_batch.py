"""Claim: `TorchEngine.generate_batch` pays when many agents decode with windows of the same shape, and costs nothing
otherwise.

B agents (toy hybrid: d=64, layout agag, L=256, GDN head 64) each hold a window of the same length; each generates
``--new`` greedy tokens, once with `generate` per agent and once with one `generate_batch`. Reported: decode tokens/s
both ways and the speedup, for agents whose windows share a shape ("aligned") and for agents whose windows all differ
("ragged": every agent steps alone, so batching can only cost its bookkeeping). The tokens must be identical.

Usage: python benchmarks/bench_generate_batch.py [--agents 1 4 16 32] [--new 32]
Test: tests/runtime/test_engine.py::test_generate_batch_equals_generate_one_by_one
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.runtime import AgentMemory, GenerateRequest, SamplingParams, TorchEngine


def setup(engine: TorchEngine, n: int, ragged: bool) -> list[AgentMemory]:
    mems = []
    for i in range(n):
        engine.create_agent(f"a{i}")
        length = 64 + (i if ragged else 0)
        engine.observe(f"a{i}", torch.randint(2, 256, (length,), generator=torch.Generator().manual_seed(i)).tolist())
        mems.append(engine.export_state(f"a{i}"))
    return mems


def run(engine: TorchEngine, mems: list[AgentMemory], new: int, batched: bool) -> tuple[float, list[tuple[int, ...]]]:
    for i, m in enumerate(mems):
        engine.import_state(f"a{i}", m)
    sp = SamplingParams(max_new_tokens=new)
    prompt = [5]
    t0 = time.perf_counter()
    if batched:
        outs = engine.generate_batch([GenerateRequest(f"a{i}", prompt, sp) for i in range(len(mems))])
    else:
        outs = [engine.generate(f"a{i}", prompt, sp) for i in range(len(mems))]
    return time.perf_counter() - t0, [o.tokens for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=256, d_model=64, layout="agag", window=256, gdn_head_dim=64, bos_token_id=1)
    model = SleepHybrid(cfg)
    for ragged in (False, True):
        for n in args.agents:
            engine = TorchEngine(model)
            mems = setup(engine, n, ragged)
            seq = min(run(engine, mems, args.new, False)[0] for _ in range(args.repeats))
            bat = min(run(engine, mems, args.new, True)[0] for _ in range(args.repeats))
            same = run(engine, mems, args.new, False)[1] == run(engine, mems, args.new, True)[1]
            tokens = n * args.new
            print(
                f"{'ragged' if ragged else 'aligned':>7} agents={n:3d}: one by one {tokens / seq:7.0f} tok/s, "
                f"batched {tokens / bat:7.0f} tok/s, speedup {seq / bat:5.2f}x, identical tokens: {same}"
            )


if __name__ == "__main__":
    main()
