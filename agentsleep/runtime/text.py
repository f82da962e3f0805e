"""Text <-> token ids through a checkpoint's ``tokenizer.json``, with the input checks a turn needs."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from agentsleep.errors import InvalidInput

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


class TextCodec:
    """Encodes turns to ids and ids back to text with a `tokenizers.Tokenizer`.

    No special tokens are added on encode: the model prepends its own BOS once per window, not once per turn.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TextCodec:
        """Load ``tokenizer.json`` (or the one inside a checkpoint directory).

        Raises:
            InvalidInput: no such file, or it cannot be parsed.
        """
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise InvalidInput(f"no tokenizer at {p}; pass a tokenizer.json or a checkpoint directory holding one")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(p)))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise InvalidInput(f"cannot load tokenizer {p}: {e}") from e

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


__all__ = ["TOKENIZER_FILE", "TextCodec"]
