"""How SleepMemory attaches: SleepMemory() binds to the agent's model at the first call and finds its store from the
environment; a model that cannot sleep is an error unless let through; over-long messages are refused; every save is a
compare-and-set, so a stale or zero-state copy of an agent never overwrites its chain."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
from agentsleep.errors import ConfigError
from agentsleep.memory import SleepPolicy
from agentsleep.store import SnapshotStore
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.checkpoint.memory import InMemorySaver
from lc_helpers import make_rig, user_text

from langchain_agentsleep import ChatSleepHybrid, MessageTooLong, SleepMemory


def cfg(thread: str) -> dict:
    return {"configurable": {"thread_id": thread}}


def test_no_argument_memory_binds_to_the_agents_model_and_the_env_store(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("AGENTSLEEP_STORE_URL", url)
    memory = SleepMemory()
    assert memory.engine is None and memory.store is not None and memory.store.url == url
    model = ChatSleepHybrid(model=str(checkpoint), max_tokens=8)
    agent = create_agent(model, system_prompt="you remember", middleware=[memory], checkpointer=InMemorySaver())
    # the same conversation through an explicitly bound memory, on its own engine
    twin = make_rig(checkpoint, store=SnapshotStore(f"sqlite:///{tmp_path / 'twin.db'}"))
    for t in range(8):
        got = agent.invoke({"messages": [("user", user_text(t))]}, cfg("a"))["messages"][-1].content
        assert got == twin.turn("a", user_text(t)).content
        memory.flush()
        twin.memory.flush()
    assert memory.engine is model.engine and memory.policy is not None and memory.policy.window == 96
    assert agent.get_state(cfg("a")).values["sleep_count"] >= 1
    assert SnapshotStore(url).agent("a").current_snapshot_id is not None  # snapshots went to $AGENTSLEEP_STORE_URL
    memory.close()


def test_default_store_is_the_default_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTSLEEP_STORE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    memory = SleepMemory()
    assert memory.store is not None and memory.store.url == "sqlite:///agentsleep.db"
    assert SleepMemory(store=None).store is None  # explicitly in-process only


def test_a_model_that_cannot_sleep_is_an_error_unless_let_through(checkpoint: Path) -> None:
    fake = GenericFakeChatModel(messages=iter([AIMessage("hi")] * 3))
    agent = create_agent(fake, middleware=[SleepMemory(store=None)], checkpointer=InMemorySaver())
    with pytest.raises(ConfigError, match="cannot sleep"):
        agent.invoke({"messages": [("user", "hello")]}, cfg("x"))
    through = create_agent(
        fake, middleware=[SleepMemory(store=None, other_models="passthrough")], checkpointer=InMemorySaver()
    )
    assert through.invoke({"messages": [("user", "hello")]}, cfg("x"))["messages"][-1].content == "hi"
    # a ChatSleepHybrid on another engine than the one the memory is bound to
    rig = make_rig(checkpoint)
    other = ChatSleepHybrid(model=str(checkpoint))
    agent = create_agent(other, middleware=[rig.memory], checkpointer=InMemorySaver())
    with pytest.raises(ConfigError, match="another engine"):
        agent.invoke({"messages": [("user", "hello")]}, cfg("x"))


def test_over_long_message_is_refused_and_taken_out_of_the_state(checkpoint: Path, caplog) -> None:
    rig = make_rig(checkpoint, soft_threshold=0.5)
    for t in range(3):
        rig.turn("t", user_text(t))
    long = " ".join(["cat"] * 200)
    with pytest.raises(MessageTooLong) as err:
        rig.turn("t", long)
    assert err.value.tokens == 202 and err.value.limit < 96  # <|user|> + 200 words + <|end|>
    assert "202 tokens" in str(err.value)
    assert all(m.content != long for m in rig.state("t")["messages"])  # the message did not stay in the state
    rig.memory.flush()
    with caplog.at_level(logging.WARNING):
        for t in range(3, 6):  # the thread goes on, and no sleep fails because of that message
            assert rig.turn("t", user_text(t)).content is not None
            rig.memory.flush()
    assert "sleep failed" not in caplog.text
    assert all(r.status == "completed" for r in rig.memory.history("t"))
    # the same message straight to the chat model: the same typed error, before anything runs
    with pytest.raises(MessageTooLong):
        rig.model.invoke(long, agent_id="direct")
    assert not rig.model.engine.has_agent("direct")


def test_over_long_message_under_an_unbound_memory(checkpoint: Path) -> None:
    model = ChatSleepHybrid(model=str(checkpoint), max_tokens=8)
    memory = SleepMemory(store=None)
    agent = create_agent(model, middleware=[memory], checkpointer=InMemorySaver())
    with pytest.raises(MessageTooLong):  # the first call binds the memory and refuses the message
        agent.invoke({"messages": [("user", " ".join(["cat"] * 200))]}, cfg("u"))
    reply = agent.invoke({"messages": [("user", "hello cat")]}, cfg("u"))["messages"]
    assert [m.content for m in reply if m.type == "human"] == ["hello cat"]  # the long one was taken out


def test_a_stale_copy_never_overwrites_a_newer_chain(checkpoint: Path, tmp_path: Path) -> None:
    """Two processes (two engines) on one store and one thread: the one that fell behind cannot save over the one
    that moved the agent on; its copy is dropped and its next turn revives the newer snapshot."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    saver = InMemorySaver()
    a = make_rig(checkpoint, store=SnapshotStore(url), checkpointer=saver, soft_threshold=0.3)
    b = make_rig(checkpoint, store=SnapshotStore(url), checkpointer=saver, soft_threshold=0.3)
    for t in range(3):
        a.turn("t", user_text(t))
        a.memory.flush()
    b.turn("t", user_text(3))  # b revives a's latest snapshot
    b.memory.flush()
    a.turn("t", user_text(4))  # a's copy is now stale: b moved the agent on
    a.memory.flush()
    store = SnapshotStore(url)
    history = store.history("t")
    assert all(child.parent_id == parent.id for parent, child in itertools.pairwise(history))
    assert [r.meta["sleep_count"] for r in history] == list(range(1, len(history) + 1))
    assert any(r.outcome and r.outcome.detail.get("skipped") == "conflict" for r in a.memory.history("t"))
    assert not a.model.engine.has_agent("t")  # dropped; a's next turn revives the current snapshot
    a.turn("t", user_text(5))
    assert a.model.engine.session("t").snapshot_id is not None


def test_a_zero_state_copy_never_saves_over_an_existing_agent(checkpoint: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = make_rig(checkpoint, store=SnapshotStore(url), soft_threshold=0.3)
    for t in range(3):
        first.turn("t", user_text(t))
        first.memory.flush()
    current = SnapshotStore(url).agent("t").current_snapshot_id
    rogue = make_rig(checkpoint, store=SnapshotStore(url), soft_threshold=0.3)
    rogue.model.invoke(user_text(0), agent_id="t")  # a model call outside SleepMemory creates a zero-state agent
    outcome = rogue.memory.sleep_job(_request("t"))
    assert outcome.detail.get("skipped") == "conflict"
    assert SnapshotStore(url).agent("t").current_snapshot_id == current


def _request(agent: str):  # type: ignore[no-untyped-def]
    from agentsleep.memory.scheduler import SleepRequest

    return SleepRequest(
        agent_id=agent, run_id="manual", reason="manual", attempt=1, passes=2, snapshot=True, timeout_seconds=60
    )


def test_policy_must_fit_the_bound_model(checkpoint: Path) -> None:
    model = ChatSleepHybrid(model=str(checkpoint))
    with pytest.raises(ConfigError, match="exceeds"):
        SleepMemory(model, store=None, policy=SleepPolicy(window=500, passes=2))


def test_an_adaptive_engine_gives_an_adaptive_default_policy_and_its_sleeps_are_saved(
    checkpoint: Path, tmp_path: Path
) -> None:
    """An engine whose default depth is "auto" (issue 17): the bound memory sleeps adaptively and its snapshots record
    a whole number of passes (the store takes ints), instead of failing the first save."""
    from agentsleep.model.adaptive import AutoPasses
    from agentsleep.runtime import TorchEngine

    engine = TorchEngine.from_pretrained(checkpoint, passes=AutoPasses(max_passes=3, tol=0.05))
    model = ChatSleepHybrid(engine=engine, max_tokens=8)
    store = SnapshotStore(f"sqlite:///{tmp_path / 'auto.db'}")
    memory = SleepMemory(store=store)
    agent = create_agent(model, system_prompt="you remember", middleware=[memory], checkpointer=InMemorySaver())
    for t in range(8):
        agent.invoke({"messages": [("user", user_text(t))]}, cfg("auto"))
        memory.flush()
    assert memory.policy is not None and memory.policy.passes == "auto" and memory.policy.max_passes == 3
    assert agent.get_state(cfg("auto")).values["sleep_count"] >= 1
    memory.snapshot("auto")  # a manual snapshot records the policy's nominal depth
    records = store.history("auto")
    assert records and all(isinstance(r.passes, int) and 1 <= r.passes <= 3 for r in records)
    memory.close()
