"""Revival: an agent loaded from a snapshot, in a fresh engine or a fresh process, continues exactly where it was.

Post-sleep snapshots (empty window) restore bit-exactly. Mid-window snapshots replay the window in one prefill; that
agrees with token-by-token processing to float rounding: the greedy tokens must be identical and the logits within
1e-5 (measured: ~1e-7; docs/runtime.md).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agentsleep.errors import SnapshotMismatch, UnknownAgent, UnknownSnapshot
from agentsleep.memory.host import AgentHost, TurnResult
from agentsleep.runtime import TorchEngine, revive
from agentsleep.store import SnapshotStore

from .helpers import REVIVAL_REPLY, conversation_turn, make_model, revival_policy

CHILD = Path(__file__).with_name("revive_child.py")
L, N = 32, 3
REPLAY_ATOL = 1e-5


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return make_model(window=L, passes=N).save_pretrained(tmp_path / "ckpt")


def host_for(engine: TorchEngine, store: SnapshotStore | None, *, snapshot_turns: bool = False) -> AgentHost:
    return AgentHost(
        engine, store, revival_policy(engine.window, engine.passes), background=False, snapshot_turns=snapshot_turns
    )


def talk(host: AgentHost, turns: range) -> list[TurnResult]:
    return [host.turn("agent", conversation_turn(t), max_new_tokens=REVIVAL_REPLY, return_logits=True) for t in turns]


def assert_same_continuation(got: list[TurnResult], want: list[TurnResult], *, exact: bool) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.tokens == w.tokens
        if exact:
            assert torch.equal(g.logits, w.logits) and torch.equal(g.input_logits, w.input_logits)
        else:
            assert torch.allclose(g.logits, w.logits, atol=REPLAY_ATOL)
            assert torch.allclose(g.input_logits, w.input_logits, atol=REPLAY_ATOL)


def test_revive_after_a_sleep_is_bit_exact(tmp_path, checkpoint):
    store = SnapshotStore(f"sqlite:///{tmp_path / 's.db'}", sqlite_synchronous="OFF")
    with host_for(TorchEngine.from_pretrained(checkpoint), store) as first:
        first.create("agent")
        t = 0
        while True:  # talk until a turn ends with a sleep: the latest snapshot is then the agent exactly
            talk(first, range(t, t + 1))
            t += 1
            if first.session("agent").window == () and t > 4:
                break
        assert store.latest("agent").record.reason == "sleep"
        with host_for(TorchEngine.from_pretrained(checkpoint), store) as second:
            second.revive("agent")
            assert second.session("agent") == first.session("agent")
            assert_same_continuation(talk(second, range(t, t + 4)), talk(first, range(t, t + 4)), exact=True)


def test_revive_any_snapshot_id_mid_window(tmp_path, checkpoint):
    store = SnapshotStore(f"sqlite:///{tmp_path / 's.db'}", sqlite_synchronous="OFF")
    with host_for(TorchEngine.from_pretrained(checkpoint), store, snapshot_turns=True) as live:
        live.create("agent")
        ids = [r.snapshot_id for r in talk(live, range(12))]
    k = next(i for i in range(3, 12) if store.load(ids[i]).window)  # a snapshot with a non-empty window
    with host_for(TorchEngine.from_pretrained(checkpoint), None) as reference:  # uninterrupted run
        reference.create("agent")
        talk(reference, range(k + 1))
        want = talk(reference, range(k + 1, k + 5))
    engine = TorchEngine.from_pretrained(checkpoint)
    session = engine.revive("agent", store, ids[k])
    assert session.snapshot_id == ids[k] and len(session.window) == len(store.load(ids[k]).window) > 0
    with host_for(engine, None) as revived:
        assert_same_continuation(talk(revived, range(k + 1, k + 5)), want, exact=False)


def test_revive_errors(tmp_path, checkpoint):
    store = SnapshotStore(f"sqlite:///{tmp_path / 's.db'}", sqlite_synchronous="OFF")
    engine = TorchEngine.from_pretrained(checkpoint)
    with pytest.raises(UnknownAgent):
        revive(engine, store, "nobody")
    with pytest.raises(UnknownSnapshot):
        revive(engine, store, "nobody", "no-such-snapshot")
    other = TorchEngine(make_model(window=L, passes=N, seed=5))
    other.create_agent("x")
    with host_for(other, store) as h:
        h.snapshot("x")
    with pytest.raises(SnapshotMismatch):
        revive(engine, store, "x")
    assert not engine.has_agent("x")


def _run_child_and_kill(checkpoint: Path, url: str, kill_after: int, delay_s: float) -> list[str]:
    """Start the agent process, read ``kill_after`` committed turns, wait ``delay_s``, SIGKILL it mid-conversation."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(checkpoint), url, "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode())
            if len(lines) >= kill_after:
                time.sleep(delay_s)
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the agent process ended before it was killed"
    assert len(lines) == kill_after
    return lines


def test_sigkill_mid_conversation_then_revive_continues_like_the_uninterrupted_run(tmp_path, checkpoint):
    url = f"sqlite:///{tmp_path / 'agent.db'}"
    SnapshotStore(url).close()  # migrate before the child starts: a kill mid-migration is not this test's point
    rng = random.Random(20260526)
    kill_after = rng.randrange(6, 14)
    lines = _run_child_and_kill(checkpoint, url, kill_after, rng.uniform(0.0, 0.05))

    store = SnapshotStore(url)
    latest = store.latest("agent")
    seen = latest.record.meta["tokens_seen"]
    with host_for(TorchEngine.from_pretrained(checkpoint), None) as reference:  # the uninterrupted run
        reference.create("agent")
        printed = talk(reference, range(kill_after))
        for line, want in zip(lines, printed):  # the killed process said the same things before it died
            assert tuple(int(x) for x in line.split()[3:]) == want.tokens
        t = kill_after
        while reference.session("agent").tokens_seen < seen:  # the child may have committed a few more turns
            talk(reference, range(t, t + 1))
            t += 1
        assert reference.session("agent").tokens_seen == seen, "the latest snapshot is not at a turn boundary"
        want = talk(reference, range(t, t + 3))

    with host_for(TorchEngine.from_pretrained(checkpoint), store, snapshot_turns=True) as revived:
        session = revived.revive("agent")
        assert session.snapshot_id == latest.record.id and session.tokens_seen == seen
        got = talk(revived, range(t, t + 3))
    assert_same_continuation(got, want, exact=not latest.window)
