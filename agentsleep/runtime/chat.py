"""A checkpoint's own chat template and tool-call format: messages in, prompt text out; model text in, tool calls out.

`ChatFormat.from_pretrained(dir)` reads the Jinja chat template a Hugging Face checkpoint ships
(``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``) and renders it exactly as transformers'
``tokenizer.apply_chat_template`` does: the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``{% generation %}`` tag), the same ``tojson`` filter (no HTML escaping, ``ensure_ascii=False``),
``raise_exception`` and ``strftime_now``, and the tokenizer's named special tokens (``eos_token`` …) as variables.
Tools are JSON schemas (OpenAI's ``{"type": "function", "function": {...}}``, which LangChain's
``convert_to_openai_tool`` produces) and reach the template as ``tools``, so a template that defines tools (Qwen's do)
puts them into the system prompt itself.

`parse_reply` reads the model's reply: optional ``<think>…</think>`` reasoning, then content with Qwen-style tool calls,
either Hermes JSON (``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, Qwen2.5 / Qwen3) or the XML form of
Qwen3-Coder / Qwen3.5 (``<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>``).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentsleep.errors import InvalidInput
from agentsleep.model.chat_template import (  # rendering lives in the model layer: training renders chat data too
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    LEGACY_TEMPLATE_FILE,
    NAMED_TEMPLATES_DIR,
    SPECIAL_TOKEN_NAMES,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    ChatFormat,
    ChatParts,
    check_tool,
    load_templates,
)

logger = logging.getLogger(__name__)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CLOSE) + r"|\Z)", re.DOTALL)
_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model made (LangChain's ``ToolCall``: ``name``, ``args``, ``id``)."""

    name: str
    args: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_langchain(self) -> dict[str, Any]:
        """``{"name", "args", "id", "type": "tool_call"}``: what ``AIMessage(tool_calls=[...])`` takes."""
        return {"name": self.name, "args": dict(self.args), "id": self.id, "type": "tool_call"}

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI message form a chat template reads back (``tool_call.function.name`` / ``.arguments``)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": dict(self.args)}}


@dataclass(frozen=True)
class InvalidToolCall:
    """A ``<tool_call>`` block that could not be read (LangChain's ``InvalidToolCall``)."""

    text: str
    error: str
    name: str | None = None
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_langchain(self) -> dict[str, Any]:
        return {"name": self.name, "args": self.text, "id": self.id, "error": self.error, "type": "invalid_tool_call"}


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into its parts: ``content`` is the text left once reasoning and tool calls are taken out."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()
    reasoning: str | None = None


# ---------------------------------------------------------------------------------------------------- messages


ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "developer": "system"}


def as_chat_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Message-like objects as the dicts a chat template reads (``role``, ``content``, ``tool_calls``,
    ``tool_call_id``, ``name``), without importing LangChain.

    Accepts dicts (passed through), ``(role, content)`` pairs, strings (user turns), and objects with ``.type`` and
    ``.content`` (LangChain messages: ``human`` → ``user``, ``ai`` → ``assistant``; a ``ChatMessage``'s ``.role`` is
    kept). Text content blocks are joined; an AI message's ``tool_calls`` become OpenAI-style calls with their
    arguments as a dict.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, Mapping):
            out.append(dict(m))
        elif isinstance(m, str):
            out.append({"role": "user", "content": m})
        elif isinstance(m, tuple) and len(m) == 2:
            out.append({"role": ROLES.get(str(m[0]), str(m[0])), "content": _text(m[1])})
        elif hasattr(m, "content"):
            role = getattr(m, "role", None) or ROLES.get(getattr(m, "type", ""), getattr(m, "type", "user"))
            msg: dict[str, Any] = {"role": role, "content": _text(m.content)}
            calls = getattr(m, "tool_calls", None) or []
            if calls:
                msg["tool_calls"] = [
                    ToolCall(name=c["name"], args=dict(c.get("args") or {}), id=c.get("id") or "").to_openai()
                    for c in calls
                ]
            if getattr(m, "tool_call_id", None):
                msg["tool_call_id"] = m.tool_call_id
            if getattr(m, "name", None):
                msg["name"] = m.name
            out.append(msg)
        else:
            raise InvalidInput(f"cannot render a {type(m).__name__} as a chat message; pass dicts or messages")
    return out


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and isinstance(block.get("text"), str):
            parts.append(block["text"])
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------- parsing


def _schema_types(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """tool name -> {parameter: JSON-schema type} for typing XML parameter values."""
    out: dict[str, dict[str, Any]] = {}
    for t in tools or ():
        fn = t.get("function", t)
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[str(fn.get("name"))] = {k: (v or {}).get("type") for k, v in props.items() if isinstance(v, Mapping)}
    return out


def _typed(value: str, kind: Any) -> Any:
    """An XML parameter value as its schema type: strings stay strings, anything else is read as JSON if it can be."""
    if kind == "string" or kind is None:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _one_call(body: str, types: dict[str, dict[str, Any]]) -> ToolCall | InvalidToolCall:
    text = body.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args) if args.strip() else {}
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError("name must be a string and arguments an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return InvalidToolCall(text=text, error=f"not a JSON tool call ({type(e).__name__}: {e})")
        return ToolCall(name=name, args=args)
    fn = _XML_FUNCTION.search(text)
    if fn is None:
        return InvalidToolCall(text=text, error="neither JSON nor <function=...> inside <tool_call>")
    name = fn.group(1).strip()
    params = {}
    for m in _XML_PARAMETER.finditer(fn.group(2)):
        value = m.group(2)
        value = value[1:] if value.startswith("\n") else value  # the template's own line breaks around the value
        value = value[:-1] if value.endswith("\n") else value
        params[m.group(1).strip()] = _typed(value, types.get(name, {}).get(m.group(1).strip()))
    return ToolCall(name=name, args=params)


def parse_reply(text: str, tools: Sequence[Mapping[str, Any]] | None = None) -> ParsedReply:
    """Split a generated reply into reasoning, content and tool calls (see the module docstring for the formats).

    Args:
        text: the decoded reply (special tokens kept), without the prompt.
        tools: the tool schemas the prompt offered; they type XML parameter values (a string parameter stays a
            string, others are read as JSON).

    Returns:
        A `ParsedReply`. A block that cannot be read becomes an `InvalidToolCall` (never an exception): the model's
        output must not be able to fail the turn.
    """
    reasoning = None
    if THINK_CLOSE in text:
        head, text = text.split(THINK_CLOSE, 1)
        reasoning = head.replace(THINK_OPEN, "", 1).strip()
    types = _schema_types(tools)
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for m in _TOOL_BLOCK.finditer(text):
        call = _one_call(m.group(1), types)
        (calls if isinstance(call, ToolCall) else invalid).append(call)  # type: ignore[arg-type]
    content = _TOOL_BLOCK.sub("", text).strip()
    return ParsedReply(content=content, tool_calls=tuple(calls), invalid_tool_calls=tuple(invalid), reasoning=reasoning)


__all__ = [
    "CHAT_TEMPLATE_FILE",
    "GENERATION_CONFIG_FILE",
    "LEGACY_TEMPLATE_FILE",
    "NAMED_TEMPLATES_DIR",
    "SPECIAL_TOKENS_FILE",
    "SPECIAL_TOKEN_NAMES",
    "TOKENIZER_CONFIG_FILE",
    "ChatFormat",
    "ChatParts",
    "InvalidToolCall",
    "ParsedReply",
    "ToolCall",
    "as_chat_messages",
    "check_tool",
    "load_templates",
    "parse_reply",
]
