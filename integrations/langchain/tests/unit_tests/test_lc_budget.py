"""`ReplyBudget`: per-run max_tokens and stop from the context, validated before the model runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentsleep.errors import InvalidInput
from langchain.agents import create_agent

from langchain_agentsleep import ChatSleepHybrid, ChatTemplate, ReplyBudget

CHECKPOINT = Path(__file__).resolve().parents[4] / "checkpoints" / "gsm-qlast-n2"  # a shipped toy checkpoint


@pytest.fixture(scope="module")
def agent():  # type: ignore[no-untyped-def]
    model = ChatSleepHybrid.from_pretrained(CHECKPOINT, chat_template=ChatTemplate(prefix="", suffix=""))
    return create_agent(model, middleware=[ReplyBudget()])


def test_zero_tokens_listens_and_a_budget_caps_the_reply(agent) -> None:  # type: ignore[no-untyped-def]
    listened = agent.invoke({"messages": [("user", "V042 = 5 ;")]}, context={"max_tokens": 0})
    assert listened["messages"][-1].content == ""
    asked = agent.invoke({"messages": [("user", "V042 = 5 ; Q V042 ; A")]}, context={"max_tokens": 2})
    assert len(asked["messages"][-1].response_metadata["agentsleep"]["token_ids"]) <= 2
    free = agent.invoke({"messages": [("user", "V042 = 5 ;")]})  # no budget in the context: the model's own
    assert free["messages"][-1].content is not None


@pytest.mark.parametrize(
    "bad", [{"max_tokens": -1}, {"max_tokens": "3"}, {"max_tokens": True}, {"max_tokens": 2, "stop": 7}]
)
def test_bad_context_is_a_typed_error(agent, bad: dict) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput):
        agent.invoke({"messages": [("user", "V042 = 5 ;")]}, context=bad)
