"""Window truncation: the same checkpoint, but after a sleep the agent knows only the messages since (S = 0)."""

from __future__ import annotations

from pathlib import Path

import torch

from agentsleep.episodes.drivers import Condition, TruncatingEngine
from agentsleep.runtime import SamplingParams, TorchEngine


def test_truncation_forgets_exactly_what_was_evicted(suite: Path) -> None:
    ckpt = suite / "depo-n2"
    trunc = TruncatingEngine.from_pretrained(ckpt)
    sleeper = TorchEngine.from_pretrained(ckpt)
    fresh = TorchEngine.from_pretrained(ckpt)
    assert trunc.fingerprint == sleeper.fingerprint  # same weights: snapshots and stores are interchangeable
    old, new = [3, 60, 7, 70, 12, 80, 9, 55, 20, 90], [101, 3, 60, 117]
    greedy = SamplingParams(max_new_tokens=4)
    for eng in (trunc, sleeper, fresh):
        eng.create_agent("a")
    for eng in (trunc, sleeper):
        eng.observe("a", old)
        assert eng.sleep("a").tokens == len(old)
    state = trunc.export_state("a").state
    assert all(torch.count_nonzero(s) == 0 for s in state.ssm)  # nothing survived the window
    got = trunc.generate("a", new, greedy, return_logits=True)
    ref = fresh.generate("a", new, greedy, return_logits=True)  # never heard `old` at all
    slept = sleeper.generate("a", new, greedy, return_logits=True)
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got.prompt_logits, ref.prompt_logits)
    assert not torch.allclose(slept.prompt_logits, ref.prompt_logits, atol=1e-3)  # with sleep, S does carry `old`
    # Before any sleep the baseline is the model itself.
    trunc.create_agent("b")
    sleeper.create_agent("b")
    a = trunc.observe("b", old, return_logits=True).logits
    b = sleeper.observe("b", old, return_logits=True).logits
    torch.testing.assert_close(a, b)


def test_condition_builds_the_right_engine(suite: Path) -> None:
    plain = Condition(name="n2", checkpoint=str(suite / "depo-n2")).engine()
    cut = Condition(name="t", checkpoint=str(suite / "depo-n2"), truncate=True).engine()
    assert type(plain) is TorchEngine and isinstance(cut, TruncatingEngine)
    assert plain.passes == 2 and Condition(name="x", checkpoint=str(suite / "depo-n2"), passes=3).engine().passes == 3
    policy = Condition(name="f", checkpoint=str(suite / "depo-attn"), full_history=True).policy(plain)
    assert policy.soft_threshold == 1.0 and policy.debounce_seconds == 0.0
