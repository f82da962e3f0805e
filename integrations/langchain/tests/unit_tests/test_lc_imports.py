"""The public API of langchain_agentsleep is pinned: a change here is a deliberate API change."""

from __future__ import annotations

import langchain_agentsleep

EXPECTED_ALL = [
    "ChatCodec",
    "ChatSleepHybrid",
    "ChatSleepServer",
    "ChatTemplate",
    "MessageTooLong",
    "MissingAgentKey",
    "ReplyBudget",
    "SleepMemory",
    "SleepState",
    "count_tokens_tiktoken",
    "tiktoken_counter",
]


def test_all_imports() -> None:
    assert sorted(langchain_agentsleep.__all__) == sorted(EXPECTED_ALL)
    for name in EXPECTED_ALL:
        assert getattr(langchain_agentsleep, name) is not None


def test_missing_agent_key_is_an_agentsleep_error() -> None:
    from agentsleep.errors import AgentSleepError, InvalidInput

    assert issubclass(langchain_agentsleep.MissingAgentKey, InvalidInput)
    assert issubclass(langchain_agentsleep.MissingAgentKey, AgentSleepError)
