r"""How chat messages become the hybrid's token ids: a small, declarative, *token-compositional* chat template.

A message renders as ``prefix(role) + content + suffix``, and each of the three pieces is tokenised on its own, so the
tokens of a conversation are the concatenation of the tokens of its messages:

    tokens(m1, ..., mk) == tokens(m1) + ... + tokens(mk)

That property is what lets `ChatSleepHybrid` keep the engine's attention window equal to "the messages since the last
sleep" by appending only the tokens of new messages (a prefix check on token ids), and what lets `SleepMemory` know
which messages a sleep consolidated. A whole-conversation Jinja template (the Hugging Face convention) does not have
it: BPE merges across message boundaries, and a template may look at later messages.

Where the template comes from, first match wins:

1. ``ChatSleepHybrid(chat_template=ChatTemplate(...))``;
2. the checkpoint's ``config.json`` under ``"agentsleep": {"chat_template": {...}}`` (the fields of `ChatTemplate`;
   loading the model ignores that section, and it is not part of the model fingerprint);
3. built in: role tokens (``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|tool|>`` and ``<|end|>``) when the
   tokenizer's vocabulary has ``<|user|>``, ``<|assistant|>`` and ``<|end|>``; otherwise plain ``role: content`` lines.

When the suffix is a single token (``<|end|>``, or ``\n`` under a byte-level tokenizer), generation stops at it.

A checkpoint that ships a Hugging Face chat template (an imported model, `agentsleep.runtime.chat.ChatFormat`) is
rendered with *that* template instead, one message at a time (`TemplateCodec`, on `ChatParts`): each message is the
template's own text for it in the middle of a conversation, the system prompt and the tools open the window, the
model's replies stay as it generated them. That keeps the composition property above (docs/langchain.md,
"Whole-conversation templates").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentsleep.errors import CheckpointError, ConfigError, InvalidInput
from agentsleep.model.fingerprint import accepted
from agentsleep.runtime.chat import ChatFormat, ChatParts, as_chat_messages
from agentsleep.runtime.text import TOKENIZER_FILE, TextCodec  # noqa: F401  (TOKENIZER_FILE: kept as this module's name)
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, convert_to_messages
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import tokenizers

CONFIG_FILE = "config.json"
CONFIG_SECTION = "agentsleep"
CONFIG_KEY = "chat_template"
METADATA_KEY = "agentsleep"  # key of AIMessage.response_metadata where ChatSleepHybrid records the reply's token ids

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
END_TOKEN = "<|end|>"


class ChatTemplate(BaseModel):
    r"""A per-message chat template: ``prefix.format(role=...) + content + suffix``, each piece tokenised alone.

    Example:
        >>> t = ChatTemplate.plain()
        >>> t.prefix.format(role="user") + "hello" + t.suffix
        'user: hello\n'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    roles: dict[str, str] = Field(
        default_factory=lambda: {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"},
        description="LangChain message type -> role name; a `ChatMessage` uses its own `.role`; unknown types use "
        "the type itself.",
    )
    prefix: str = Field("{role}: ", description="text before a message's content; '{role}' is replaced")
    suffix: str = Field("\n", description="text after a message's content; a single-token suffix stops generation")
    tool_call: str = Field(
        "\n{json}", description="how an AI message's tool call is appended to its content; '{json}' is replaced"
    )
    generation_role: str = Field("assistant", description="role whose prefix opens the model's reply")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(f"invalid chat template: {e}") from e

    @classmethod
    def plain(cls) -> ChatTemplate:
        """``role: content`` lines, for tokenizers without role tokens."""
        return cls()

    @classmethod
    def role_tokens(cls) -> ChatTemplate:
        """``<|role|>content<|end|>``, for tokenizers that have the role tokens as (special) tokens."""
        return cls(prefix="<|{role}|>", suffix=END_TOKEN, tool_call="{json}")

    @classmethod
    def default_for(cls, tokenizer: tokenizers.Tokenizer) -> ChatTemplate:
        """The built-in template that suits ``tokenizer``: role tokens if it has them, else plain lines."""
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if all(t in vocab for t in ("<|user|>", "<|assistant|>", END_TOKEN)):
            return cls.role_tokens()
        return cls.plain()

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], tokenizer: tokenizers.Tokenizer | None = None
    ) -> ChatTemplate:
        """The template of a checkpoint directory.

        ``config.json["agentsleep"]["chat_template"]`` if present, else the built-in default for its tokenizer.

        Raises:
            CheckpointError: ``config.json`` is unreadable, or its template section is malformed.
            InvalidInput: no template section and no tokenizer to choose a default with.
        """
        configured = cls.configured(path)
        if configured is not None:
            return configured
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        return cls.default_for(tokenizer)

    @classmethod
    def configured(cls, path: str | os.PathLike[str]) -> ChatTemplate | None:
        """The template ``config.json["agentsleep"]["chat_template"]`` of a checkpoint directory sets, if any.

        Raises:
            CheckpointError: ``config.json`` is unreadable, or its template section is malformed.
        """
        cfg_file = Path(path) / CONFIG_FILE
        if not cfg_file.is_file():
            return None
        try:
            raw = json.loads(cfg_file.read_text())
            section = raw.get(CONFIG_SECTION, {}).get(CONFIG_KEY) if isinstance(raw, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON with an object at the top: {e}") from e
        if section is None:
            return None
        if not isinstance(section, dict):
            raise CheckpointError(f"{cfg_file}: {CONFIG_SECTION}.{CONFIG_KEY} must be an object, got {section!r}")
        try:
            return cls(**section)
        except ConfigError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from e

    def role_of(self, message: BaseMessage) -> str:
        """The role name a message renders with."""
        if isinstance(message, ChatMessage):
            return message.role
        return self.roles.get(message.type, message.type)


def load_tokenizer(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """A ``tokenizer.json`` (or the one inside a checkpoint directory), loaded as the engines load it.

    Raises:
        InvalidInput: no such file, or it cannot be parsed.
    """
    return TextCodec.from_file(path).tokenizer


def content_digest(text: str) -> str:
    """Short hash of a reply's text, stored beside its token ids so an edited message is re-tokenised instead."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class ChatCodec:
    """A `ChatTemplate` bound to a tokenizer: messages to token ids and back.

    Also a LangChain ``TokenCounter``: ``codec(messages)`` is the exact number of tokens those messages take in the
    hybrid's window, so it can be passed to ``SummarizationMiddleware(token_counter=...)`` or ``trim_messages``.

    Args:
        tokenizer: the checkpoint's `tokenizers.Tokenizer`.
        template: the chat template.
        fingerprint: the model's fingerprint; an AI reply's recorded token ids are reused only if they were produced
            by this model (otherwise its text is tokenised).
    """

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, template: ChatTemplate, *, fingerprint: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.fingerprint = fingerprint
        self._encode_piece = lru_cache(maxsize=256)(self._encode_uncached)
        self.generation_prefix: list[int] = self.prefix_ids(template.generation_role)
        self.end_ids: list[int] = self.encode(template.suffix)
        # A one-token suffix is the model's end-of-message: generation stops on it (and keeps it, see the engine).
        self.stop_token_ids: tuple[int, ...] = (self.end_ids[0],) if len(self.end_ids) == 1 else ()

    def __repr__(self) -> str:
        return f"ChatCodec(prefix={self.template.prefix!r}, suffix={self.template.suffix!r})"

    # ------------------------------------------------------------------ text

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        try:
            return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)
        except Exception as e:  # e.g. a WordLevel vocabulary without an unknown token
            raise InvalidInput(f"the model's tokenizer cannot encode {text[:40]!r}: {e}") from e

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added; empty text has none)."""
        if not text:
            return []
        if len(text) <= 64:  # role prefixes, suffixes, short turns: cached
            return list(self._encode_piece(text))
        return list(self._encode_uncached(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept, as the engine does)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def prefix_ids(self, role: str) -> list[int]:
        """Token ids of the prefix that opens a message of ``role``."""
        return self.encode(self.template.prefix.format(role=role))

    # ------------------------------------------------------------------ messages

    def body_ids(self, message: BaseMessage) -> list[int]:
        """The content tokens of one message (between its prefix and suffix).

        An AI reply produced by `ChatSleepHybrid` on this model carries its exact token ids in
        ``response_metadata["agentsleep"]``; they are used as long as the text was not edited, so the window holds
        exactly what the model generated (decoding and re-encoding is not always the identity).
        """
        if isinstance(message, AIMessage):
            meta = message.response_metadata.get(METADATA_KEY) if message.response_metadata else None
            if (
                isinstance(meta, dict)
                and isinstance(meta.get("token_ids"), list)
                and meta.get("fingerprint") in (accepted(self.fingerprint) if self.fingerprint else (None,))
                and meta.get("digest") == content_digest(message.text)
                and not message.tool_calls
            ):
                return [int(t) for t in meta["token_ids"]]
        ids = self.encode(message.text)
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                payload = json.dumps({"name": call["name"], "arguments": call["args"]}, ensure_ascii=False)
                ids += self.encode(self.template.tool_call.format(json=payload))
        return ids

    def message_ids(self, message: BaseMessage) -> list[int]:
        """``prefix + body + suffix`` tokens of one message."""
        return self.prefix_ids(self.template.role_of(message)) + self.body_ids(message) + self.end_ids

    def render(self, messages: Iterable[BaseMessage], tools: Sequence[Any] | None = None) -> list[list[int]]:
        """Token ids of each message, in order (their concatenation is the conversation's tokens).

        ``tools``: see `prompt`.
        """
        _no_tools(tools)
        return [self.message_ids(m) for m in messages]

    def head_ids(self, system: BaseMessage | None, tools: Sequence[Any] | None = None) -> list[int]:
        """The tokens that open the window: the system message's (none without one)."""
        _no_tools(tools)
        return self.message_ids(system) if system is not None else []

    def prompt(
        self, messages: Iterable[BaseMessage], tools: Sequence[Any] | None = None, opener: str = ""
    ) -> list[int]:
        """The conversation's tokens followed by the generation prefix (the start of the model's reply).

        ``tools`` (JSON schemas) are rendered by a template that defines them (`TemplateCodec`); this per-message
        template has none, so it refuses them. ``opener``: text the reply is made to start with (a forced tool call).
        """
        messages = list(messages)
        out = self.leading_ids(messages, tools)
        for part in self.render(messages, tools):
            out += part
        return out + self.generation_prefix + self.encode(opener)

    def leading_ids(self, messages: Sequence[BaseMessage], tools: Sequence[Any] | None = None) -> list[int]:
        """Tokens `prompt` puts before the first message's (none for this template)."""
        return []

    def count(self, messages: Iterable[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens the messages take in the window.

        A leading system message counts with the tools it opens with; see `leading_ids` for the head without one.
        """
        return sum(len(p) for p in self.render(messages, tools))

    @property
    def supports_tools(self) -> bool:
        """Whether tools can be rendered into the prompt and tool calls read from replies."""
        return False

    def tool_call_opener(self, name: str | None = None) -> str | None:
        """The text a reply opens a tool call with (to force one); None: this template has no tool calls."""
        return None

    def reply_digest(self, message: AIMessage) -> str:
        """What an AI reply's recorded token ids are checked against: a digest of its text (and tool calls)."""
        return content_digest(message.text)

    def __call__(self, messages: Iterable[Any]) -> int:
        """LangChain ``TokenCounter``: exact window tokens of message-likes (messages, dicts, tuples, strings)."""
        if isinstance(messages, str | BaseMessage):
            messages = [messages]
        return self.count(convert_to_messages(list(messages)))


def _no_tools(tools: Sequence[Any] | None) -> None:
    if tools:
        raise NotImplementedError(NO_TOOL_TEMPLATE)


NO_TOOL_TEMPLATE = (
    "this model's chat template cannot show tools to the model or read tool calls from its replies: tool calling "
    "needs a checkpoint whose Hugging Face chat template defines tools (an imported Qwen model's does; "
    "docs/pretrained.md). Use the model without tools, or another model for the tool-calling step"
)


def _calls_json(message: AIMessage) -> str:
    return json.dumps([[c["name"], c["args"]] for c in message.tool_calls], sort_keys=True, ensure_ascii=False)


class TemplateCodec(ChatCodec):
    """The checkpoint's own (Hugging Face, whole-conversation) chat template, rendered one message at a time.

    Pieces come from `agentsleep.runtime.chat.ChatParts`: the window opens with ``head(system, tools)``; every other
    message is the template's text for it in the middle of a conversation; the model's own replies are the tokens it
    generated (reasoning and tool-call markup included) between the generation prompt and the reply end. So
    ``tokens(m1..mk) = tokens(m1) + … + tokens(mk)`` holds as for `ChatCodec`, and each message is rendered once, in
    the order it happened. Tool calls in replies are read with `agentsleep.runtime.chat.parse_reply`.

    Args:
        tokenizer: the checkpoint's tokenizer.
        chat: its chat template (`TextCodec.chat`).
        fingerprint: the model's (recorded reply token ids are reused only from this model).
        stop_token_ids: the checkpoint's stop tokens (`TextCodec.stop_token_ids`); the reply end's first token joins.
        template_kwargs: template variables (e.g. ``{"enable_thinking": False}``).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat: ChatFormat,
        *,
        fingerprint: str | None = None,
        stop_token_ids: Sequence[int] = (),
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.template = None  # type: ignore[assignment]  # no per-message ChatTemplate
        self.fingerprint = fingerprint
        self.template_kwargs = dict(template_kwargs or {})
        self._encode_piece = lru_cache(maxsize=512)(self._encode_uncached)
        parts = self.parts(None)
        self.generation_prefix = self.encode(parts.generation_prompt)
        self.end_ids = self.encode(parts.reply_end)
        stops = list(stop_token_ids)
        if self.end_ids and tokenizer.decode(self.end_ids[:1], skip_special_tokens=True) == "":
            stops.append(self.end_ids[0])  # a special token ("<|im_end|>") closes the reply: generation stops at it
        self.stop_token_ids = tuple(dict.fromkeys(stops))
        self._supports_tools = chat.supports_tools and parts.tool_call_opener() is not None

    def __repr__(self) -> str:
        return f"TemplateCodec({self.chat!r})"

    def parts(self, tools: Sequence[Any] | None) -> ChatParts:
        """The template's pieces for these tools (cached by the `ChatFormat`)."""
        return self.chat.parts(list(tools) if tools else None, **self.template_kwargs)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        if not text:
            return []
        if len(text) <= 256:  # message headers, reply ends, tool blocks: cached
            return list(self._encode_piece(text))
        return list(self._encode_uncached(text))

    @property
    def supports_tools(self) -> bool:
        """True when the template reads ``tools`` and renders tool calls."""
        return self._supports_tools

    def tool_call_opener(self, name: str | None = None) -> str | None:
        """The text a reply opens a tool call with, in this template's format."""
        return self.parts(None).tool_call_opener(name) if self._supports_tools else None

    def reply_digest(self, message: AIMessage) -> str:
        """A digest of the reply's text and its tool calls (names and arguments)."""
        return content_digest(message.text + (_calls_json(message) if message.tool_calls else ""))

    def _check_tools(self, tools: Sequence[Any] | None) -> None:
        if tools and not self._supports_tools:
            raise NotImplementedError(NO_TOOL_TEMPLATE)

    def _own_reply(self, message: BaseMessage) -> list[int] | None:
        """The exact tokens of a reply this model generated (unedited), else None."""
        if not isinstance(message, AIMessage) or not message.response_metadata:
            return None
        meta = message.response_metadata.get(METADATA_KEY)
        if (
            isinstance(meta, dict)
            and isinstance(meta.get("token_ids"), list)
            and meta.get("fingerprint") in (accepted(self.fingerprint) if self.fingerprint else (None,))
            and meta.get("digest") == self.reply_digest(message)
        ):
            return [int(t) for t in meta["token_ids"]]
        return None

    def body_ids(self, message: BaseMessage) -> list[int]:
        """The model's own reply as generated, else the message's text."""
        own = self._own_reply(message)
        return own if own is not None else self.encode(message.text)

    def message_ids(self, message: BaseMessage) -> list[int]:
        """One message after others: the model's own reply as generated, any other as the template renders it."""
        own = self._own_reply(message)
        if own is not None:
            return self.generation_prefix + own + self.end_ids
        (data,) = as_chat_messages([message])
        return self.encode(self.parts(None).message(data))

    def head_ids(self, system: BaseMessage | None, tools: Sequence[Any] | None = None) -> list[int]:
        """The system prompt with the tools, as the template opens a conversation (Qwen: one system block)."""
        self._check_tools(tools)
        data = as_chat_messages([system])[0] if system is not None else None
        return self.encode(self.parts(tools).head(data))

    def render(self, messages: Iterable[BaseMessage], tools: Sequence[Any] | None = None) -> list[list[int]]:
        """One piece per message; a leading system message is the head (with the tools)."""
        self._check_tools(tools)
        out: list[list[int]] = []
        for i, m in enumerate(messages):
            out.append(self.head_ids(m, tools) if i == 0 and m.type == "system" else self.message_ids(m))
        return out

    def leading_ids(self, messages: Sequence[BaseMessage], tools: Sequence[Any] | None = None) -> list[int]:
        """The head the window opens with when no system message leads.

        That is the tools' block, or a default system prompt the template adds; empty for most templates.
        """
        if messages and messages[0].type == "system":
            return []
        return self.head_ids(None, tools)


__all__ = [
    "CONFIG_KEY",
    "CONFIG_SECTION",
    "END_TOKEN",
    "METADATA_KEY",
    "NO_TOOL_TEMPLATE",
    "ROLE_TOKENS",
    "ChatCodec",
    "ChatTemplate",
    "TemplateCodec",
    "content_digest",
    "load_tokenizer",
]
