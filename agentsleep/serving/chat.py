"""Chat completions for agents: ``POST /v1/chat/completions`` with ``kv_transfer_params.agent_id`` becomes one agent
turn of ``/v1/completions`` (docs/serving.md, "Chat completions"), so an OpenAI chat client (LangChain's
``ChatOpenAI``, the ``openai`` SDK) gets an agent with memory.

A chat client sends the whole conversation on every call; the agent already holds all of it up to its last reply (in
its window, or slept into S). So only the messages after the last assistant message are new, and only they are
rendered — with the checkpoint's own chat template, one message at a time (`agentsleep.runtime.chat.ChatParts`,
the same pieces `ChatSleepHybrid` uses), so each message enters the agent exactly once, as the template renders it:

* a new agent (no snapshot, or ``restore=false``): the system prompt with the tools (the template's head), every other
  message, then the generation prompt — equal to the template's rendering of the whole conversation;
* a window a sleep just emptied: the head again (the system prompt and tools reopen every window), the new messages,
  the generation prompt;
* otherwise: the rest of the last reply's end (``<|im_end|>`` is generated, the ``\\n`` after it is not), the new
  messages, the generation prompt.

Earlier messages are not compared with what the agent saw (edit history by starting a new agent). The reply is parsed
with `agentsleep.runtime.chat.parse_reply`: reasoning goes to ``reasoning_content``, ``<tool_call>`` blocks (Hermes
JSON or Qwen3.5's XML) to ``tool_calls`` (an unreadable block becomes a call whose ``arguments`` is its raw text, which
OpenAI clients report as an invalid call). ``tool_choice`` ``"required"`` or a named function starts the reply with
the template's tool-call opener. Streaming is not offered here (``/v1/completions`` streams).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentsleep.errors import InvalidInput
from agentsleep.runtime.chat import (
    ROLES,
    TOOL_OPEN,
    ChatParts,
    InvalidToolCall,
    ParsedReply,
    ToolCall,
    check_tool,
    parse_reply,
)
from agentsleep.runtime.text import TextCodec

CHAT_PATH = "/v1/chat/completions"
# Chat-only request fields, handled here and not sent on to /v1/completions.
_CHAT_FIELDS = ("messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                "max_completion_tokens", "stream_options", "response_format", "logprobs", "top_logprobs",
                "add_generation_prompt", "continue_final_message", "return_token_ids", "function_call",
                "functions")  # fmt: skip
_UNSUPPORTED = {
    "stream": (None, False),
    "n": (None, 1),
    "logprobs": (None, False),
    "continue_final_message": (None, False),
    "add_generation_prompt": (None, True),
    "functions": (None,),
    "function_call": (None,),
}


@dataclass
class ChatRequest:
    """A chat request taken apart: the completion request to run, and the pieces its agent input is made of.

    Attributes:
        body: the ``/v1/completions`` request; its ``prompt`` is `new_ids` (checked, and the turn id's digest).
        head_ids: what opens a window: the system prompt with the tools, as the template renders them.
        history_ids: every message after the system prompt (a new agent hears the whole conversation).
        new_ids: the messages after the agent's last reply.
        tail_ids: the generation prompt, and a forced tool call's opener.
        end_ids: a reply's end as the template renders it (``<|im_end|>\\n``).
        tools: the tool schemas shown to the model (they type XML tool-call arguments).
        opener: the text of ``tail_ids`` after the generation prompt: the reply starts with it.
        return_token_ids: the client asked for the reply's token ids.
    """

    body: dict[str, Any]
    head_ids: list[int]
    history_ids: list[int]
    new_ids: list[int]
    tail_ids: list[int]
    end_ids: list[int]
    tools: list[dict[str, Any]] | None
    opener: str
    return_token_ids: bool

    def compose(self, window: Sequence[int] | None) -> list[int]:
        """The agent's input for a turn that starts from ``window`` (None: a new agent, S = 0)."""
        if window is None:
            return [*self.head_ids, *self.history_ids, *self.tail_ids]
        if not window:
            return [*self.head_ids, *self.new_ids, *self.tail_ids]
        return [*_rest_of(self.end_ids, window), *self.new_ids, *self.tail_ids]


def _rest_of(end: Sequence[int], window: Sequence[int]) -> list[int]:
    """What of the reply end ``end`` the window does not end with yet (a reply cut by length: all of it)."""
    for k in range(min(len(end), len(window)), 0, -1):
        if list(window[-k:]) == list(end[:k]):
            return list(end[k:])
    return list(end)


def openai_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as the dicts a chat template reads: text content joined, ``developer`` as ``system``,
    tool-call arguments as dicts (transformers' convention; Qwen3.5's template iterates them).

    Raises:
        InvalidInput: not a list of messages with a known role.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages must be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidInput(f"messages[{i}] must be an object with a role")
        role = ROLES.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidInput(f"messages[{i}] has role {m['role']!r}; expected system, developer, user, assistant "
                               "or tool")  # fmt: skip
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), i)}
        calls = m.get("tool_calls") or []
        if calls:
            msg["tool_calls"] = [_call(c, i) for c in calls]
        for key in ("tool_call_id", "name", "reasoning_content"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def _text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            else:
                raise InvalidInput(f"messages[{i}] holds a content part other than text; this model reads text only")
        return "".join(parts)
    raise InvalidInput(f"messages[{i}].content must be a string or a list of text parts")


def _call(call: Any, i: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise InvalidInput(f"messages[{i}].tool_calls must be OpenAI function calls with a name")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # the template shows a string as it is
    return {"id": call.get("id") or "", "type": "function", "function": {"name": fn["name"], "arguments": args}}


class ChatAdapter:
    """Chat completions on top of agent completions for one checkpoint (its tokenizer and chat template).

    Args:
        codec: the checkpoint's `TextCodec`; its ``chat`` must be set (the checkpoint ships a chat template).
    """

    def __init__(self, codec: TextCodec) -> None:
        if codec.chat is None:
            raise InvalidInput("this checkpoint ships no chat template: send agent turns to /v1/completions")
        self.codec, self.chat = codec, codec.chat

    def _encode(self, text: str) -> list[int]:
        return list(self.codec.tokenizer.encode(text, add_special_tokens=False).ids) if text else []

    def request(self, body: Mapping[str, Any]) -> ChatRequest:
        """Take a chat request apart (nothing runs yet).

        Raises:
            InvalidInput: a field agents do not support, malformed messages or tools, no new message after the
                agent's last reply, a ``tool_choice`` naming no given tool, or a template that cannot be rendered one
                message at a time.
        """
        for key, allowed in _UNSUPPORTED.items():
            if body.get(key) not in allowed:
                hint = "; stream agent turns on /v1/completions" if key == "stream" else ""
                raise InvalidInput(f"{key}={body[key]!r} is not supported for agent chat requests{hint}")
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
            raise InvalidInput("response_format is not supported for agent chat requests; use a forced tool call "
                               "(tool_choice) for structured output")  # fmt: skip
        messages = openai_messages(body.get("messages"))
        raw_tools = body.get("tools") or None
        if raw_tools is not None and not isinstance(raw_tools, list):
            raise InvalidInput("tools must be a list of function tools")
        tools = [check_tool(t) for t in raw_tools] if raw_tools else None
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise InvalidInput("chat_template_kwargs must be an object")
        if tools and not self.chat.supports_tools:
            raise InvalidInput("this checkpoint's chat template shows no tools; send the request without tools")
        parts = self.chat.parts(tools, **kwargs)
        plain = self.chat.parts(None, **kwargs)
        system = messages[0] if messages[0]["role"] == "system" else None
        rest = messages[1:] if system is not None else messages
        last = max((i for i, m in enumerate(rest) if m["role"] == "assistant"), default=-1)
        new = rest[last + 1 :]
        if not new:
            raise InvalidInput("the conversation ends with the agent's reply: add the new user (or tool) message; "
                               "the agent already holds everything up to its last reply")  # fmt: skip
        opener = self._opener(body.get("tool_choice"), tools, parts)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        out = {k: v for k, v in body.items() if k not in _CHAT_FIELDS}
        new_ids = [i for m in new for i in self._encode(plain.message(m))]
        out.update(prompt=new_ids, return_token_ids=True, stop_token_ids=self._stops(body))
        if max_tokens is not None:
            out["max_tokens"] = max_tokens
        return ChatRequest(
            body=out,
            head_ids=self._encode(parts.head(system)),
            history_ids=[i for m in rest for i in self._encode(plain.message(m))],
            new_ids=new_ids,
            tail_ids=self._encode(parts.generation_prompt + opener),
            end_ids=self._encode(parts.reply_end),
            tools=tools,
            opener=opener,
            return_token_ids=bool(body.get("return_token_ids")),
        )

    def _stops(self, body: Mapping[str, Any]) -> list[int]:
        given = body.get("stop_token_ids") or []
        if not isinstance(given, list):
            raise InvalidInput("stop_token_ids must be a list of token ids")
        return list(dict.fromkeys([*given, *self.codec.stop_token_ids]))

    @staticmethod
    def _opener(choice: Any, tools: list[dict[str, Any]] | None, parts: ChatParts) -> str:
        """The text a forced tool call starts the reply with ("" when the model decides)."""
        if choice in (None, "auto", "none"):
            return ""
        names = [t.get("function", {}).get("name") for t in tools or []]
        if choice == "required":
            name = None
        elif isinstance(choice, Mapping) and isinstance((choice.get("function") or {}).get("name"), str):
            name = choice["function"]["name"]
            if name not in names:
                raise InvalidInput(f"tool_choice names {name!r}, which is not among the tools: {names}")
        else:
            raise InvalidInput(f"tool_choice must be 'auto', 'none', 'required' or a function, got {choice!r}")
        if not tools:
            raise InvalidInput("tool_choice asks for a tool call but no tools were given")
        opener = parts.tool_call_opener(name)
        if opener is None:
            raise InvalidInput("this checkpoint's chat template has no tool-call format; tool_choice cannot force one")
        return opener

    def response(self, completion: dict[str, Any], req: ChatRequest, body: Mapping[str, Any]) -> dict[str, Any]:
        """The chat completion of an agent turn's completion (``kv_transfer_params`` and usage kept)."""
        choices = []
        for c in completion.get("choices") or []:
            ids = [int(t) for t in c.get("token_ids") or []]
            body_ids = ids[:-1] if ids and ids[-1] in self.codec.stop_token_ids else ids
            text = req.opener + (self.codec.decode(body_ids) if "token_ids" in c else c.get("text") or "")
            parsed = _parse(text, req.tools if body.get("tool_choice") != "none" else None)
            calls, bad = parsed.tool_calls, parsed.invalid_tool_calls
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content or (None if calls or bad else "")}
            if calls or bad:
                message["tool_calls"] = [*map(_openai_call, calls), *map(_openai_invalid, bad)]
            if parsed.reasoning:
                message["reasoning_content"] = parsed.reasoning
            finish = c.get("finish_reason")
            out: dict[str, Any] = {
                "index": c.get("index", 0),
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if calls and finish == "stop" else finish,
                "stop_reason": c.get("stop_reason"),
            }
            if req.return_token_ids:
                out["token_ids"] = ids
            choices.append(out)
        cid = str(completion.get("id") or "")
        return {
            **{k: v for k, v in completion.items() if k not in ("choices", "object", "id")},
            "id": "chatcmpl-" + cid.removeprefix("cmpl-"),
            "object": "chat.completion",
            "choices": choices,
        }


def _parse(text: str, tools: list[dict[str, Any]] | None) -> ParsedReply:
    """Reasoning, content and tool calls; without tools offered, tool-call blocks stay in the content."""
    if tools:
        return parse_reply(text, tools)
    plain = parse_reply(text.replace(TOOL_OPEN, "\x00"), None)
    return ParsedReply(content=plain.content.replace("\x00", TOOL_OPEN), reasoning=plain.reasoning)


def _openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.args, ensure_ascii=False)}}  # fmt: skip


def _openai_invalid(call: InvalidToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name or "", "arguments": call.text}}


Message = MutableMapping[str, Any]


def converting(send: Callable[[Message], Awaitable[None]], convert: Callable[[dict], dict]) -> Callable[..., Any]:
    """An ASGI ``send`` that hands a successful JSON answer to ``convert`` before sending it (errors pass as they are:
    their OpenAI error form is the same for chat and completions)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(msg: Message) -> None:
        nonlocal start
        if msg["type"] == "http.response.start":
            start = msg
            return
        if msg["type"] != "http.response.body" or start is None:
            return await send(msg)
        chunks.append(msg.get("body", b""))
        if msg.get("more_body"):
            return None
        payload = b"".join(chunks)
        if int(start["status"]) == 200:
            payload = json.dumps(convert(json.loads(payload))).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return None

    return wrapped


__all__ = ["CHAT_PATH", "ChatAdapter", "ChatRequest", "converting", "openai_messages"]
