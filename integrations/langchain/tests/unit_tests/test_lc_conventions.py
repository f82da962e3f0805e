"""Partner-package conventions: construction from a checkpoint path, names in traces, refused arguments, honest
NotImplementedError for what the hybrid cannot do, and docstring examples that run."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from agentsleep.errors import ConfigError
from langchain.agents import create_agent
from langchain.chat_models import init_chat_model
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel

from langchain_agentsleep import ChatSleepHybrid, SleepMemory

ROOT = Path(__file__).resolve().parents[4]


def test_construct_from_a_checkpoint_path(checkpoint: Path) -> None:
    by_path = ChatSleepHybrid(model=str(checkpoint), max_tokens=6)
    by_name = ChatSleepHybrid(model_name=str(checkpoint), max_tokens=6)
    classic = ChatSleepHybrid.from_pretrained(checkpoint, max_tokens=6)
    assert by_path.model_name == by_name.model_name == classic.model_name == str(checkpoint)
    replies = {m.invoke("hello cat").content for m in (by_path, by_name, classic)}
    assert len(replies) == 1  # the same checkpoint, template and decoding
    other = ChatSleepHybrid(engine=by_path.engine)  # an engine without a path: named by its model fingerprint
    assert other.model_name == f"agentsleep-hybrid-{by_path.engine.fingerprint[:12]}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "checkpoints/does-not-exist"}, "not a checkpoint directory"),
        ({}, "needs a checkpoint"),
        ({"temprature": 0.5}, "temprature: unknown argument"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_arguments_are_refused(checkpoint: Path, kwargs: dict, match: str) -> None:
    if "model" not in kwargs and kwargs:
        kwargs = {"model": str(checkpoint), **kwargs}
    with pytest.raises(ConfigError, match=match):
        ChatSleepHybrid(**kwargs)


def test_tool_choice_and_structured_output_are_not_implemented(checkpoint: Path) -> None:
    model = ChatSleepHybrid(model=str(checkpoint))

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    class Answer(BaseModel):
        value: int

    for choice in ("any", "required", "add"):
        with pytest.raises(NotImplementedError, match="cannot call tools"):
            model.bind_tools([add], tool_choice=choice)
    for choice in (None, "auto", "none"):  # honest: the model may (and does) answer without a tool
        model.bind_tools([add], tool_choice=choice)
    with pytest.raises(NotImplementedError, match="tool_choice='any'"):
        model.invoke("hello", tool_choice="any")
    with pytest.raises(NotImplementedError, match="no structured output"):
        model.with_structured_output(Answer)
    memory = SleepMemory(store=None)
    agent = create_agent(model, response_format=Answer, middleware=[memory], checkpointer=InMemorySaver())
    with pytest.raises(NotImplementedError):
        agent.invoke({"messages": [("user", "hello")]}, {"configurable": {"thread_id": "s"}})


def test_init_chat_model_has_no_provider_registry() -> None:
    """LangChain 1.x resolves providers from a fixed built-in table (no entry point, no register function), so
    init_chat_model cannot build a ChatSleepHybrid; docs/langchain.md says so. If LangChain adds a registry, this
    test fails and the integration should register 'agentsleep'."""
    import langchain.chat_models.base as base

    assert "agentsleep" not in base._BUILTIN_PROVIDERS
    assert not [n for n in dir(base) if "register" in n.lower()]
    with pytest.raises(ValueError, match="Unsupported"):
        init_chat_model("checkpoints/gsm-qlast-n2", model_provider="agentsleep")


def docstring_example(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    match = re.search(r"\.\. code-block:: python\n\n(.*?)\n\n(?=\S)", doc + "\n\nEnd", re.S)
    assert match, f"{obj!r} lost its example"
    return textwrap.dedent(match.group(1))


@pytest.mark.parametrize("obj", [ChatSleepHybrid, SleepMemory], ids=lambda o: o.__name__)
def test_class_docstring_examples_run(obj: type, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    code = docstring_example(obj)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if obj is SleepMemory:
        assert (tmp_path / "agents.db").is_file() and (tmp_path / "graph.db").is_file()
