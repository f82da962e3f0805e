"""ChatSleepServer builds agentsleep serve's documented request without a server: only the agent's new input, the
agent id in kv_transfer_params (from the call, the field or the LangGraph thread), and honest refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentsleep.errors import ConfigError, InvalidInput
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from langchain_agentsleep import ChatSleepServer
from langchain_agentsleep.chat_template import METADATA_KEY


@pytest.fixture
def model(checkpoint: Path) -> ChatSleepServer:
    return ChatSleepServer(base_url="http://127.0.0.1:1/v1", checkpoint=str(checkpoint), max_tokens=4)


def served(text: str, agent: str, ids: list[int], *, closed: bool = True) -> AIMessage:
    meta = {"agent_id": agent, "served": True, "token_ids": ids, "closed": closed}
    return AIMessage(text, id=f"ai-{text}", response_metadata={METADATA_KEY: meta})


def test_identity(model: ChatSleepServer, checkpoint: Path) -> None:
    assert model.model_name == checkpoint.name  # what `agentsleep serve` names it by default
    params = model._get_ls_params()
    assert params["ls_provider"] == "agentsleep" and params["ls_model_name"] == checkpoint.name


def test_first_request_sends_everything_then_only_new_input(model: ChatSleepServer) -> None:
    codec = model.codec
    system, h1 = SystemMessage("you remember"), HumanMessage("hello cat", id="h1")
    request, restorable = model._request([system, h1], None, {"agent_id": "alice"})
    assert request["prompt"] == codec.prompt([system, h1]) and not restorable
    assert request["extra_body"]["kv_transfer_params"] == {"agent_id": "alice", "turn_id": "h1"}
    assert request["model"] == model.model_name and request["max_tokens"] == 4

    h2 = HumanMessage("big dog", id="h2")
    history = [system, h1, served("red", "alice", [40]), h2]
    request, restorable = model._request(history, None, {"agent_id": "alice"})
    assert request["prompt"] == codec.prompt([h2]) and restorable  # the server holds the rest
    # a reply that stopped before its end token is closed first, as the embedded engine does
    unclosed = [system, h1, served("red", "alice", [40], closed=False), h2]
    request, _ = model._request(unclosed, None, {"agent_id": "alice"})
    assert request["prompt"] == codec.end_ids + codec.prompt([h2])
    # another agent's replies do not count: for bob, all of it is new
    request, restorable = model._request(history, None, {"agent_id": "bob"})
    assert request["prompt"] == codec.prompt(history) and not restorable


def test_agent_from_the_field_or_the_thread_or_none(model: ChatSleepServer, checkpoint: Path) -> None:
    fixed = ChatSleepServer(base_url="http://x/v1", checkpoint=str(checkpoint), agent_id="fixed")
    request, _ = fixed._request([HumanMessage("hi")], None, {})
    assert request["extra_body"]["kv_transfer_params"]["agent_id"] == "fixed"
    request, _ = model._request([HumanMessage("hi")], None, {})  # outside any graph: stateless
    assert "kv_transfer_params" not in request["extra_body"]

    from langchain_core.runnables import RunnableLambda

    seen: dict[str, Any] = {}

    def inside(_: Any) -> None:
        seen["request"] = model._request([HumanMessage("hi")], None, {})[0]

    RunnableLambda(inside).invoke(None, {"configurable": {"thread_id": "thread-7"}})
    assert seen["request"]["extra_body"]["kv_transfer_params"]["agent_id"] == "thread-7"


def test_refusals(model: ChatSleepServer, checkpoint: Path) -> None:
    with pytest.raises(InvalidInput, match="at least one token"):
        model._request([HumanMessage("hi")], None, {"agent_id": "a", "max_tokens": 0})
    with pytest.raises(NotImplementedError, match="cannot call tools"):
        model._request([HumanMessage("hi")], None, {"agent_id": "a", "tool_choice": "any"})
    with pytest.raises(NotImplementedError):
        model.with_structured_output(dict)
    with pytest.raises(ConfigError, match="unknown argument"):
        ChatSleepServer(base_url="http://x/v1", checkpoint=str(checkpoint), temprature=1)
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        ChatSleepServer(base_url="http://x/v1", checkpoint=str(checkpoint.parent))
