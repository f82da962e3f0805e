"""Faults: the engine failing during a background sleep, the snapshot store unavailable for a moment. The run goes
on, the error is logged, and no committed state is lost."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from langgraph.checkpoint.sqlite import SqliteSaver
from lc_helpers import FlakyEngine, FlakyStore, make_rig, user_text

TURNS = 14


@pytest.fixture(scope="module")
def fault_free(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("clean")
    rig = make_rig(checkpoint, store=FlakyStore(f"sqlite:///{d / 's.db'}"))
    out = []
    for t in range(TURNS):
        out.append(str(rig.turn("t", user_text(t)).content))
        rig.memory.flush()
    return out


def assert_chain_intact(store: FlakyStore, agent: str) -> None:
    history = store.history(agent)
    assert [s.parent_id for s in history[1:]] == [s.id for s in history[:-1]]
    assert store.agent(agent).current_snapshot_id == history[-1].id
    for s in history:
        store.verify(s.id)


def test_engine_failing_during_background_sleeps(
    checkpoint: Path, tmp_path: Path, fault_free: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(f"sqlite:///{tmp_path / 's.db'}")
    rig = make_rig(checkpoint, store=store, engine_cls=FlakyEngine, max_retries=3)
    rig.model.engine.fail_sleeps = 2  # the next two sleep attempts raise; the retries succeed
    got = []
    with caplog.at_level(logging.WARNING):
        for t in range(TURNS):
            got.append(str(rig.turn("t", user_text(t)).content))
            rig.memory.flush()
    assert "injected engine failure during sleep" in caplog.text
    records = rig.memory.history("t")
    assert any(r.attempts > 1 for r in records if r.status == "completed")
    assert all(r.status == "completed" for r in records)
    assert got == fault_free  # the retried sleeps landed at the same points: nothing was lost or doubled
    assert_chain_intact(store, "t")


def test_store_down_for_a_moment_during_a_sleep(
    checkpoint: Path, tmp_path: Path, fault_free: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(f"sqlite:///{tmp_path / 's.db'}")
    rig = make_rig(checkpoint, store=store, max_retries=5, retry_backoff_seconds=0.2)
    got = []
    outage_checked = False
    with caplog.at_level(logging.WARNING):
        for t in range(TURNS):
            if t == 9:  # turn 9 crosses the soft threshold: its sleep meets a store that is down
                good = store.agent("t").current_snapshot_id
                before = rig.model.engine.session("t")
                store.down = True
            got.append(str(rig.turn("t", user_text(t)).content))
            if store.down:
                time.sleep(0.3)  # an attempt or two fail meanwhile
                assert store.failures >= 1
                after = rig.model.engine.session("t")
                # nothing committed: the store still points at the last good snapshot, the engine kept S and window
                assert store.agent("t").current_snapshot_id == good
                assert after.snapshot_id == good and after.sleep_count == before.sleep_count
                assert after.window_tokens > before.window_tokens
                store.down = False
                outage_checked = True
            rig.memory.flush()
    assert outage_checked
    assert "injected: the snapshot store is unavailable" in caplog.text
    assert got == fault_free
    assert_chain_intact(store, "t")


def test_store_down_when_a_fresh_process_revives(
    checkpoint: Path, tmp_path: Path, fault_free: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    conn = sqlite3.connect(str(tmp_path / "graph.db"), check_same_thread=False)
    store = FlakyStore(f"sqlite:///{tmp_path / 's.db'}")
    first = make_rig(checkpoint, store=store, checkpointer=SqliteSaver(conn))
    got = []
    for t in range(7):
        got.append(str(first.turn("t", user_text(t)).content))
        first.memory.flush()
    good = store.agent("t").current_snapshot_id

    # A momentary outage: the revival retries and succeeds; the conversation continues exactly.
    second = make_rig(checkpoint, store=store, checkpointer=SqliteSaver(conn))
    store.fail_calls = 2
    with caplog.at_level(logging.WARNING):
        got.append(str(second.turn("t", user_text(7)).content))
    second.memory.flush()
    assert "reviving from the store failed" in caplog.text
    assert got == fault_free[:8]

    # A longer outage in yet another process: that turn runs degraded (logged), nothing is overwritten, and the
    # next turn revives from the same committed snapshot.
    good = store.agent("t").current_snapshot_id
    third = make_rig(checkpoint, store=store, checkpointer=SqliteSaver(conn))
    store.down = True
    with caplog.at_level(logging.ERROR):
        reply = third.turn("t", user_text(8))
    assert reply.content is not None
    assert "throw-away agent" in caplog.text
    assert third.state("t")["last_sleep_status"] == "degraded"
    third.memory.flush()
    assert store.agent("t").current_snapshot_id == good
    assert not third.model.engine.has_agent("t")
    store.down = False
    third.turn("t", user_text(9))
    third.memory.flush()  # the sleep turn 9 scheduled must not commit between the reads below
    assert third.model.engine.session("t").sleep_count >= first.model.engine.session("t").sleep_count
    history = store.history("t")
    assert good in [s.id for s in history]
    assert_chain_intact(store, "t")
