"""The chat template: token-compositional rendering, where it comes from, and exact reuse of reply tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agentsleep.errors import CheckpointError, ConfigError
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from lc_helpers import build_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers

from langchain_agentsleep import ChatCodec, ChatTemplate
from langchain_agentsleep.chat_template import content_digest

CONVERSATION = [
    SystemMessage("you remember"),
    HumanMessage("hello cat", id="h1"),
    AIMessage("yes dog", id="a1"),
    HumanMessage("what is two plus two ?", id="h2"),
]


def plain_tokenizer() -> Tokenizer:
    words = "[UNK] system user assistant tool : hello cat yes dog what is two plus ?".split()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_default_template_uses_role_tokens_when_the_vocabulary_has_them() -> None:
    assert ChatTemplate.default_for(build_tokenizer()) == ChatTemplate.role_tokens()
    assert ChatTemplate.default_for(plain_tokenizer()) == ChatTemplate.plain()


def test_rendering_is_the_concatenation_of_messages() -> None:
    codec = ChatCodec(build_tokenizer(), ChatTemplate.role_tokens())
    parts = codec.render(CONVERSATION)
    assert [len(p) for p in parts] == [len(codec.message_ids(m)) for m in CONVERSATION]
    flat = [t for p in parts for t in p]
    assert codec.prompt(CONVERSATION) == flat + codec.generation_prefix
    # every prefix of the conversation renders to a prefix of its tokens: the window grows by appending
    for k in range(len(CONVERSATION) + 1):
        assert flat[: sum(len(p) for p in parts[:k])] == [t for p in codec.render(CONVERSATION[:k]) for t in p]
    vocab = build_tokenizer().get_vocab()
    assert parts[1][0] == vocab["<|user|>"] and parts[1][-1] == vocab["<|end|>"]
    assert codec.stop_token_ids == (vocab["<|end|>"],)
    assert codec.generation_prefix == [vocab["<|assistant|>"]]


def test_plain_template_renders_role_lines() -> None:
    codec = ChatCodec(plain_tokenizer(), ChatTemplate.plain())
    assert codec.decode(codec.message_ids(HumanMessage("hello cat"))) == "user : hello cat"
    assert codec.end_ids == []  # "\n" has no token in a whitespace word-level vocabulary
    assert codec.stop_token_ids == ()


def test_roles_tool_and_chat_messages() -> None:
    codec = ChatCodec(build_tokenizer(), ChatTemplate.role_tokens())
    tool = codec.decode(codec.message_ids(ToolMessage("two", tool_call_id="c1")))
    assert tool.startswith("<|tool|>")
    custom = codec.decode(codec.message_ids(ChatMessage(role="user", content="cat")))
    assert custom.startswith("<|user|>")
    call = AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1"}])
    assert codec.count([call]) > codec.count([AIMessage("")])


def test_reply_token_ids_are_reused_only_when_valid() -> None:
    codec = ChatCodec(build_tokenizer(), ChatTemplate.role_tokens(), fingerprint="fp")
    vocab = build_tokenizer().get_vocab()
    ids = [vocab["cat"], vocab["dog"]]  # decodes to "cat dog"; pretend the model produced it this way
    meta = {"agentsleep": {"token_ids": ids, "fingerprint": "fp", "digest": content_digest("cat dog")}}
    assert codec.body_ids(AIMessage("cat dog", response_metadata=meta)) == ids
    odd = [vocab["cat"]]  # ids that do not re-encode from the text: still used, the window must hold them
    meta_odd = {"agentsleep": {"token_ids": odd, "fingerprint": "fp", "digest": content_digest("cat dog")}}
    assert codec.body_ids(AIMessage("cat dog", response_metadata=meta_odd)) == odd
    edited = AIMessage("cat bird", response_metadata=meta_odd)  # text edited: tokenise the text
    assert codec.body_ids(edited) == codec.encode("cat bird")
    other_model = {"agentsleep": {**meta_odd["agentsleep"], "fingerprint": "other"}}
    assert codec.body_ids(AIMessage("cat dog", response_metadata=other_model)) == codec.encode("cat dog")


def test_codec_is_a_langchain_token_counter() -> None:
    codec = ChatCodec(build_tokenizer(), ChatTemplate.role_tokens())
    assert codec(CONVERSATION) == codec.count(CONVERSATION)
    assert codec([("user", "hello cat")]) == codec.count([HumanMessage("hello cat")])
    assert codec("hello cat") == codec.count([HumanMessage("hello cat")])


def test_from_pretrained_reads_config_and_falls_back(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert ChatTemplate.from_pretrained(tmp_path) == ChatTemplate.role_tokens()  # no config.json: default
    custom = {"prefix": "[{role}] ", "suffix": " <|end|>"}
    (tmp_path / "config.json").write_text(json.dumps({"agentsleep": {"chat_template": custom}}))
    t = ChatTemplate.from_pretrained(tmp_path)
    assert t.prefix == "[{role}] " and t.suffix == " <|end|>"
    (tmp_path / "config.json").write_text(json.dumps({"agentsleep": {"chat_template": {"bogus": 1}}}))
    with pytest.raises(CheckpointError):
        ChatTemplate.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        ChatTemplate.from_pretrained(tmp_path)


def test_invalid_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        ChatTemplate(prefix=3)  # type: ignore[arg-type]
