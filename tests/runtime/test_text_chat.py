"""The checkpoint's own chat template, rendered exactly as transformers' apply_chat_template renders it (the oracle),
tool schemas in the prompt, Qwen-style tool calls parsed out of replies, and counting with the model's template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentsleep.errors import InvalidInput
from agentsleep.memory.tokens import TokenCounter
from agentsleep.runtime.chat import ChatFormat, ToolCall, as_chat_messages, parse_reply
from agentsleep.runtime.text import TextCodec
from tests.model.hf_tiny import save_tokenizer

from .chat_templates import GENERATION_TAG, HERMES, XML

pytest.importorskip("transformers")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "Local time, «ünïcode» <ok>", "parameters": {}}}

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "plain": [{"role": "user", "content": "hello"}],
    "system-first": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
    "multi-turn-think": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nhello!"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "<think>\nneeds a tool\n</think>\n\nLet me look.", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"},
        {"role": "tool", "content": "sunny", "tool_call_id": "c2"},
    ],
    "string-arguments": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "now", "arguments": "{}"}}]},
    ],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, template in (("hermes", HERMES), ("xml", XML), ("generation", GENERATION_TAG)):
        d = tmp_path_factory.mktemp(name)
        save_tokenizer(d, template)
        out[name] = d
    return out


def hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


CASES = [
    ("hermes", conv, tools, gen, kw)
    for conv in CONVERSATIONS
    for tools in (None, [WEATHER, CLOCK])
    for gen in (False, True)
    for kw in ({}, {"enable_thinking": False})
    if conv != "string-arguments" or tools is None
]
CASES += [
    ("xml", conv, tools, gen, {})
    for conv in ("plain", "multi-turn-think")
    for tools in (None, [WEATHER])
    for gen in (False, True)
]


@pytest.mark.parametrize(("which", "conv", "tools", "gen", "kw"), CASES)
def test_render_equals_transformers_apply_chat_template(dirs, which, conv, tools, gen, kw) -> None:
    path = dirs[which]
    ours = ChatFormat.from_pretrained(path)
    assert ours is not None
    hf = hf_tokenizer(path)
    messages = CONVERSATIONS[conv]
    if which == "xml":  # the XML template does not strip reasoning: keep contents plain
        messages = [{**m, "content": m["content"].split("</think>")[-1].lstrip()} for m in messages]
    text = ours.render(messages, tools=tools, add_generation_prompt=bool(gen), **kw)
    want = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=bool(gen), tokenize=False, **kw)
    assert text == want
    codec = TextCodec.from_file(path)
    ids = codec.chat_prompt(messages, tools=tools, add_generation_prompt=bool(gen), **kw)
    want_ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=bool(gen), tokenize=True, **kw)
    assert ids == list(want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids)
    if tools:
        assert all(t["function"]["name"] in text for t in tools)


def test_generation_tag_and_special_tokens(dirs) -> None:
    path = dirs["generation"]
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ours = ChatFormat.from_pretrained(path)
    assert ours is not None and ours.special_tokens["eos_token"] == "<|im_end|>"
    assert ours.render(messages) == hf_tokenizer(path).apply_chat_template(messages, tokenize=False)
    assert not ours.supports_tools and ChatFormat.from_pretrained(dirs["hermes"]).supports_tools  # type: ignore[union-attr]


def test_template_in_tokenizer_config_and_named_tool_use_template(tmp_path: Path) -> None:
    save_tokenizer(tmp_path, None)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": XML}, {"name": "tool_use", "template": HERMES}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, hf = ChatFormat.from_pretrained(tmp_path), hf_tokenizer(tmp_path)
    assert ours is not None
    conv = CONVERSATIONS["system-first"]
    for tools in (None, [WEATHER]):
        want = hf.apply_chat_template(conv, tools=tools, tokenize=False, add_generation_prompt=True)
        assert ours.render(conv, tools=tools, add_generation_prompt=True) == want
    assert "# Tools\n\nYou may call" in ours.render(conv, tools=[WEATHER])  # the tool_use template was picked


def test_no_template_and_refusals(dirs, tmp_path: Path) -> None:
    save_tokenizer(tmp_path, None)
    assert ChatFormat.from_pretrained(tmp_path) is None
    codec = TextCodec.from_file(tmp_path)
    with pytest.raises(InvalidInput, match="no chat template"):
        codec.chat_prompt([{"role": "user", "content": "x"}])
    fmt = ChatFormat.from_pretrained(dirs["hermes"])
    assert fmt is not None
    with pytest.raises(InvalidInput, match="No user query"):
        fmt.render([{"role": "system", "content": "only a system prompt"}])
    with pytest.raises(InvalidInput, match="empty conversation"):
        fmt.render([])
    with pytest.raises(InvalidInput, match="JSON-schema dicts"):
        fmt.render(CONVERSATIONS["plain"], tools=[print])


def test_stop_tokens_come_from_the_checkpoint(dirs, tmp_path: Path) -> None:
    save_tokenizer(tmp_path, HERMES)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    codec = TextCodec.from_file(tmp_path / "tokenizer.json")
    im_end = codec.tokenizer.token_to_id("<|im_end|>")
    assert set(codec.stop_token_ids) == {0, 2, im_end}


# ---------------------------------------------------------------------------------------------------- parsing


def test_parse_hermes_json_calls_and_reasoning() -> None:
    text = (
        "<think>\nI should check.\n</think>\n\nChecking now.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n<tool_call>\n'
        '{"name": "now", "arguments": "{}"}\n</tool_call>'
    )
    r = parse_reply(text)
    assert r.reasoning == "I should check."
    assert r.content == "Checking now."
    assert [(c.name, c.args) for c in r.tool_calls] == [("get_weather", {"city": "Paris", "days": 3}), ("now", {})]
    assert len({c.id for c in r.tool_calls}) == 2 and not r.invalid_tool_calls
    lc = r.tool_calls[0].to_langchain()
    assert lc["type"] == "tool_call" and lc["args"] == {"city": "Paris", "days": 3}


def test_parse_xml_calls_typed_by_schema() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n5\n"
        "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>"
    )
    typed = parse_reply(text, tools=[WEATHER]).tool_calls[0]
    assert typed.name == "get_weather" and typed.args == {"city": "New York", "days": 5, "metric": True}
    untyped = parse_reply(text).tool_calls[0]
    assert untyped.args == {"city": "New York", "days": "5", "metric": "true"}  # no schema: strings, never guessed


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        "<tool_call>\nplain words\n</tool_call>",
        '<tool_call>\n{"name": "now", "arguments": {"x": 1',  # cut off by the token limit
    ],
    ids=["bad-json", "no-name", "no-format", "unterminated"],
)
def test_unreadable_calls_are_invalid_not_errors(text: str) -> None:
    r = parse_reply("before " + text)
    assert not r.tool_calls and len(r.invalid_tool_calls) == 1
    assert r.content == "before" and r.invalid_tool_calls[0].to_langchain()["type"] == "invalid_tool_call"


def test_no_tool_call_is_just_content() -> None:
    r = parse_reply("The answer is 4.")
    assert (r.content, r.tool_calls, r.reasoning) == ("The answer is 4.", (), None)


@pytest.mark.parametrize("which", ["hermes", "xml"])
def test_a_parsed_call_renders_back_as_the_model_wrote_it(dirs, which: str) -> None:
    """What the template puts in history for a call is what parse_reply reads from the model (round trip)."""
    fmt = ChatFormat.from_pretrained(dirs[which])
    assert fmt is not None
    call = ToolCall(name="get_weather", args={"city": "Paris", "days": 3, "metric": False}, id="c9")
    msgs = [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]}]
    rendered = fmt.render(msgs)
    reply = rendered.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    parsed = parse_reply(reply, tools=[WEATHER])
    assert [(c.name, c.args) for c in parsed.tool_calls] == [(call.name, call.args)]


def test_message_objects_become_template_dicts() -> None:
    class Msg:  # duck-typed LangChain message
        def __init__(self, type_: str, content: Any, **kw: Any) -> None:
            self.type, self.content = type_, content
            self.tool_calls = kw.get("tool_calls", [])
            self.tool_call_id = kw.get("tool_call_id")
            self.name = kw.get("name")

    msgs = as_chat_messages(
        [
            Msg("system", "s"),
            Msg("human", [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "x"}, "b"]),
            Msg("ai", "", tool_calls=[{"name": "now", "args": {}, "id": "t1"}]),
            Msg("tool", "12:00", tool_call_id="t1", name="now"),
            ("user", "c"),
            "d",
        ]
    )
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user", "user"]
    assert msgs[1]["content"] == "ab"
    assert msgs[2]["tool_calls"] == [{"id": "t1", "type": "function", "function": {"name": "now", "arguments": {}}}]
    assert msgs[3]["tool_call_id"] == "t1" and msgs[3]["name"] == "now"


# ---------------------------------------------------------------------------------------------------- counting


def test_token_counter_counts_with_the_model_template(dirs) -> None:
    path = dirs["hermes"]
    counter = TokenCounter.from_pretrained(path)
    conv = CONVERSATIONS["multi-turn-think"]
    want = hf_tokenizer(path).apply_chat_template(conv, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert counter(conv) == len(want)
    assert counter.count("hello world") == len(hf_tokenizer(path)("hello world", add_special_tokens=False)["input_ids"])
    # a partial conversation the template refuses is still counted, message by message
    assert counter([{"role": "system", "content": "only"}]) == counter.count("only") + counter.tokens_per_message
