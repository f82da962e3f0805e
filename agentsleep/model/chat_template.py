"""A checkpoint's chat template: messages in, prompt text out, exactly as transformers renders it.

`ChatFormat.from_pretrained(dir)` reads the Jinja chat template a Hugging Face checkpoint ships
(``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``) and renders it exactly as transformers'
``tokenizer.apply_chat_template`` does: the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``{% generation %}`` tag), the same ``tojson`` filter (no HTML escaping, ``ensure_ascii=False``),
``raise_exception`` and ``strftime_now``, and the tokenizer's named special tokens (``eos_token`` …) as variables.
Tools are JSON schemas (OpenAI's ``{"type": "function", "function": {...}}``) and reach the template as ``tools``.
`ChatFormat.parts()` takes a whole-conversation template apart (`ChatParts`) so a sleeping agent's window can render
a conversation one message at a time.

It lives in the model layer because it is part of a checkpoint's text interface and both training (chat fine-tuning
data, `agentsleep.train.chat_data`) and the runtime (`agentsleep.runtime.chat`, which re-exports it beside the reply
parser) need it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from agentsleep.errors import CheckpointError, InvalidInput

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
LEGACY_TEMPLATE_FILE = "chat_template.json"  # {"chat_template": "..."}, written by some processors
NAMED_TEMPLATES_DIR = "additional_chat_templates"
# The named special tokens transformers hands to a template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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
        self._parts: dict[str, ChatParts] = {}

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

    def parts(self, tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> ChatParts:
        """The template's pieces for rendering a conversation one message at a time (`ChatParts`), cached per
        ``tools`` and template variables (``kwargs``, e.g. ``enable_thinking=False``).

        Raises:
            InvalidInput: the template cannot be taken apart per message (it renders a message differently depending
                on what follows it, beyond the last-message cases `ChatParts` handles).
        """
        key = json.dumps([tools, kwargs], sort_keys=True, default=str)
        got = self._parts.get(key)
        if got is None:
            got = self._parts[key] = ChatParts(self, tools, kwargs)
        return got

    def __repr__(self) -> str:
        return f"ChatFormat(templates={sorted(self.templates)}, stop_tokens={self.stop_tokens})"


_PROBES = ("\x01agentsleep probe A\x01", "\x02agentsleep probe B\x02")  # contents that differ at the first char
_CONTEXT = ({"role": "user", "content": "\x03"}, {"role": "assistant", "content": "\x04"})
_PROBE_TOOL = "agentsleep_probe_tool"


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class ChatParts:
    """A whole-conversation chat template taken apart so that a conversation can be rendered one message at a time,
    each message exactly once, in the order it happens — what a sleeping agent's window needs (docs/langchain.md,
    "Whole-conversation templates"): earlier turns are in its fast weights, never re-rendered.

    Every piece is the template's own text, found by rendering probe conversations and differencing:

    * `head(system)`: what opens a conversation — the system prompt with the tools (Qwen puts them there), or the
      tools alone, or a default system prompt the template adds; ``""`` if nothing;
    * `message(m)`: a message after a finished exchange and before a further user message (so a template's
      look-ahead, e.g. Qwen dropping ``<think>`` from earlier turns or grouping consecutive tool results, renders it
      as in the middle of a conversation);
    * `generation_prompt`: what opens the model's reply; `reply_end`: what closes an assistant message after its
      text (``<|im_end|>\n``);
    * `tool_call_opener(name)`: how a reply starts a tool call (``<tool_call>\n{"name": "`` …), for forcing one.

    For ChatML-style templates (Qwen) ``head + message(m1) + … + generation_prompt`` equals the template's rendering
    of the whole conversation whenever the template would render every message as in the middle (no parallel tool
    results, no reasoning in the last reply); tested against `ChatFormat.render`.
    """

    def __init__(self, chat: ChatFormat, tools: Sequence[Mapping[str, Any]] | None, kwargs: dict[str, Any]) -> None:
        self.chat, self.tools, self.kwargs = chat, tools, kwargs
        first = [dict(_CONTEXT[0])]
        with_probe = self._render([*first, {"role": "user", "content": _PROBES[0]}])
        other = self._render([*first, {"role": "user", "content": _PROBES[1]}])
        alone = self._render(first)
        cut = with_probe[: _common_prefix(with_probe, other)]
        if not cut.startswith(alone):
            raise self._undecomposable("a user message renders differently when another follows it")
        self.user_header = cut[len(alone) :]  # what opens a user message in the middle of a conversation
        opened = self._render(first, add_generation_prompt=True)
        if not opened.startswith(alone):
            raise self._undecomposable("the generation prompt is not appended after the conversation")
        self.generation_prompt = opened[len(alone) :]
        marker = "\x05"
        reply = self.message({"role": "assistant", "content": marker})
        self.assistant_header, _, self.reply_end = reply.partition(marker)
        call = {"type": "function", "function": {"name": _PROBE_TOOL, "arguments": {}}}
        called = self.message({"role": "assistant", "content": "", "tool_calls": [call]})
        self._call_text = called.removeprefix(self.assistant_header).removesuffix(self.reply_end)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.chat.render(messages, tools=self.tools, add_generation_prompt=add_generation_prompt, **self.kwargs)

    def _undecomposable(self, why: str) -> InvalidInput:
        return InvalidInput(f"this chat template cannot be rendered one message at a time ({why})")

    def upto(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The text of ``messages`` as it renders when a further user message follows."""
        a = self._render([*map(dict, messages), {"role": "user", "content": _PROBES[0]}])
        b = self._render([*map(dict, messages), {"role": "user", "content": _PROBES[1]}])
        cut = a[: _common_prefix(a, b)]
        if not cut.endswith(self.user_header):
            raise self._undecomposable("a user message opens differently after these messages")
        return cut[: len(cut) - len(self.user_header)]

    def head(self, system: Mapping[str, Any] | None = None) -> str:
        """What opens a conversation: the system message (with the tools, where the template puts them there)."""
        return self.upto([system] if system is not None else [])

    def message(self, message: Mapping[str, Any]) -> str:
        """One message as the template renders it after an exchange and before a further user message."""
        before = self.upto(_CONTEXT)
        after = self.upto([*_CONTEXT, message])
        if not after.startswith(before):
            raise self._undecomposable(f"a {message.get('role')!r} message changes the messages before it")
        return after[len(before) :]

    def tool_call_opener(self, name: str | None = None) -> str | None:
        """The text a reply starts a tool call with (to ``name``, or to any tool up to where the name goes); None if
        the template renders no tool calls."""
        at = self._call_text.find(_PROBE_TOOL)
        if at < 0:
            return None
        return self._call_text[:at] + (name or "")


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


__all__ = [
    "CHAT_TEMPLATE_FILE",
    "GENERATION_CONFIG_FILE",
    "LEGACY_TEMPLATE_FILE",
    "NAMED_TEMPLATES_DIR",
    "SPECIAL_TOKENS_FILE",
    "SPECIAL_TOKEN_NAMES",
    "TOKENIZER_CONFIG_FILE",
    "ChatFormat",
    "check_tool",
    "load_templates",
]
