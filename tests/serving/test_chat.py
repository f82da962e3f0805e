"""Chat completions for agents without vLLM (`agentsleep.serving.chat`): the agent's input is the template's own
rendering, one message at a time (new agent, continuing window, window a sleep emptied), replies are parsed into
OpenAI tool calls, and bad requests are refused. The served end to end test is test_imported_server.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agentsleep.errors import InvalidInput
from agentsleep.runtime.text import TextCodec
from agentsleep.serving.chat import ChatAdapter, converting
from tests.model.hf_tiny import save_tokenizer
from tests.runtime.chat_templates import HERMES, XML

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": CITY}}
CALLS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "xml": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
}


@pytest.fixture(scope="module", params=["hermes", "xml"])
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def codec(fmt: str, tmp_path_factory: pytest.TempPathFactory) -> TextCodec:
    path: Path = tmp_path_factory.mktemp(fmt)
    save_tokenizer(path, HERMES if fmt == "hermes" else XML)
    return TextCodec.from_file(path)


def _conversation() -> list[dict]:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"},
        {"role": "assistant", "content": "It is cold."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Paris?"}]},
    ]


def _as_template(messages: list[dict]) -> list[dict]:
    """The conversation as transformers' apply_chat_template takes it (arguments as dicts, text content)."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        if m.get("content") is None:
            m["content"] = ""
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]  # fmt: skip
        out.append(m)
    return out


def test_the_input_is_the_templates_rendering(codec: TextCodec) -> None:
    adapter = ChatAdapter(codec)
    messages = _conversation()
    req = adapter.request({"messages": messages, "tools": [WEATHER], "max_completion_tokens": 7})
    full = codec.chat_prompt(_as_template(messages), tools=[WEATHER])
    assert req.compose(None) == full  # a new agent hears the whole conversation, as the template renders it
    assert req.body["max_tokens"] == 7 and "messages" not in req.body and "tools" not in req.body
    # a continuing agent: the end of its last reply (what follows <|im_end|>), then only the new user message
    im_end = codec.tokenizer.token_to_id("<|im_end|>")
    before = codec.chat_prompt(_as_template(messages[:5]), tools=[WEATHER], add_generation_prompt=False)
    window = [*before[: -len(req.end_ids)], im_end]
    assert window + req.compose(window) == full
    cut = before[: -len(req.end_ids)]  # a reply cut by max_tokens: the whole reply end is added
    assert cut + req.compose(cut) == full
    # a window a sleep emptied reopens with the system prompt and the tools
    again = codec.chat_prompt(_as_template([messages[0], messages[-1]]), tools=[WEATHER])
    assert req.compose([]) == again
    assert req.body["prompt"] == req.new_ids and req.body["stop_token_ids"] == list(codec.stop_token_ids)


def _completion(codec: TextCodec, text: str, stop: bool = True) -> dict:
    ids = codec.encode(text) + ([codec.tokenizer.token_to_id("<|im_end|>")] if stop else [])
    choice = {"index": 0, "text": "ignored", "token_ids": ids, "finish_reason": "stop" if stop else "length"}
    return {"id": "cmpl-abc", "object": "text_completion", "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 3}, "kv_transfer_params": {"agent_id": "a"}}  # fmt: skip


def test_replies_become_chat_messages_with_tool_calls(codec: TextCodec, fmt: str) -> None:
    adapter = ChatAdapter(codec)
    body = {"messages": [{"role": "user", "content": "Paris?"}], "tools": [WEATHER]}
    req = adapter.request(body)
    said = f"<think>\nLook it up.\n</think>\n\nOne moment.\n{CALLS[fmt]}"
    out = adapter.response(_completion(codec, said), req, body)
    (choice,) = out["choices"]
    msg = choice["message"]
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-abc" and out["kv_transfer_params"]
    assert msg["content"] == "One moment." and msg["reasoning_content"] == "Look it up."
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["finish_reason"] == "tool_calls" and "token_ids" not in choice
    # an unreadable block is kept as a call whose arguments are its raw text (clients report it as invalid)
    bad = adapter.response(_completion(codec, "<tool_call>\nnot a call\n</tool_call>"), req, body)
    assert bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "not a call"
    # tool_choice "none": the text is left as it is
    plain = {**body, "tool_choice": "none"}
    text = adapter.response(_completion(codec, CALLS[fmt], stop=False), adapter.request(plain), plain)
    assert text["choices"][0]["message"]["content"] == CALLS[fmt] and text["choices"][0]["finish_reason"] == "length"


def test_a_forced_call_starts_the_reply(codec: TextCodec, fmt: str) -> None:
    adapter = ChatAdapter(codec)
    body = {"messages": [{"role": "user", "content": "Paris?"}], "tools": [WEATHER], "return_token_ids": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    req = adapter.request(body)
    assert req.opener.endswith("get_weather") and codec.decode(req.compose([])).endswith(req.opener)
    rest = CALLS[fmt].split("get_weather", 1)[1]  # what the model writes after the opener
    out = adapter.response(_completion(codec, rest), req, body)
    choice = out["choices"][0]
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert choice["token_ids"][-1] == codec.tokenizer.token_to_id("<|im_end|>")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"stream": True}, "stream agent turns on /v1/completions"),
        ({"n": 2}, "n=2"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "add the new"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text only"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"response_format": {"type": "json_object"}}, "forced tool call"),
    ],
)
def test_bad_chat_requests_are_refused(codec: TextCodec, change: dict, match: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], **change}
    with pytest.raises(InvalidInput, match=match):
        ChatAdapter(codec).request(body)


def test_errors_pass_through_unconverted() -> None:
    sent: list[dict] = []

    async def send(msg: dict) -> None:
        sent.append(msg)

    async def run() -> None:
        wrapped = converting(send, lambda c: {"converted": c})
        err = json.dumps({"error": {"message": "no"}}).encode()
        await wrapped({"type": "http.response.start", "status": 404, "headers": []})
        await wrapped({"type": "http.response.body", "body": err[:5], "more_body": True})
        await wrapped({"type": "http.response.body", "body": err[5:]})

    asyncio.run(run())
    assert sent[0]["status"] == 404 and json.loads(sent[1]["body"]) == {"error": {"message": "no"}}
