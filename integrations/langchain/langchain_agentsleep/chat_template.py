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
        p = Path(path)
        cfg_file = p / CONFIG_FILE
        section: Any = None
        if cfg_file.is_file():
            try:
                section = json.loads(cfg_file.read_text()).get(CONFIG_SECTION, {}).get(CONFIG_KEY)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise CheckpointError(f"{cfg_file} is not valid JSON with an object at the top: {e}") from e
        if section is not None:
            if not isinstance(section, dict):
                raise CheckpointError(f"{cfg_file}: {CONFIG_SECTION}.{CONFIG_KEY} must be an object, got {section!r}")
            try:
                return cls(**section)
            except ConfigError as e:
                raise CheckpointError(f"{cfg_file}: {e}") from e
        if tokenizer is None:
            tokenizer = load_tokenizer(p)
        return cls.default_for(tokenizer)

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

    def render(self, messages: Iterable[BaseMessage]) -> list[list[int]]:
        """Token ids of each message, in order (their concatenation is the conversation's tokens)."""
        return [self.message_ids(m) for m in messages]

    def prompt(self, messages: Iterable[BaseMessage]) -> list[int]:
        """The conversation's tokens followed by the generation prefix (the start of the model's reply)."""
        out: list[int] = []
        for part in self.render(messages):
            out += part
        return out + self.generation_prefix

    def count(self, messages: Iterable[BaseMessage]) -> int:
        """Tokens the messages take in the window."""
        return sum(len(p) for p in self.render(messages))

    def __call__(self, messages: Iterable[Any]) -> int:
        """LangChain ``TokenCounter``: exact window tokens of message-likes (messages, dicts, tuples, strings)."""
        if isinstance(messages, str | BaseMessage):
            messages = [messages]
        return self.count(convert_to_messages(list(messages)))


__all__ = [
    "CONFIG_KEY",
    "CONFIG_SECTION",
    "END_TOKEN",
    "METADATA_KEY",
    "ROLE_TOKENS",
    "ChatCodec",
    "ChatTemplate",
    "content_digest",
    "load_tokenizer",
]
