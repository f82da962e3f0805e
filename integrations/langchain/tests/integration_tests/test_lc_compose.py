"""SleepMemory composes with LangChain's own SummarizationMiddleware (using our offline token counter): every
message leaves the model's view once, either folded into S by a sleep or summarised, never both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import SummarizationMiddleware, wrap_model_call
from langchain_core.messages import BaseMessage
from langgraph.checkpoint.memory import InMemorySaver
from lc_helpers import make_rig, user_text

from langchain_agentsleep import _window, count_tokens_tiktoken

TURNS = 30


@pytest.mark.parametrize("order", ["sleep-first", "summary-first"])
def test_summarization_and_sleep_never_evict_the_same_message(checkpoint: Path, order: str) -> None:
    rig = make_rig(checkpoint, soft_threshold=0.6)  # sleeps and summaries both happen within 30 turns
    events: list[tuple[str, set[str]]] = []  # in order: ("sleep", consolidated ids), ("summary", ...), ("call", ...)

    def summarizer(messages: list[BaseMessage]) -> str:
        events.append(("summary", {m.id for m in messages if m.id}))
        return "summary cat dog"

    summarization = SummarizationMiddleware(
        rig.model,
        trigger=("messages", 7),
        keep=("messages", 2),
        token_counter=count_tokens_tiktoken,
        summarizer=summarizer,
    )

    @wrap_model_call
    def spy(request: Any, handler: Any) -> Any:
        events.append(("call", {m.id for m in request.messages if m.id}))
        return handler(request)

    real_sleep = rig.memory._sleep

    def sleep_spy(agent: str, book: Any, request: Any) -> Any:
        ledger = _window.slot(rig.model.engine, agent).ledger
        outcome = real_sleep(agent, book, request)
        if outcome.tokens:
            events.append(("sleep", set(ledger.message_ids)))
        return outcome

    rig.memory._sleep = sleep_spy  # type: ignore[method-assign]
    middleware = [rig.memory, summarization] if order == "sleep-first" else [summarization, rig.memory]
    agent = create_agent(
        rig.model, system_prompt="you remember", middleware=[*middleware, spy], checkpointer=InMemorySaver()
    )
    cfg = {"configurable": {"thread_id": "t"}}
    for t in range(TURNS):
        out = agent.invoke({"messages": [("user", user_text(t))]}, cfg)
        assert out["messages"][-1].content is not None
        rig.memory.flush()

    kinds = [k for k, _ in events]
    assert kinds.count("sleep") >= 3 and kinds.count("summary") >= 3
    consolidated: set[str] = set()
    summarized: set[str] = set()
    for kind, ids in events:
        if kind == "sleep":
            assert not ids & consolidated, "a message was consolidated twice"
            assert not ids & summarized, "a summarised message was consolidated too"
            consolidated |= ids
        elif kind == "summary":
            assert not ids & consolidated, "a consolidated message was summarised too"
            summarized |= ids
        else:
            assert not ids & consolidated, "the model was sent a message already in its fast weights"
            assert not ids & summarized, "the model was sent a message already summarised"
    # the summaries themselves reach the model (and are later consolidated like any message)
    state = agent.get_state(cfg).values
    assert state["sleep_count"] >= 3
