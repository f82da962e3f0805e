"""LangChain's standard chat-model unit tests for ChatSleepHybrid (skipped unless `langchain-tests` is installed:
the `test_standard` dependency group)."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest

standard = pytest.importorskip("langchain_tests.unit_tests")

from lc_helpers import build_checkpoint  # noqa: E402

from langchain_agentsleep import ChatSleepHybrid, ChatSleepServer  # noqa: E402


@cache
def _engine() -> Any:
    from agentsleep.runtime import TorchEngine

    path = build_checkpoint(Path(tempfile.mkdtemp(prefix="lc-standard-")) / "chat")
    return TorchEngine.from_pretrained(path)


class TestChatSleepHybridStandard(standard.ChatModelUnitTests):  # type: ignore[name-defined,misc]
    @property
    def chat_model_class(self) -> type[ChatSleepHybrid]:
        return ChatSleepHybrid

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": _engine()}  # the standard suite passes max_tokens itself

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        params = dict(super().standard_chat_model_params)
        params.pop("api_key", None)  # an embedded model has no API key (and unknown arguments are refused)
        return params

    @property
    def has_tool_calling(self) -> bool:
        return False  # bind_tools accepts tools for create_agent, but the hybrid cannot emit tool calls

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @pytest.mark.xfail(reason="the engine is a live object, not serialisable init params", strict=False)
    def test_serdes(self, *args: Any, **kwargs: Any) -> None:
        super().test_serdes(*args, **kwargs)


@cache
def _served_checkpoint() -> str:
    return str(build_checkpoint(Path(tempfile.mkdtemp(prefix="lc-standard-served-")) / "chat"))


class TestChatSleepServerStandard(standard.ChatModelUnitTests):  # type: ignore[name-defined,misc]
    """The unit half of the suite needs no server (construction, parameters, tracing names)."""

    @property
    def chat_model_class(self) -> type[ChatSleepServer]:
        return ChatSleepServer

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": "http://127.0.0.1:1/v1", "checkpoint": _served_checkpoint()}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True
