"""Text in and out through a checkpoint's tokenizer.json, and the input checks on text."""

from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from agentsleep.errors import InvalidInput
from agentsleep.runtime import SamplingParams, TextCodec, TorchEngine

from .helpers import VOCAB, make_model

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.?"  # 38 characters + <pad>, <bos> = 40 ids = VOCAB


def char_tokenizer() -> Tokenizer:
    vocab = {"<pad>": 0, "<bos>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    return tok


@pytest.fixture
def engine(tmp_path) -> TorchEngine:
    ckpt = make_model().save_pretrained(tmp_path / "ckpt")
    char_tokenizer().save(str(ckpt / "tokenizer.json"))
    return TorchEngine.from_pretrained(ckpt)


def test_from_pretrained_picks_up_the_tokenizer(engine):
    ids = engine.encode("ab 9?")
    assert ids == [2, 3, 37, 39]
    assert engine.decode(ids).replace(" ", "") == "ab9?"
    assert engine.encode(b"ab") == [2, 3]
    engine.create_agent("a")
    out = engine.generate("a", engine.encode("hello"), SamplingParams(max_new_tokens=4))
    assert isinstance(engine.decode(out.tokens), str)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        (b"\xff\xfe bad", "not valid UTF-8"),
        ("a\ud800b", "not valid Unicode"),
        ("ABC", "cannot encode"),  # no such characters and no unknown token
        (42, "must be str"),
    ],
    ids=["empty", "whitespace", "non-utf8", "lone-surrogate", "unencodable", "not-text"],
)
def test_bad_text_is_rejected(engine, bad, match):
    with pytest.raises(InvalidInput, match=match):
        engine.encode(bad)


def test_missing_or_broken_tokenizer_files(tmp_path):
    with pytest.raises(InvalidInput, match="no tokenizer"):
        TextCodec.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="cannot load"):
        TextCodec.from_file(tmp_path)
