"""Claim: serving agents through vLLM (`VLLMEngine`) is at least as fast as the embedded `TorchEngine` at 8 agents.

Each agent holds a memory (a non-zero S and a window of ``--history`` tokens) and takes one turn: ``--prompt`` new
tokens, ``--new`` greedy reply tokens. Both engines run the turn for 1 and for 8 agents at once (`generate_batch`;
the agents' windows have equal shapes, so `TorchEngine` batches its decode steps too). `VLLMEngine` re-runs the window
in one prefill per turn (the connector restores S, vLLM keeps no per-agent cache between turns); `TorchEngine` keeps
each agent's window K/V between calls, so only the prompt and the reply are computed. Reported: reply tokens/s
(median of ``--repeat`` runs, memories re-imported before each), the vLLM/torch ratio, and how many agents' replies
were identical (bf16 vLLM vs the float32 reference; see docs/serving.md for the tolerance).

Model: a toy serving hybrid (vocab 300, layout gaga, d = ``--d-model`` with d/64 attention heads of 64 and d/128 GDN
heads of 128 — the fast CPU kernel), bf16 on vLLM, float32 on torch. Measured on 2 shared CPU cores; treat numbers
as orders of magnitude.

Usage: python benchmarks/bench_vllm_throughput.py [--agents 1 8] [--history 64] [--prompt 16] [--new 32]
Test: tests/serving/test_engine.py::test_many_agents_in_one_batch (what is timed computes what TorchEngine computes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.model.state import FastWeights
from agentsleep.runtime import AgentMemory, GenerateRequest, SamplingParams, TorchEngine
from agentsleep.serving.settings import apply_env_defaults
from benchmarks._common import banner, setup

VOCAB, BOS = 300, 1


def build(path: Path, window: int, d_model: int) -> SleepHybrid:
    cfg = HybridConfig(vocab_size=VOCAB, d_model=d_model, layout="gaga", attn_heads=d_model // 64,
                       gdn_heads=max(1, d_model // 128), gdn_head_dim=128, window=window, bos_token_id=BOS,
                       init_std=0.2)  # fmt: skip
    model = SleepHybrid(cfg).eval()
    with torch.no_grad():
        for blk in model.layers:
            if blk.kind == "g":
                blk.linear_attn.A_log.fill_(-8.0)  # S matters (spec/vllm-cpu.md §8.7)
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # both engines run the same (bf16-exact) weights
    model.refresh_fingerprint()
    model.save_pretrained(path)
    return model


def memories(model: SleepHybrid, n: int, history: int) -> list[AgentMemory]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ssm = [torch.randn(s.shape, generator=g) * 0.5 for s in model.init_state(1).ssm]
        window = torch.randint(2, VOCAB, (history,), generator=g).tolist()
        out.append(AgentMemory(state=FastWeights(ssm=ssm, fingerprint=model.fingerprint), window=tuple(window)))
    return out


def run(engine: object, mems: list[AgentMemory], prompt: int, new: int, repeat: int) -> tuple[float, list]:
    reqs = [
        GenerateRequest(f"a{i}", torch.randint(2, VOCAB, (prompt,), generator=torch.Generator().manual_seed(100 + i))
                        .tolist(), SamplingParams(max_new_tokens=new))
        for i in range(len(mems))
    ]  # fmt: skip
    times, outs = [], []
    for _ in range(repeat + 1):  # the first run warms up
        for i, m in enumerate(mems):
            engine.import_state(f"a{i}", m)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        outs = engine.generate_batch(reqs)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    return len(mems) * new / statistics.median(times[1:]), [o.tokens for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--history", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    apply_env_defaults()
    setup(threads=1)
    banner("VLLMEngine tokens/s >= TorchEngine tokens/s at 8 agents")
    from agentsleep.serving.engine import VLLMEngine

    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model = build(tmp / "model", args.window, args.d_model)
    t0 = time.perf_counter()
    vllm = VLLMEngine(tmp / "model", state_dir=tmp / "state", max_num_seqs=max(args.agents))
    print(f"# vLLM engine start-up {time.perf_counter() - t0:.1f} s")
    torch_engine = TorchEngine(SleepHybrid.from_pretrained(tmp / "model"))
    rows = []
    print(f"{'agents':>6} {'torch tok/s':>12} {'vllm tok/s':>11} {'vllm/torch':>10} {'same reply':>10}")
    for n in args.agents:
        mems = memories(model, n, args.history)
        t_tps, t_out = run(torch_engine, mems, args.prompt, args.new, args.repeat)
        v_tps, v_out = run(vllm, mems, args.prompt, args.new, args.repeat)
        same = sum(a == b for a, b in zip(t_out, v_out))
        rows.append({"agents": n, "torch_tok_s": t_tps, "vllm_tok_s": v_tps, "ratio": v_tps / t_tps, "same": same})
        print(f"{n:>6} {t_tps:>12.1f} {v_tps:>11.1f} {v_tps / t_tps:>10.2f} {same:>7}/{n}")
    vllm.close()
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
