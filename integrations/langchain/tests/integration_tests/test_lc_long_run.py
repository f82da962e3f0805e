"""200 turns of a create_agent agent (ChatSleepHybrid + SleepMemory + SqliteSaver): sleeps between turns, the prompt
always inside the window, a snapshot per sleep, and a LangGraph checkpoint that does not grow with the turns."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from agentsleep.store import SnapshotStore
from langgraph.checkpoint.sqlite import SqliteSaver
from lc_helpers import make_rig, user_text

TURNS = 200
L = 96

logger = logging.getLogger(__name__)


def checkpoint_bytes(saver: SqliteSaver, thread: str) -> int:
    """Serialized size of the thread's latest LangGraph checkpoint (what every super-step writes again)."""
    tup = saver.get_tuple({"configurable": {"thread_id": thread}})
    assert tup is not None
    return len(saver.serde.dumps_typed(tup.checkpoint)[1])


def test_200_turns_sleep_between_turns_with_a_bounded_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    store = SnapshotStore(f"sqlite:///{tmp_path / 'snapshots.db'}")
    saver = SqliteSaver(sqlite3.connect(str(tmp_path / "graph.db"), check_same_thread=False))
    rig = make_rig(checkpoint, store=store, checkpointer=saver)
    sizes: list[int] = []
    messages_in_state: list[int] = []
    for turn in range(TURNS):
        reply = rig.turn("long", user_text(turn))
        rig.memory.flush()  # the sleep this turn asked for runs now, between this turn and the next
        usage = reply.usage_metadata
        assert usage is not None
        # what the model attended to on this call: the messages since the last sleep + its reply, never more than L
        assert usage["input_tokens"] + usage["output_tokens"] <= L
        assert reply.response_metadata["agentsleep"]["window_tokens"] <= L
        sizes.append(checkpoint_bytes(saver, "long"))
        messages_in_state.append(len(rig.state("long")["messages"]))

    records = rig.memory.history("long")
    slept = [r for r in records if r.status == "completed" and r.outcome and r.outcome.tokens]
    stats = rig.memory.scheduler.stats()
    session = rig.model.engine.session("long")
    snapshots = store.history("long")
    # sleeps happen, all in the background between turns (none on a turn's path, none forced by a full window)
    assert len(slept) >= TURNS // 8
    assert stats.sync_sleeps == 0 and stats.failed == 0
    assert all(r.reason == "threshold" and not r.sync for r in slept)
    assert session.sleep_count == len(slept)  # the engine never slept on its own (window-full)
    # every sleep left a snapshot, chained to the previous one, recording what it consolidated
    assert len(snapshots) == len(slept)
    assert all(s.reason == "sleep" and s.meta["consolidated_through"] for s in snapshots)
    assert [s.parent_id for s in snapshots[1:]] == [s.id for s in snapshots[:-1]]
    assert snapshots[-1].tokens_consolidated == session.tokens_consolidated
    # the graph state holds only the messages since the last sleep, so the checkpoint stays small
    values = rig.state("long")
    assert values["sleep_count"] >= len(slept) - 1
    assert max(messages_in_state) <= 12
    early, late = max(sizes[:50]), max(sizes[-50:])
    assert late <= early * 1.25, (early, late)
    assert late < 16_000
    db_bytes = sum(f.stat().st_size for f in tmp_path.glob("graph.db*"))
    logger.warning(
        "200 turns: %d sleeps, latest checkpoint %d..%d bytes (turns 1-50 max %d, 151-200 max %d), graph.db* %d bytes "
        "(LangGraph keeps every step's checkpoint), snapshots.db* %d bytes",
        len(slept),
        min(sizes),
        max(sizes),
        early,
        late,
        db_bytes,
        sum(f.stat().st_size for f in tmp_path.glob("snapshots.db*")),
    )
