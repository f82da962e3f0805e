"""A checkpoint's chat template: messages in, prompt text out, exactly as transformers renders it.

`ChatFormat.from_pretrained(dir)` reads the Jinja chat template a Hugging Face checkpoint ships
(``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``) and renders it exactly as transformers'
``tokenizer.apply_chat_template`` does: the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``{% generation %}`` tag), the same ``tojson`` filter (no HTML escaping, ``ensure_ascii=False``),
``raise_exception`` and ``strftime_now``, and the tokenizer's named special tokens (``eos_token`` …) as variables.
Tools are JSON schemas (OpenAI's ``{"type": "function", "function": {...}}``) and reach the template as ``tools``.

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
