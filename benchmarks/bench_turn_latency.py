"""Claim: with background sleep, an agent's turn latency does not grow with its history.

One agent talks for 2,000 turns (46 input + 5 reply tokens each: history ≥ 100k tokens) on a toy hybrid (d=64, layout
agag, L=256, N=4, GDN head 64) through `AgentHost` with a SQLite snapshot store. Turn latency p50/p95 is taken over the
first and the last 200 turns. Goal: p95(end) / p95(start) ≤ 1.2. Compared with

* in-turn: the same agent with the policy's sleep forced onto the response path (`AgentHost(background=False)`);
* full attention: a model of the same width and depth with only attention blocks (layout aaaa) and a window as large
  as the whole history, keeping its whole KV cache, driven by the same `TorchEngine`. Its first 200 turns are real; for
  the end, a cache of the same length as the agent's final history is filled with random keys/values (attention cost
  depends only on shapes; computing 100k tokens of full attention honestly takes far longer than this benchmark's
  budget), then `--full-end-turns` real turns are timed on top of it.

Between turns the agent pauses for up to ``--think-ms`` (a user typing, a tool running): that is when background sleeps
run. To keep the benchmark short the pause ends early once no sleep is pending or running (latency-wise the same as a
longer pause); a sleep slower than the pause overlaps the next turn, as it would in real use. Everything runs
single-threaded (``--threads``), as measured on the 2 shared cores (DESIGN.md: CPU practicalities).

Usage: python benchmarks/bench_turn_latency.py [--turns 2000] [--think-ms 200] [--json out.json]
Test: tests/runtime/test_equivalence.py (what is timed computes the same thing as the model run directly).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.model.layers import LayerState
from agentsleep.runtime import SamplingParams, TorchEngine
from agentsleep.store import SnapshotStore

VOCAB, BOS = 256, 1


def config(layout: str, window: int, passes: int) -> HybridConfig:
    return HybridConfig(
        vocab_size=VOCAB, d_model=64, layout=layout, window=window, gdn_head_dim=64, bos_token_id=BOS, passes=passes
    )


def turn_input(t: int, n: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(t)).tolist()


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def summary(lat: list[float], window: int, end_window: int | None = None) -> dict[str, float]:
    start, end = lat[:window], lat[-(end_window or window) :]
    return {
        "p50_start_ms": pct(start, 50) * 1e3,
        "p95_start_ms": pct(start, 95) * 1e3,
        "p50_end_ms": pct(end, 50) * 1e3,
        "p95_end_ms": pct(end, 95) * 1e3,
        "p95_end_over_start": pct(end, 95) / pct(start, 95),
        "p50_all_ms": pct(lat, 50) * 1e3,
        "p95_all_ms": pct(lat, 95) * 1e3,
    }


def run_hybrid(args: argparse.Namespace, *, background: bool, db: Path) -> dict[str, object]:
    torch.manual_seed(0)
    engine = TorchEngine(SleepHybrid(config("agag", args.window, args.passes)))
    policy = SleepPolicy(window=args.window, passes=args.passes, soft_threshold=0.75, debounce_seconds=0.0)
    store = SnapshotStore(f"sqlite:///{db}")
    lat, sync = [], 0
    with AgentHost(engine, store, policy, background=background) as host:
        host.create("agent")
        for t in range(args.turns):
            ids = turn_input(t, args.input)
            t0 = time.perf_counter()
            res = host.turn("agent", ids, max_new_tokens=args.reply)
            lat.append(time.perf_counter() - t0)
            sync += res.sync_sleeps
            if background and args.think_ms:
                host.scheduler.wait_idle(args.think_ms / 1e3)
        host.flush()
        session = host.session("agent")
        stats = host.scheduler.stats()
    store.close()
    return {
        **summary(lat, args.measure),
        "history_tokens": session.tokens_seen,
        "sleeps": session.sleep_count,
        "sleeps_on_response_path": sync,
        "sleep_ms_mean": stats.run_seconds_total / max(stats.completed, 1) * 1e3,
    }


def install_history(engine: TorchEngine, agent_id: str, n_tokens: int) -> None:
    """Give a full-attention agent a KV cache of ``n_tokens`` random keys/values (shapes exactly as if it had read
    them; the latency of attention and of growing the cache depends only on shapes)."""
    live = engine._agents[agent_id]  # benchmark-only reach into the engine: there is no public way to fake history
    cache = live.cache
    g = torch.Generator().manual_seed(1)
    for i, st in enumerate(cache.layers):
        assert st.kv is not None
        k = st.kv[0]
        shape = (1, k.shape[1], n_tokens, k.shape[3])
        cache.layers[i] = LayerState(kv=(torch.randn(shape, generator=g), torch.randn(shape, generator=g)))
    cache.h = torch.randn(1, n_tokens, cache.h.shape[2], generator=g)
    cache.ids = torch.randint(2, VOCAB, (1, n_tokens), generator=g)
    cache.key_valid = torch.ones(1, n_tokens, dtype=torch.bool)
    cache.n_fresh = n_tokens
    live.window = cache.ids[0].tolist()
    live.pending = []


def run_full_attention(args: argparse.Namespace, history: int) -> dict[str, object]:
    torch.manual_seed(0)
    window = history + (args.full_end_turns + 1) * (args.input + args.reply) + 8
    engine = TorchEngine(SleepHybrid(config("aaaa", window, 1)))
    sp = SamplingParams(max_new_tokens=args.reply)
    engine.create_agent("agent")
    start = []
    for t in range(args.measure):
        t0 = time.perf_counter()
        engine.generate("agent", turn_input(t, args.input), sp)
        start.append(time.perf_counter() - t0)
    install_history(engine, "agent", history)
    end = []
    for t in range(args.full_end_turns):
        t0 = time.perf_counter()
        engine.generate("agent", turn_input(args.turns - args.full_end_turns + t, args.input), sp)
        end.append(time.perf_counter() - t0)
    return {**summary(start + end, args.measure, args.full_end_turns), "history_tokens": history}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=2000)
    p.add_argument("--input", type=int, default=46, help="input tokens per turn")
    p.add_argument("--reply", type=int, default=5, help="reply tokens per turn")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--think-ms", type=float, default=200.0, help="max pause between turns (background sleeps run)")
    p.add_argument("--measure", type=int, default=200, help="turns in the start and end windows")
    p.add_argument("--full-end-turns", type=int, default=20, help="timed full-attention turns at the full history")
    p.add_argument("--skip-full", action="store_true", help="skip the full-attention baseline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # DESIGN.md: decaying fast weights fill with denormals otherwise (~6x slower)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))

    results: dict[str, object] = {"args": vars(args) | {"json": str(args.json)}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bg = run_hybrid(args, background=True, db=Path(tmp) / "bg.db")
        results["background"] = bg | {"wall_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        fg = run_hybrid(args, background=False, db=Path(tmp) / "fg.db")
        results["in_turn"] = fg | {"wall_s": time.perf_counter() - t0}
    if not args.skip_full:
        t0 = time.perf_counter()
        results["full_attention"] = run_full_attention(args, int(bg["history_tokens"]))  # type: ignore[call-overload]
        results["full_attention"]["wall_s"] = time.perf_counter() - t0  # type: ignore[index]

    for name in ("background", "in_turn", "full_attention"):
        r = results.get(name)
        if r is None:
            continue
        print(
            f"{name:>15}: p50 {r['p50_start_ms']:7.1f} -> {r['p50_end_ms']:7.1f} ms, "  # type: ignore[index]
            f"p95 {r['p95_start_ms']:7.1f} -> {r['p95_end_ms']:7.1f} ms, "  # type: ignore[index]
            f"p95 end/start {r['p95_end_over_start']:.2f}, history {r['history_tokens']} tokens"  # type: ignore[index]
        )
    print(
        f"{'':>15}  sleeps: background {bg['sleeps']} ({bg['sleeps_on_response_path']} on the response path), "
        f"in-turn {fg['sleeps']} ({fg['sleeps_on_response_path']} on the response path), "
        f"mean sleep {bg['sleep_ms_mean']:.1f} ms"
    )
    ratios = {
        "background p95 end/start": bg["p95_end_over_start"],
        "in-turn p95 end / background p95 end": fg["p95_end_ms"] / bg["p95_end_ms"],  # type: ignore[operator]
    }
    if "full_attention" in results:
        fa = results["full_attention"]
        ratios["full-attention p95 end/start"] = fa["p95_end_over_start"]  # type: ignore[index]
        ratios["full-attention p95 end / background p95 end"] = fa["p95_end_ms"] / bg["p95_end_ms"]  # type: ignore
    results["ratios"] = ratios
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    goal = bg["p95_end_over_start"] <= 1.2  # type: ignore[operator]
    print(f"goal p95(end)/p95(start) <= 1.2 for agentsleep: {'met' if goal else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
