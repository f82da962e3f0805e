"""Text <-> token ids through a checkpoint's ``tokenizer.json``, with the input checks a turn needs, and its chat
template (`agentsleep.runtime.chat`) for conversations."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from agentsleep.errors import InvalidInput
from agentsleep.runtime.chat import GENERATION_CONFIG_FILE, ChatFormat, as_chat_messages

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def generation_eos_ids(path: Path) -> list[int]:
    """``eos_token_id`` (an int or a list) of a checkpoint's ``generation_config.json``; empty if absent."""
    f = path / GENERATION_CONFIG_FILE
    try:
        eos = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        logger.warning("%s is not valid JSON; ignoring its stop tokens", f)
        return []
    eos = [eos] if isinstance(eos, int) else eos
    return [int(t) for t in eos or [] if isinstance(t, int)]


class TextCodec:
    """Encodes turns to ids and ids back to text with a `tokenizers.Tokenizer`; with the checkpoint's chat template
    (`ChatFormat`, if it ships one) it also turns a conversation into the prompt ids the model was trained on.

    No special tokens are added on encode: the model prepends its own BOS once per window, not once per turn.

    Args:
        tokenizer: the checkpoint's tokenizer.
        chat: its chat template, if any.
        stop_token_ids: ids that end a reply (``generation_config.json``'s ``eos_token_id`` and the template's EOS).
    """

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, chat: ChatFormat | None = None, stop_token_ids: Sequence[int] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        ids = list(stop_token_ids)
        for tok in chat.stop_tokens if chat is not None else ():
            tid = tokenizer.token_to_id(tok)
            if tid is not None:
                ids.append(tid)
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TextCodec:
        """Load ``tokenizer.json`` (or the one inside a checkpoint directory), with the chat template and the stop
        tokens the directory holding it ships (``chat_template.jinja`` / ``tokenizer_config.json``,
        ``generation_config.json``).

        Raises:
            InvalidInput: no such file, or it cannot be parsed.
            CheckpointError: a chat template or config file next to it is malformed.
        """
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise InvalidInput(f"no tokenizer at {p}; pass a tokenizer.json or a checkpoint directory holding one")
        try:
            tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise InvalidInput(f"cannot load tokenizer {p}: {e}") from e
        return cls(tok, ChatFormat.from_pretrained(p.parent), generation_eos_ids(p.parent))

    def chat_prompt(
        self,
        messages: Sequence[Any],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids of a conversation rendered with the checkpoint's chat template (tools in the prompt, if the
        template defines them): ``apply_chat_template(..., tokenize=True)`` of transformers.

        ``messages``: dicts (``role``, ``content`` …) or message objects (see `as_chat_messages`).

        Raises:
            InvalidInput: the checkpoint ships no chat template, or the template refused the conversation.
        """
        if self.chat is None:
            raise InvalidInput("this tokenizer's checkpoint ships no chat template; encode plain text instead")
        text = self.chat.render(
            as_chat_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str | bytes | bytearray | memoryview) -> list[int]:
        """Token ids of one turn.

        Raises:
            InvalidInput: bytes that are not UTF-8, a str that cannot be UTF-8 encoded (lone surrogates), text that
                is empty or yields no token, or text the tokenizer rejects.
        """
        if isinstance(text, bytes | bytearray | memoryview):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(
                    f"turn bytes are not valid UTF-8 (byte {e.start}: {e.reason}); decode them with their real "
                    "encoding and pass str"
                ) from e
        if not isinstance(text, str):
            raise InvalidInput(f"text must be str or UTF-8 bytes, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInput(f"text holds characters that are not valid Unicode ({e.reason}) at {e.start}") from e
        if not text.strip():
            raise InvalidInput("the turn is empty: send at least one token of text")
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. a WordLevel vocabulary without an unknown token
            raise InvalidInput(f"the tokenizer cannot encode this text: {e}") from e
        if not ids:
            raise InvalidInput("the turn encodes to no tokens with this model's tokenizer")
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


__all__ = ["TOKENIZER_FILE", "TextCodec", "generation_eos_ids"]
