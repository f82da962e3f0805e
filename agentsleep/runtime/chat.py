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
from datetime import datetime
from pathlib import Path
from typing import Any

from agentsleep.errors import CheckpointError, InvalidInput

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
LEGACY_TEMPLATE_FILE = "chat_template.json"  # {"chat_template": "..."}, written by some processors
NAMED_TEMPLATES_DIR = "additional_chat_templates"
# The named special tokens transformers hands to a template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CLOSE) + r"|\Z)", re.DOTALL)
_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


# ---------------------------------------------------------------------------------------------------- rendering


def _environment() -> Any:
    """The Jinja environment transformers renders chat templates in (utils/chat_template_utils.py), rebuilt."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}…{% endgeneration %}`` marks assistant text for training masks; rendering keeps it."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

        def _keep(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer configs store it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_templates(path: Path) -> dict[str, str]:
    """The chat templates of a checkpoint directory, by name ("default" for the main one); empty if it has none.

    Sources, as transformers reads them: ``chat_template.jinja`` (else ``chat_template`` in ``tokenizer_config.json``,
    a string or a list of ``{"name", "template"}``, else ``chat_template.json``), plus
    ``additional_chat_templates/NAME.jinja``.
    """
    templates: dict[str, str] = {}
    raw = _read_json(path / TOKENIZER_CONFIG_FILE).get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        templates.update({t["name"]: t["template"] for t in raw if isinstance(t, Mapping) and "name" in t})
    if "default" not in templates:
        legacy = _read_json(path / LEGACY_TEMPLATE_FILE).get("chat_template")
        if isinstance(legacy, str):
            templates["default"] = legacy
    if (path / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (path / CHAT_TEMPLATE_FILE).read_text()
    named = path / NAMED_TEMPLATES_DIR
    if named.is_dir():
        templates.update({p.stem: p.read_text() for p in sorted(named.glob("*.jinja"))})
    return templates


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


class ChatFormat:
    """A checkpoint's chat template with its special tokens: `render` equals transformers' ``apply_chat_template``.

    Args:
        templates: the template source by name ("default" = the main one; "tool_use" is chosen when tools are given,
            as transformers does).
        special_tokens: the named special tokens (``eos_token`` …) the template sees as variables.
        stop_tokens: strings that end a reply (the EOS tokens of ``generation_config.json`` and the tokenizer).
    """

    def __init__(
        self,
        templates: Mapping[str, str] | str,
        *,
        special_tokens: Mapping[str, str] | None = None,
        stop_tokens: Sequence[str] = (),
    ) -> None:
        self.templates = {"default": templates} if isinstance(templates, str) else dict(templates)
        if not self.templates:
            raise InvalidInput("a ChatFormat needs at least one template")
        self.special_tokens = dict(special_tokens or {})
        self.stop_tokens = tuple(dict.fromkeys(stop_tokens))
        self._compiled: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatFormat | None:
        """The chat format of a checkpoint directory, or None if it ships no chat template."""
        p = Path(path)
        templates = load_templates(p)
        if not templates:
            return None
        cfg = {**_read_json(p / SPECIAL_TOKENS_FILE), **_read_json(p / TOKENIZER_CONFIG_FILE)}
        special = {k: t for k in SPECIAL_TOKEN_NAMES if (t := _token_text(cfg.get(k))) is not None}
        stops = [special["eos_token"]] if "eos_token" in special else []
        return cls(templates, special_tokens=special, stop_tokens=stops)

    def template_for(self, tools: Sequence[Any] | None) -> str:
        """The template transformers would pick (``tool_use`` when tools are given and it exists)."""
        if tools and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        if len(self.templates) == 1:
            return next(iter(self.templates))
        raise InvalidInput(f"the checkpoint has several chat templates {sorted(self.templates)} and none is 'default'")

    @property
    def supports_tools(self) -> bool:
        """Whether a template reads the ``tools`` variable (so tools given to `render` reach the prompt)."""
        import jinja2.meta

        env = _environment()
        return any("tools" in jinja2.meta.find_undeclared_variables(env.parse(t)) for t in self.templates.values())

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt text of ``messages`` (dicts with ``role``, ``content``, optional ``tool_calls`` …).

        Equals ``tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False,
        **kwargs)``; ``kwargs`` (e.g. ``enable_thinking=False``) reach the template as variables.

        Raises:
            InvalidInput: no messages, a tool that is not a JSON-schema dict, or the template itself refused the
                conversation (``raise_exception``, e.g. roles out of order).
        """
        import jinja2

        if not messages:
            raise InvalidInput("cannot render an empty conversation: pass at least one message")
        schemas = None if tools is None else [check_tool(t) for t in tools]
        name = self.template_for(schemas)
        template = self._compiled.get(name)
        if template is None:
            try:
                template = self._compiled[name] = _environment().from_string(self.templates[name])
            except jinja2.TemplateSyntaxError as e:
                raise CheckpointError(f"the checkpoint's chat template {name!r} does not parse: {e}") from e
        try:
            return template.render(
                messages=[dict(m) for m in messages], tools=schemas, documents=None,
                add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs},
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise InvalidInput(f"the chat template refused this conversation: {e}") from e

    def __repr__(self) -> str:
        return f"ChatFormat(templates={sorted(self.templates)}, stop_tokens={self.stop_tokens})"


def check_tool(tool: Any) -> dict[str, Any]:
    """A tool as a JSON-schema dict, passed to the template unchanged (as transformers does with dict tools)."""
    if not isinstance(tool, Mapping):
        raise InvalidInput(
            f"tools must be JSON-schema dicts ({{'type': 'function', 'function': {{...}}}}), got "
            f"{type(tool).__name__}; with LangChain use langchain_core.utils.function_calling.convert_to_openai_tool"
        )
    fn = tool.get("function", tool)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise InvalidInput(f"a tool needs a name: {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}")
    return dict(tool)


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
    "ChatFormat",
    "InvalidToolCall",
    "ParsedReply",
    "ToolCall",
    "as_chat_messages",
    "check_tool",
    "load_templates",
    "parse_reply",
]
