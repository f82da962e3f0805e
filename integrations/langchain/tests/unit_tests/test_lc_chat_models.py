"""ChatSleepHybrid on a real TorchEngine with a tiny random checkpoint: window sync, stops, streaming, async."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentsleep.errors import ConfigError, WindowOverflow
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from lc_helpers import user_text

from langchain_agentsleep import ChatSleepHybrid, ChatTemplate


@pytest.fixture
def model(checkpoint: Path) -> ChatSleepHybrid:
    return ChatSleepHybrid.from_pretrained(checkpoint, max_tokens=6)


def conversation(model: ChatSleepHybrid, agent: str, turns: int) -> list[BaseMessage]:
    messages: list[BaseMessage] = [SystemMessage("you remember")]
    for t in range(turns):
        messages.append(HumanMessage(user_text(t), id=f"h{t}"))
        messages.append(model.invoke(messages, agent_id=agent))
    return messages


def window_of(model: ChatSleepHybrid, agent: str) -> list[int]:
    return list(model.engine.session(agent).window)


def test_profile_and_identity(model: ChatSleepHybrid, checkpoint: Path) -> None:
    assert model.profile is not None
    assert model.profile["max_input_tokens"] == model.window == 96
    assert model.profile["tool_calling"] is False
    # one provider name everywhere (traces, response metadata), and the model is named by its checkpoint
    assert model._llm_type == "chat-agentsleep"
    params = model._get_ls_params()
    assert params["ls_provider"] == "agentsleep" and params["ls_model_name"] == str(checkpoint)
    reply = model.invoke("hello cat")
    assert reply.response_metadata["model_name"] == str(checkpoint)
    assert reply.response_metadata["model_provider"] == "agentsleep"
    assert model.get_num_tokens_from_messages([HumanMessage("hello cat")]) == model.codec.count(
        [HumanMessage("hello cat")]
    )
    assert model.get_token_ids("hello cat") == model.codec.encode("hello cat")


def test_call_without_agent_uses_a_throwaway_agent(model: ChatSleepHybrid) -> None:
    first = model.invoke("hello cat")
    second = model.invoke("hello cat")
    assert first.content == second.content  # zero S + the same message, greedy
    assert model.engine.agent_ids() == []  # nothing left behind
    assert first.response_metadata["agentsleep"]["agent_id"] is None
    assert first.usage_metadata is not None and first.usage_metadata["output_tokens"] >= 1


def test_window_is_exactly_the_rendered_messages(model: ChatSleepHybrid) -> None:
    messages = conversation(model, "a", 4)
    assert window_of(model, "a") == model.codec.prompt(messages)[: -len(model.codec.generation_prefix)]
    observed = [m.response_metadata["agentsleep"]["observed_tokens"] for m in messages if isinstance(m, AIMessage)]
    news = [len(model.codec.message_ids(m)) for m in messages if isinstance(m, HumanMessage)]
    head = len(model.codec.message_ids(messages[0]))
    # each call ran only what was new: (system on the first call) + the user message + the reply prefix
    assert observed == [head + news[0] + 1] + [n + 1 for n in news[1:]]
    assert all(not m.response_metadata["agentsleep"]["resynced"] for m in messages if isinstance(m, AIMessage))


def test_same_messages_same_reply_across_agents(model: ChatSleepHybrid) -> None:
    a = conversation(model, "a", 3)
    b = conversation(model, "b", 3)
    assert [m.content for m in a] == [m.content for m in b]


def test_edited_history_resyncs_from_s(model: ChatSleepHybrid, checkpoint: Path) -> None:
    messages = conversation(model, "a", 3)
    edited = [*messages[:2], HumanMessage("cat cat cat", id="x"), *messages[3:]]
    reply = model.invoke(edited, agent_id="a")
    assert reply.response_metadata["agentsleep"]["resynced"]
    fresh = ChatSleepHybrid.from_pretrained(checkpoint, max_tokens=6)
    assert fresh.invoke(edited, agent_id="z").content == reply.content  # same as S (zero) + those messages


def test_window_overflow_and_reply_capped_to_room(model: ChatSleepHybrid) -> None:
    long = HumanMessage(" ".join(["cat"] * 120))
    with pytest.raises(WindowOverflow):
        model.invoke([long], agent_id="a")
    near = HumanMessage(" ".join(["cat"] * 90))  # 1 + 90 + 1 + 1 (reply prefix): room for 2 reply tokens + <|end|>
    reply = model.invoke([near], agent_id="b", max_tokens=50)
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] <= 2
    assert model.engine.session("b").window_tokens <= model.window
    assert model.engine.session("b").sleep_count == 0  # the engine never slept by itself


def test_stop_strings_cut_the_reply_and_the_window(model: ChatSleepHybrid) -> None:
    full = model.invoke([HumanMessage("hello cat", id="h")], agent_id="a", max_tokens=6)
    words = str(full.content).split()
    assert len(words) >= 3
    stop = words[2]
    cut = model.invoke([HumanMessage("hello cat", id="h")], agent_id="b", max_tokens=6, stop=[stop])
    assert cut.content == str(full.content)[: str(full.content).find(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    ids = cut.response_metadata["agentsleep"]["token_ids"]
    assert model.codec.decode(ids).endswith(stop)  # the window keeps the tokens up to the stop string, no more
    after = [HumanMessage("hello cat", id="h"), cut]
    assert window_of(model, "b") == model.codec.prompt(after)[: -len(model.codec.generation_prefix)]


def test_stream_equals_invoke(model: ChatSleepHybrid) -> None:
    msgs = [HumanMessage("hello cat dog", id="h")]
    whole = model.invoke(msgs, agent_id="a")
    chunks = list(model.stream(msgs, agent_id="b"))
    assert len(chunks) >= 2
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.content == whole.content
    assert merged.response_metadata["agentsleep"]["token_ids"] == whole.response_metadata["agentsleep"]["token_ids"]
    assert window_of(model, "a") == window_of(model, "b")


async def test_async_invoke_and_stream(model: ChatSleepHybrid) -> None:
    msgs = [HumanMessage("hello cat dog", id="h")]
    whole = model.invoke(msgs, agent_id="a")
    assert (await model.ainvoke(msgs, agent_id="b")).content == whole.content
    text = "".join([str(c.content) async for c in model.astream(msgs, agent_id="c")])
    assert text == whole.content


def test_bound_agent_id_and_tools(model: ChatSleepHybrid) -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    bound = model.bind_tools([add], agent_id="bound")
    reply = bound.invoke([HumanMessage("hello", id="h")])
    assert reply.response_metadata["agentsleep"]["agent_id"] == "bound"
    assert model.engine.has_agent("bound")
    assert model.invoke("hello", strict=True).content  # options meant for other providers are ignored


def test_engine_without_tokenizer_needs_one(checkpoint: Path) -> None:
    from agentsleep.model import SleepHybrid
    from agentsleep.runtime import TorchEngine

    engine = TorchEngine(SleepHybrid.from_pretrained(checkpoint))
    with pytest.raises(ConfigError):
        ChatSleepHybrid(engine=engine)
    model = ChatSleepHybrid(engine=engine, tokenizer=checkpoint / "tokenizer.json")
    assert model.codec.template == ChatTemplate.role_tokens()
    with pytest.raises(ConfigError):
        ChatSleepHybrid(engine=object())
