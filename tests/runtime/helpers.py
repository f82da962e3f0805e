"""Toy models and token streams shared by the runtime tests (no download, a few ms per token)."""

from __future__ import annotations

import threading

import pytest
import torch

from agentsleep.memory import SleepPolicy
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.runtime import TorchEngine

VOCAB = 40
BOS = 1
CONTENT = (2, VOCAB)  # ids drawn for turns: everything but 0 and BOS


def make_model(
    *,
    window: int = 16,
    layout: str = "agag",
    passes: int = 3,
    eviction: str = "hard",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SleepHybrid:
    """A small hybrid whose fast weights matter: slow forgetting and a strong GDN read-out (as tests/model do), so a
    state that crossed agents or a missed sleep shows up in the logits."""
    torch.manual_seed(seed)
    cfg = HybridConfig(
        vocab_size=VOCAB, d_model=64, layout=layout, window=window, eviction=eviction, bos_token_id=BOS,
        gdn_head_dim=64, passes=passes,
    )  # fmt: skip
    model = SleepHybrid(cfg).to(dtype).eval()
    with torch.no_grad():
        for block in model.layers:
            if block.kind == "g":
                block.linear_attn.A_log.fill_(-3.0)
                block.linear_attn.out_proj.weight.mul_(8.0)
    model.refresh_fingerprint()
    return model


def turn_tokens(seed: int, n: int) -> list[int]:
    """``n`` seeded content token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(*CONTENT, (n,), generator=g).tolist()


def conversation_turn(t: int) -> list[int]:
    """Turn ``t`` of the deterministic conversation the revival tests replay (3..7 tokens, never a window's worth)."""
    return turn_tokens(1000 + t, 3 + t % 5)


REVIVAL_REPLY = 3  # reply tokens per conversation turn


def revival_policy(window: int, passes: int) -> SleepPolicy:
    """The policy of the revival conversation: with turns of ≤ 7 + 3 tokens and L = 32 a window never fills inside
    a turn, so every snapshot marks the end of a turn."""
    return SleepPolicy(window=window, passes=passes, soft_threshold=0.5, debounce_seconds=0.0)


def blocking_sleep(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the model's sleep computation wait for a signal, so a test can act while a sleep is in flight: returns
    (``started``, set once a sleep computes; ``release``, set it to let the sleep finish)."""
    started, release = threading.Event(), threading.Event()
    real = engine.model.sleep_window

    def slow(cache, passes=None):
        started.set()
        assert release.wait(10)
        return real(cache, passes)

    monkeypatch.setattr(engine.model, "sleep_window", slow)
    return started, release
