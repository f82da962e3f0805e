"""Shared checks for the hybrid and Jet tests: one sequence through the model's three code paths."""

from __future__ import annotations

import torch

from agentsleep.model.hybrid import SleepHybrid


def three_ways(m: SleepHybrid, tokens: torch.Tensor, N: int = 3, prefix: int = 18):
    """The same sequence through Algorithm 1 (one parallel call), the window API (`sleep` per window, then
    `forward_chunk`) and token-by-token decoding (`extend`, `sleep_window`): (aligned logits, chunk logits, decoded
    logits, S after the window API, S after decoding)."""
    L, B = m.config.window, tokens.shape[0]
    mask = torch.zeros_like(tokens)
    mask[:, prefix:] = 1
    with torch.no_grad():
        aligned, _ = m(tokens, mask, passes=N)
        st = m.init_state(B)
        for s in range(0, prefix, L):
            st = m.sleep(tokens[:, s : s + L], st, N)
        chunk_logits, _ = m.forward_chunk(tokens[:, prefix:], st)
        st2 = m.init_state(B)
        for s in range(0, prefix, L):
            cache = m.start_window(st2)
            for i in range(L):  # one token at a time
                m.extend(cache, tokens[:, s + i : s + i + 1])
            st2 = m.sleep_window(cache, N)
        cache = m.start_window(st2)
        step = torch.cat([m.extend(cache, tokens[:, t : t + 1]) for t in range(prefix, tokens.shape[1])], 1)
    return aligned, chunk_logits, step, st, st2
