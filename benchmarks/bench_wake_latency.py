"""Claims (issue 2):
1. Wake latency does not grow with history: per-token decode latency of `SleepHybrid` after 1k, 4k, 16k and 64k tokens
   of history (consumed window by window, sleeping after each) stays flat — goal: hybrid at 64k ÷ at 1k ≤ 1.10 — while a
   full-attention model of the same width and depth that keeps its whole cache slows down.
2. Sleep costs N passes: time to sleep a full window with N passes ÷ (N × one window prefill) ≤ 1.15.

Both models are toys built here (no download). Ratios are measured in one run on a shared machine: read them, not the
absolute milliseconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from agentsleep.model.hybrid import HybridConfig, SleepHybrid, WindowCache
from benchmarks._common import banner, percentile, setup, timeit


def build(layout: str, window: int, d: int) -> SleepHybrid:
    cfg = HybridConfig(vocab_size=256, d_model=d, layout=layout, window=window, bos_token_id=255, gdn_head_dim=64)
    return SleepHybrid(cfg).eval()


@torch.no_grad()
def time_decode(model: SleepHybrid, cache: WindowCache, tok: torch.Tensor, steps: int) -> list[float]:
    """Seconds per token of ``steps`` greedy single-token decode steps on ``cache``, starting from ``tok`` [1, 1]."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model.extend(cache, tok)
        times.append(time.perf_counter() - t0)
        tok = logits[:, -1:].argmax(-1)
    return times


@torch.no_grad()
def hybrid_after_history(model: SleepHybrid, history: int, decode: int) -> list[float]:
    """Consume ``history`` tokens window by window (sleep N=1 after each), then time ``decode`` single-token steps."""
    L = model.config.window
    state = model.init_state(1)
    gen = torch.Generator().manual_seed(history)
    for _ in range(history // L):
        state = model.sleep(torch.randint(0, 250, (1, L), generator=gen), state, 1)
    cache = model.start_window(state)
    return time_decode(model, cache, torch.randint(0, 250, (1, 1), generator=gen), decode)


@torch.no_grad()
def full_attention_after_history(model: SleepHybrid, history: int, decode: int, block: int = 512) -> list[float]:
    """The same, for a full-attention model whose window holds the whole history (its KV cache keeps every token)."""
    cache = model.start_window(model.init_state(1))
    gen = torch.Generator().manual_seed(history)
    for _ in range(history // block):
        model.extend(cache, torch.randint(0, 250, (1, block), generator=gen))
    return time_decode(model, cache, torch.randint(0, 250, (1, 1), generator=gen), decode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--window", type=int, default=256, help="hybrid window L")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--decode", type=int, default=64, help="decode steps timed per history length")
    p.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--skip-full-attention", action="store_true", help="skip the slow full-attention baseline")
    args = p.parse_args()
    setup()
    banner("hybrid wake latency @64k ÷ @1k ≤ 1.10; sleep(N) ÷ (N × prefill) ≤ 1.15")

    hybrid = build("agag", args.window, args.d_model)
    full = build("aaaa", max(args.histories) + args.decode + 1, args.d_model)
    print(f"\n## wake latency per token (median / p95 ms over {args.decode} steps), d={args.d_model}, 4 blocks")
    print(f"{'history':>8} {'hybrid p50':>11} {'hybrid p95':>11} {'full p50':>9} {'full p95':>9} {'full/hybrid':>12}")
    base = None
    rows = []
    for hist in args.histories:
        h = hybrid_after_history(hybrid, hist, args.decode)
        hp50, hp95 = percentile(h, 50), percentile(h, 95)
        if args.skip_full_attention:
            fp50 = fp95 = float("nan")
        else:
            f = full_attention_after_history(full, hist, args.decode)
            fp50, fp95 = percentile(f, 50), percentile(f, 95)
        base = base or hp50
        rows.append((hist, hp50))
        print(
            f"{hist:>8} {hp50 * 1e3:>11.3f} {hp95 * 1e3:>11.3f} {fp50 * 1e3:>9.3f} {fp95 * 1e3:>9.3f}"
            f" {fp50 / hp50:>11.1f}×"
        )
    ratio = rows[-1][1] / rows[0][1]
    print(f"hybrid p50 at {rows[-1][0]} ÷ at {rows[0][0]}: {ratio:.3f}  (goal ≤ 1.10)")

    print(f"\n## sleep cost, window L={args.window}")
    x = torch.randint(0, 250, (1, args.window))
    with torch.no_grad():
        state = hybrid.init_state(1)
        prefill = timeit(lambda: hybrid.forward_chunk(x, state, passes=1), repeat=7)
        print(f"{'N':>3} {'sleep ms':>9} {'N×prefill ms':>13} {'ratio':>6}")
        for n in args.passes:
            t = timeit(lambda n=n: hybrid.sleep(x, state, n), repeat=7)
            print(f"{n:>3} {t * 1e3:>9.2f} {n * prefill * 1e3:>13.2f} {t / (n * prefill):>6.2f}  (goal ≤ 1.15)")


if __name__ == "__main__":
    main()
