"""SleepMemory inside a real create_agent graph (InMemorySaver): state schema, agent keys, scheduling, failures."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from agentsleep.errors import SleepFailed
from agentsleep.store import SnapshotStore
from langchain.agents import create_agent
from langgraph.checkpoint.memory import InMemorySaver
from lc_helpers import FlakyEngine, make_rig, user_text

from langchain_agentsleep import MissingAgentKey, SleepMemory

PRIVATE = {"snapshot_id", "consolidated_through", "tokens_since_sleep", "sleep_count", "sleep_pending"}


def test_private_fields_persist_per_thread_and_stay_out_of_the_schemas(checkpoint: Path) -> None:
    rig = make_rig(checkpoint, soft_threshold=0.3)
    for t in range(4):
        rig.turn("t1", user_text(t))
    rig.memory.flush()
    rig.turn("t1", user_text(4))
    values = rig.state("t1")
    assert values["sleep_count"] >= 1 and values["snapshot_id"] is None  # no store: sleeps are not persisted
    assert isinstance(values["tokens_since_sleep"], int)
    for schema in (rig.agent.get_input_jsonschema(), rig.agent.get_output_jsonschema()):
        assert not PRIVATE & set(schema.get("properties", {}))
    assert "sleep_count" not in rig.state("t2")  # another thread has its own (empty) state


def test_missing_agent_key_is_a_clear_error(checkpoint: Path) -> None:
    rig = make_rig(checkpoint)
    bare = create_agent(rig.model, middleware=[rig.memory])  # no checkpointer: no thread id
    with pytest.raises(MissingAgentKey, match="thread_id"):
        bare.invoke({"messages": [("user", "hello")]})


def test_agent_id_from_context_or_constructor(checkpoint: Path) -> None:
    rig = make_rig(checkpoint)
    bare = create_agent(rig.model, middleware=[rig.memory])
    bare.invoke({"messages": [("user", "hello")]}, context={"agent_id": "from-context"})
    assert rig.model.engine.has_agent("from-context")
    fixed = SleepMemory(rig.model, agent_id="fixed")
    create_agent(rig.model, middleware=[fixed]).invoke({"messages": [("user", "hello")]})
    assert rig.model.engine.has_agent("fixed")
    keyed = SleepMemory(rig.model, agent_key=lambda runtime: "keyed")
    create_agent(rig.model, middleware=[keyed]).invoke({"messages": [("user", "hello")]})
    assert rig.model.engine.has_agent("keyed")


def test_after_agent_does_not_wait_for_the_sleep(checkpoint: Path) -> None:
    rig = make_rig(checkpoint, engine_cls=FlakyEngine, soft_threshold=0.05)
    rig.model.engine.sleep_delay = 1.5
    rig.turn("t", "hello")  # warm up (first-call overheads)
    rig.memory.flush()
    start = time.perf_counter()
    rig.turn("t", "hello cat")
    took = time.perf_counter() - start
    assert took < 1.0, f"invoke waited for the background sleep ({took:.2f} s)"
    assert rig.memory.flush(timeout=10)
    assert [r.status for r in rig.memory.history("t")][-1] == "completed"


def test_rapid_turns_give_one_debounced_sleep(checkpoint: Path) -> None:
    rig = make_rig(checkpoint, soft_threshold=0.05, debounce_seconds=2.0)
    for t in range(4):
        rig.turn("t", user_text(t))
    assert rig.memory.wait_idle(timeout=10)
    records = rig.memory.history("t")
    assert [r.status for r in records] == ["completed"]
    assert records[0].coalesced == 3  # four turns asked, one sleep ran


def test_failed_background_sleep_keeps_the_last_good_state(checkpoint: Path, tmp_path: Path, caplog) -> None:
    store = SnapshotStore(f"sqlite:///{tmp_path / 's.db'}")
    rig = make_rig(checkpoint, store=store, engine_cls=FlakyEngine, soft_threshold=0.3, max_retries=1)
    for t in range(4):
        rig.turn("t", user_text(t))
        rig.memory.flush()
    good = store.agent("t").current_snapshot_id
    assert good is not None and rig.model.engine.session("t").snapshot_id == good
    rig.model.engine.fail_sleeps = 100
    with caplog.at_level(logging.WARNING):
        for t in range(4, 8):
            reply = rig.turn("t", user_text(t))  # the turns succeed regardless
            assert reply.content is not None
            rig.memory.flush()
    assert "injected engine failure" in caplog.text
    assert any(r.status == "failed" for r in rig.memory.history("t"))
    assert rig.state("t")["snapshot_id"] == good
    assert rig.state("t")["last_sleep_status"] == "failed"
    assert store.agent("t").current_snapshot_id == good
    assert rig.model.engine.session("t").snapshot_id == good


def test_raise_mode_propagates_sync_sleep_failures(checkpoint: Path) -> None:
    rig = make_rig(
        checkpoint, engine_cls=FlakyEngine, soft_threshold=1.0, max_retries=0, memory_kwargs={"on_error": "raise"}
    )
    rig.model.engine.fail_sleeps = 100
    with pytest.raises(SleepFailed):
        for t in range(12):  # the window fills; the turn that cannot fit must sleep first, and that fails
            rig.turn("t", user_text(t))


def test_token_counter_is_exact_for_the_model(checkpoint: Path) -> None:
    rig = make_rig(checkpoint)
    assert rig.memory.token_counter([("user", "hello cat")]) == rig.model.codec([("user", "hello cat")])


def test_agent_with_tools(checkpoint: Path) -> None:
    """create_agent binds tools through bind_tools; the hybrid never calls them, and the run works as without."""

    def lookup(word: str) -> str:
        """Look a word up."""
        return word

    rig = make_rig(checkpoint)
    agent = create_agent(rig.model, tools=[lookup], middleware=[rig.memory], checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "tools"}}
    reply = agent.invoke({"messages": [("user", "hello cat")]}, cfg)["messages"][-1]
    assert reply.type == "ai" and not reply.tool_calls
    assert reply.response_metadata["agentsleep"]["agent_id"] == "tools"
