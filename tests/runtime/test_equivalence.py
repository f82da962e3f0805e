"""The runtime is the model: an agent driven through AgentHost (observe / generate / policy-driven sleeps, background
or in-turn, over-long turns split) gives the same logits as `SleepHybrid` run directly on the same chunks with the
same N — to float64 precision."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.runtime import TorchEngine
from agentsleep.store import SnapshotStore

from .helpers import make_model, turn_tokens

L, N = 16, 3


def reference_logits(model, stream: list[int], boundaries: list[int], passes: int) -> dict[int, torch.Tensor]:
    """`forward_chunk` (pass 1, whole window at once) on every chunk, then `sleep` (N passes) at each boundary."""
    state = model.init_state(1)
    out: dict[int, torch.Tensor] = {}
    last = boundaries[-1] if boundaries else 0
    cuts = [0, *boundaries, min(len(stream), last + L)]  # a generated token past a full window has no logits yet
    for a, b in itertools.pairwise(cuts):
        if a == b:
            continue
        chunk = torch.tensor([stream[a:b]])
        with torch.no_grad():
            logits, _ = model.forward_chunk(chunk, state, passes=1)
        for i in range(b - a):
            out[a + i] = logits[0, i]
        if b in boundaries:
            state = model.sleep(chunk, state, passes)
    return out


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("background", [True, False], ids=["background", "in-turn"])
def test_agent_through_the_runtime_equals_sleephybrid_on_the_same_chunks(tmp_path, background, eviction):
    model = make_model(window=L, passes=N, eviction=eviction, dtype=torch.float64)
    store = SnapshotStore(f"sqlite:///{tmp_path / 'snaps.db'}", sqlite_synchronous="OFF")
    policy = SleepPolicy(window=L, passes=N, soft_threshold=0.6, debounce_seconds=0.0)
    rng = random.Random(0)
    stream: list[int] = []
    got: dict[int, torch.Tensor] = {}
    with AgentHost(TorchEngine(model), store, policy, background=background) as host:
        host.create("a")
        for t in range(24):
            ids = turn_tokens(t, rng.choice([1, 2, 4, 7, 9, 40]))  # 40 > L: split over windows
            res = host.turn("a", ids, max_new_tokens=rng.choice([0, 1, 3, 6]), return_logits=True)
            for i in range(len(ids)):
                got[len(stream) + i] = res.input_logits[i]
            stream += ids
            if res.tokens:
                assert torch.equal(res.logits[0], res.input_logits[-1])
            for j, tok in enumerate(res.tokens):
                if j > 0:
                    got[len(stream) - 1] = res.logits[j]  # drawn from the previous reply token's pass
                stream.append(tok)
            if background:
                host.scheduler.wait_idle()
        session = host.session("a")
    sleeps = [r for r in store.history("a") if r.reason == "sleep"]
    boundaries = [r.tokens_consolidated for r in sleeps]
    assert len(sleeps) == session.sleep_count > 5
    assert boundaries == sorted(set(boundaries)) and boundaries[-1] == session.tokens_consolidated
    assert all(b - a <= L for a, b in zip([0, *boundaries], boundaries))  # every consolidated chunk fits a window
    assert any(b - a < L for a, b in zip([0, *boundaries], boundaries))  # and the policy slept before full, too
    assert session.window == tuple(stream[boundaries[-1] :])
    ref = reference_logits(model, stream, boundaries, N)
    assert got.keys() <= ref.keys() and len(got) > 0.9 * len(stream)
    worst = max((got[p] - ref[p]).abs().max().item() for p in got)
    assert worst < 1e-9, worst
