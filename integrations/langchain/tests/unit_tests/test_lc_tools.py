"""Tool calling with a checkpoint's own chat template (issue 12 item 5): tools rendered into the window's head, tool
calls parsed out of replies, results rendered back, forced calls and structured output — with an engine that emits
scripted replies (no trained weights exist here), for both Qwen tool-call formats (Hermes JSON, Qwen3.5's XML)."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentsleep.runtime.chat import as_chat_messages
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from lc_helpers import TEMPLATES, build_template_checkpoint, template_model
from pydantic import BaseModel

from langchain_agentsleep import ChatSleepHybrid, SleepMemory
from langchain_agentsleep.chat_template import TemplateCodec

CALLS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "xml": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
}
# what a model writes after a forced opener (the opener: up to and including the tool's name)
CONTINUATIONS = {
    "hermes": '", "arguments": {"city": "Paris"}}\n</tool_call>',
    "xml": ">\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
}


def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def ckpt(fmt: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_template_checkpoint(tmp_path_factory.mktemp(fmt) / "qwenish", TEMPLATES[fmt])


def _text(model: ChatSleepHybrid, agent: str) -> str:
    return model.codec.decode(list(model.engine.session(agent).window))


def test_the_checkpoint_template_renders_the_conversation(ckpt: Path) -> None:
    """One message at a time, the pieces add up to what the template renders for the whole conversation."""
    model = template_model(ckpt, [])
    codec = model.codec
    assert isinstance(codec, TemplateCodec) and codec.supports_tools and model.profile["tool_calling"]  # type: ignore[index]
    tools = [model.bind_tools([get_weather]).kwargs["tools"][0]]  # type: ignore[attr-defined]
    call = {"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}
    conversation = [
        SystemMessage("Be brief."),
        HumanMessage("Weather in Oslo?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("cold", tool_call_id="c1"),
        AIMessage("It is cold."),
        HumanMessage("Thanks"),
    ]
    want = model.engine.codec.chat_prompt(as_chat_messages(conversation), tools=tools)
    assert codec.prompt(conversation, tools) == want
    assert codec.count(conversation, tools) + len(codec.generation_prefix) == len(want)
    # tools without a system message: the tools' block opens the window
    bare = conversation[1:]
    assert codec.prompt(bare, tools) == model.engine.codec.chat_prompt(as_chat_messages(bare), tools=tools)


def test_bind_tools_shows_the_tools_and_reads_the_call(ckpt: Path, fmt: str) -> None:
    model = template_model(ckpt, [CALLS[fmt]])
    reply = model.bind_tools([get_weather]).invoke([HumanMessage("Weather in Paris?", id="h")], agent_id="a")
    assert reply.tool_calls == [{"name": "get_weather", "args": {"city": "Paris"}, "id": reply.tool_calls[0]["id"],
                                 "type": "tool_call"}]  # fmt: skip
    assert reply.content == "" and not reply.invalid_tool_calls
    window = _text(model, "a")
    assert window.startswith("<|im_start|>system\n# Tools") and window.count("Weather for a city.") == 1  # the head
    assert window.endswith(CALLS[fmt] + "<|im_end|>\n")  # the reply as generated, then the template's reply end


def test_an_agent_calls_a_tool_and_hears_the_result(ckpt: Path, fmt: str) -> None:
    """create_agent with tools: the call is parsed, the tool runs, its result is rendered back into the window once,
    and the agent's next call only adds what is new."""
    model = template_model(ckpt, [CALLS[fmt], "It is sunny in Paris.", "You are welcome."])
    agent = create_agent(model, tools=[get_weather], system_prompt="You help.", middleware=[SleepMemory(store=None)],
                         checkpointer=InMemorySaver())  # fmt: skip
    cfg = {"configurable": {"thread_id": "t"}}
    out = agent.invoke({"messages": [("user", "Weather in Paris?")]}, cfg)["messages"]
    assert [m.type for m in out] == ["human", "ai", "tool", "ai"]
    assert out[1].tool_calls[0]["args"] == {"city": "Paris"} and out[2].content == "sunny in Paris"
    assert out[3].content == "It is sunny in Paris."
    engine = model.engine
    window = _text(model, "t")
    assert window.startswith("<|im_start|>system\nYou help.\n\n# Tools")
    assert window.count("<tool_response>\nsunny in Paris\n</tool_response>") == 1
    assert window.count(CALLS[fmt]) == 1 and window.endswith("It is sunny in Paris.<|im_end|>\n")
    # the second model call sent only the tool result and the reply prompt: the window already held the rest
    second = model.codec.decode(engine.prompts[1])
    assert second.startswith("<|im_start|>user\n<tool_response>") and "# Tools" not in second
    out = agent.invoke({"messages": [("user", "Thanks")]}, cfg)["messages"]
    assert out[-1].content == "You are welcome."
    assert model.codec.decode(engine.prompts[2]) == "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"
    assert out[-1].response_metadata["agentsleep"]["resynced"] is False


def test_parallel_calls_and_unreadable_ones(ckpt: Path, fmt: str) -> None:
    broken = "<tool_call>\n{not json}\n</tool_call>" if fmt == "hermes" else "<tool_call>\nno function\n</tool_call>"
    two = f"Two lookups.\n{CALLS[fmt]}\n{CALLS[fmt].replace('Paris', 'Rome')}"
    model = template_model(ckpt, [two, broken, "ok"], max_tokens=160)
    bound = model.bind_tools([get_weather])
    msgs: list = [HumanMessage("Paris and Rome?", id="h")]
    reply = bound.invoke(msgs, agent_id="p")
    assert reply.content == "Two lookups." and [c["args"]["city"] for c in reply.tool_calls] == ["Paris", "Rome"]
    msgs += [reply, *(ToolMessage(f"r{i}", tool_call_id=c["id"], id=f"t{i}") for i, c in enumerate(reply.tool_calls))]
    again = bound.invoke(msgs, agent_id="p")
    assert again.response_metadata["agentsleep"]["resynced"] is False  # the first reply was kept token for token
    assert not again.tool_calls and len(again.invalid_tool_calls) == 1
    # each tool result is its own block (rendered one message at a time), in order
    assert _text(model, "p").count("<tool_response>") == 2


def test_forced_tool_choice_and_structured_output(ckpt: Path, fmt: str) -> None:
    model = template_model(ckpt, [CONTINUATIONS[fmt]])
    reply = model.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather?", agent_id="f")
    assert reply.tool_calls[0]["name"] == "get_weather" and reply.tool_calls[0]["args"] == {"city": "Paris"}
    opener = model.codec.tool_call_opener("get_weather")
    assert opener is not None and model.codec.decode(model.engine.prompts[0]).endswith(opener)

    class Weather(BaseModel):
        """Weather report."""

        city: str
        degrees: int

    args = {"city": "Paris", "degrees": 21}
    cont = (
        'Weather", "arguments": {"city": "Paris", "degrees": 21}}\n</tool_call>'
        if fmt == "hermes"
        else "Weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=degrees>\n21\n</parameter>\n</function>\n"
        "</tool_call>"
    )
    model.engine.replies.append(cont)
    assert model.with_structured_output(Weather).invoke("Report for Paris", agent_id="s") == Weather(**args)
    with pytest.raises(Exception, match="names no given tool"):
        model.bind_tools([get_weather], tool_choice="nope")


def test_reasoning_is_split_off_and_kept_in_the_window(ckpt: Path) -> None:
    model = template_model(ckpt, ["<think>\nThe user greets.\n</think>\n\nHello!", "Bye."])
    first = model.invoke([HumanMessage("Hi", id="h")], agent_id="r")
    assert first.content == "Hello!" and first.additional_kwargs["reasoning_content"] == "The user greets."
    assert "<think>\nThe user greets.\n</think>" in _text(model, "r")  # as generated: the window never re-renders
    second = model.invoke([HumanMessage("Hi", id="h"), first, HumanMessage("Bye", id="b")], agent_id="r")
    assert second.content == "Bye." and second.response_metadata["agentsleep"]["resynced"] is False


def test_sleeping_keeps_the_head(ckpt: Path, fmt: str) -> None:
    """After a sleep the window opens with the system prompt and the tools again (SleepMemory's invariant)."""
    from agentsleep.memory import SleepPolicy

    model = template_model(ckpt, [f"reply {i}" for i in range(6)], max_tokens=8)
    head = len(model.codec.head_ids(SystemMessage("You help."), model.bind_tools([get_weather]).kwargs["tools"]))  # type: ignore[attr-defined]
    policy = SleepPolicy(window=head + 40, passes=1, debounce_seconds=0.0)
    memory = SleepMemory(model, None, policy=policy)
    agent = create_agent(model, tools=[get_weather], system_prompt="You help.", middleware=[memory],
                         checkpointer=InMemorySaver())  # fmt: skip
    cfg = {"configurable": {"thread_id": "s"}}
    for i in range(6):
        agent.invoke({"messages": [("user", f"note {i}")]}, cfg)
        memory.flush()
    engine = model.engine
    assert engine.session("s").sleep_count >= 2
    # every model call that found the window slept empty re-opened it with the system prompt and the tools
    fresh = [p for p, before in zip(engine.prompts, engine.window_before, strict=True) if before == 0]
    assert len(fresh) >= 3  # the first call and at least two after a sleep
    assert all(model.codec.decode(p).startswith("<|im_start|>system\nYou help.\n\n# Tools") for p in fresh)


def test_models_without_a_tool_template_never_call_tools(checkpoint: Path) -> None:
    """A toy's per-message template shows no tools: they are accepted (create_agent binds them), never rendered (the
    window equals a call without them), never called; forcing a call or structured output is refused."""
    model = ChatSleepHybrid(model=str(checkpoint), max_tokens=4)
    assert not model.profile["tool_calling"]  # type: ignore[index]
    msgs = [HumanMessage("hello", id="h")]
    bound = model.bind_tools([get_weather])
    assert model.get_num_tokens_from_messages(msgs, [get_weather]) == model.get_num_tokens_from_messages(msgs)
    with_tools = bound.invoke(msgs, agent_id="with")
    without = model.invoke(msgs, agent_id="without")
    assert not with_tools.tool_calls and with_tools.content == without.content
    assert model.engine.session("with").window == model.engine.session("without").window
    with pytest.raises(NotImplementedError, match="cannot call tools"):
        model.bind_tools([get_weather], tool_choice="get_weather")
    with pytest.raises(NotImplementedError, match="no structured output"):
        model.with_structured_output(dict)
