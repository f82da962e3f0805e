"""Picking the next token from logits: greedy, or temperature / top-k / top-p sampling with a seeded generator."""

from __future__ import annotations

import torch
from torch import Tensor

from agentsleep.runtime.engine import SamplingParams


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set every logit outside the top-k and outside the top-p nucleus to -inf. logits: [V] -> [V]."""
    out = logits.clone()
    if top_k is not None and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass *before* it already reaches top_p, so the most likely one always survives
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        out[order[drop_sorted]] = float("-inf")
    return out


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from ``logits`` [V] (float, any device)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scaled = logits.detach().to("cpu", torch.float64) / params.temperature  # CPU: the generator lives there
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


__all__ = ["filter_logits", "sample_next"]
