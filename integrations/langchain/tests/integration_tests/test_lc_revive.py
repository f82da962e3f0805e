"""Revive: a thread continued by a fresh process (same SQLite checkpointer file, same snapshot store) replies exactly
as an uninterrupted run. The first process is SIGKILLed, never shut down cleanly: after its last turn, or in the middle
of a turn (then the fresh process finishes that turn the LangGraph way, ``agent.invoke(None, config)``)."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from agentsleep.store import SnapshotStore
from langgraph.checkpoint.sqlite import SqliteSaver
from lc_helpers import make_rig, user_text

WORKER = Path(__file__).with_name("revive_worker.py")
TURNS = 16


def run_worker(
    checkpoint: Path,
    workdir: Path,
    out: Path,
    start: int,
    stop: int,
    *,
    kill: bool = False,
    kill_at: str | None = None,
    resume: bool = False,
    use_async: bool = False,
) -> None:
    """revive_worker.py: turns start..stop-1 of the conversation in a new Python process."""
    workdir.mkdir(exist_ok=True)
    cmd = [sys.executable, str(WORKER), "--ckpt", str(checkpoint), "--dir", str(workdir), "--out", str(out)]
    cmd += ["--start", str(start), "--stop", str(stop)] + (["--kill"] if kill else [])
    cmd += (["--kill-at", kill_at] if kill_at else []) + (["--resume"] if resume else [])
    cmd += ["--async"] if use_async else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if kill or kill_at else 0
    assert proc.returncode == expected, proc.stderr[-3000:]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """The whole conversation in one process: its rows and its state directory."""
    d = tmp_path_factory.mktemp("full")
    run_worker(checkpoint, d / "state", d / "out.jsonl", 0, TURNS)
    got = rows(d / "out.jsonl")
    sleeps = [r["sleep_count"] for r in got]
    assert sleeps[-1] >= 2 and len(set(sleeps)) >= 3  # it crosses several sleeps
    return got, d / "state"


@pytest.fixture(scope="module")
def uninterrupted(full_run: tuple[list[dict], Path]) -> list[dict]:
    return full_run[0]


def lineage(state_dir: Path, agent: str = "alice") -> list[tuple[str, int, int | None]]:
    """The agent's snapshots as (reason, tokens consolidated, sleep count), after checking they form one chain."""
    store = SnapshotStore(f"sqlite:///{state_dir / 'snapshots.db'}")
    try:
        history = store.history(agent)
        for parent, child in itertools.pairwise(history):
            assert child.parent_id == parent.id  # one chain, never restarted
        assert store.agent(agent).current_snapshot_id == history[-1].id
        return [(r.reason, r.tokens_consolidated, r.meta.get("sleep_count")) for r in history]
    finally:
        store.close()


def test_fresh_process_continues_the_thread_exactly(
    checkpoint: Path, tmp_path: Path, uninterrupted: list[dict]
) -> None:
    # Killed after 7 turns: the last sleep committed after turn 4, so the fresh process revives S from the store and
    # replays the three turns since (from the checkpointer's messages) into a new window.
    out = tmp_path / "out.jsonl"
    run_worker(checkpoint, tmp_path / "state", out, 0, 7, kill=True)
    assert len(rows(out)) == 7
    run_worker(checkpoint, tmp_path / "state", out, 7, TURNS)
    assert rows(out) == uninterrupted


@pytest.mark.parametrize(
    ("point", "use_async"),
    [("before_model", False), ("model", False), ("after_model", False), ("model", True)],
    ids=["before_model", "model", "after_model", "model-async"],
)
def test_killed_mid_turn_resumes_exactly(
    checkpoint: Path, tmp_path: Path, full_run: tuple[list[dict], Path], point: str, use_async: bool
) -> None:
    """SIGKILL inside turn k, a turn whose before_agent had just adopted a sleep (the state already counts it); a fresh
    process finishes turn k with invoke(None, config) — LangGraph resumes after the last finished step, so
    before_agent does not run again — and goes on. Replies, sleep counts and the store's lineage equal the
    uninterrupted run's: the fast weights were revived, never restarted from zero."""
    uninterrupted, full_state = full_run
    k = next(t for t in range(5, TURNS) if uninterrupted[t]["sleep_count"] > uninterrupted[t - 1]["sleep_count"])
    out = tmp_path / "out.jsonl"
    run_worker(checkpoint, tmp_path / "state", out, 0, k + 1, kill_at=f"{k}:{point}", use_async=use_async)
    assert len(rows(out)) == k  # turn k never finished
    run_worker(checkpoint, tmp_path / "state", out, k + 1, TURNS, resume=True, use_async=use_async)
    assert rows(out) == uninterrupted
    assert lineage(tmp_path / "state") == lineage(full_state)
    assert [s for _, _, s in lineage(full_state)] == list(range(1, len(lineage(full_state)) + 1))


def continue_in_process(
    checkpoint: Path, tmp_path: Path, split: int, *, keep_snapshots: bool
) -> tuple[list[str], list[str]]:
    """First part on one engine, the rest on a new engine (a new process in all but name), same graph DB."""
    conn = sqlite3.connect(str(tmp_path / "graph.db"), check_same_thread=False)
    first = make_rig(checkpoint, store=SnapshotStore(f"sqlite:///{tmp_path / 'a.db'}"), checkpointer=SqliteSaver(conn))
    before = []
    for t in range(split):
        before.append(str(first.turn("alice", user_text(t)).content))
        first.memory.flush()
    store_b = SnapshotStore(f"sqlite:///{tmp_path / ('a.db' if keep_snapshots else 'b.db')}")
    second = make_rig(checkpoint, store=store_b, checkpointer=SqliteSaver(conn))
    after = []
    for t in range(split, TURNS):
        after.append(str(second.turn("alice", user_text(t)).content))
        second.memory.flush()
    return before, after


def test_revive_right_after_a_sleep_is_exact(checkpoint: Path, tmp_path: Path, uninterrupted: list[dict]) -> None:
    before, after = continue_in_process(checkpoint, tmp_path, 5, keep_snapshots=True)
    assert before + after == [r["reply"] for r in uninterrupted]


def test_without_the_snapshots_the_replies_differ(checkpoint: Path, tmp_path: Path, uninterrupted: list[dict]) -> None:
    """Negative control: the same graph state but no fast weights (a lost snapshot store) changes the replies, so
    the equalities above really depend on reviving S."""
    before, after = continue_in_process(checkpoint, tmp_path, 7, keep_snapshots=False)
    assert before == [r["reply"] for r in uninterrupted[:7]]
    assert after != [r["reply"] for r in uninterrupted[7:]]


def test_revive_with_a_nearly_full_window_catches_up(
    checkpoint: Path, tmp_path: Path, uninterrupted: list[dict]
) -> None:
    """The process dies after a turn that filled the window, before its sleep ran. The fresh process cannot fit those
    messages beside the next one, so it sleeps them first (a catch-up) and goes on exactly as if the sleep had run."""
    conn = sqlite3.connect(str(tmp_path / "graph.db"), check_same_thread=False)
    store = SnapshotStore(f"sqlite:///{tmp_path / 'a.db'}")
    first = make_rig(checkpoint, store=store, checkpointer=SqliteSaver(conn), debounce_seconds=60.0)
    replies = []
    for t in range(5):
        replies.append(str(first.turn("alice", user_text(t)).content))
        if t < 4:
            first.memory.flush()
    first.memory.close(wait=False)  # the sleep turn 4 asked for never runs
    assert [r["sleep_count"] for r in uninterrupted[4:6]] == [0, 1]  # uninterrupted, it slept right after turn 4
    assert first.model.engine.session("alice").window_tokens > 0.75 * 96

    second = make_rig(checkpoint, store=store, checkpointer=SqliteSaver(conn))
    for t in range(5, TURNS):
        replies.append(str(second.turn("alice", user_text(t)).content))
        second.memory.flush()
    assert replies == [r["reply"] for r in uninterrupted]
    catch_up = second.memory.history("alice")[0]
    assert catch_up.sync and catch_up.status == "completed"
    assert second.state("alice")["sleep_count"] == uninterrupted[-1]["sleep_count"]
