"""The offline tiktoken counter fits LangChain's TokenCounter slots (trim_messages, SummarizationMiddleware)."""

from __future__ import annotations

from langchain.agents.middleware import SummarizationMiddleware
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages

from langchain_agentsleep import count_tokens_tiktoken, tiktoken_counter


def test_counts_offline_like_openai() -> None:
    # "hello world" is [15339, 1917] in cl100k_base; +4 framing tokens per message
    assert count_tokens_tiktoken([HumanMessage("hello world")]) == 6
    assert count_tokens_tiktoken([("user", "hello world"), ("assistant", "hi")]) == 6 + 5
    assert tiktoken_counter("o200k_base")([HumanMessage("hello world")]) == 6
    assert tiktoken_counter() is tiktoken_counter()  # built once


def test_trim_messages_with_the_counter() -> None:
    messages = [SystemMessage("be brief"), *[HumanMessage(f"message number {i}") for i in range(10)]]
    kept = trim_messages(
        messages, max_tokens=30, token_counter=count_tokens_tiktoken, strategy="last", include_system=True
    )
    assert kept[0].type == "system"
    assert count_tokens_tiktoken(kept) <= 30 < count_tokens_tiktoken(messages)


def test_summarization_middleware_accepts_the_counter() -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    summarizer_model = GenericFakeChatModel(messages=iter([AIMessage("summary")]))
    mw = SummarizationMiddleware(summarizer_model, trigger=("tokens", 10), token_counter=count_tokens_tiktoken)
    assert mw.token_counter([HumanMessage("hello world")]) == 6
