"""ChatSleepHybrid + SleepMemory over `VLLMEngine` (the served engine): the same LangChain surface as the embedded
engine. Needs vLLM (``pytest -m vllm``); skipped where it is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from agentsleep.memory import SleepPolicy
from langchain.agents import create_agent
from langgraph.checkpoint.memory import InMemorySaver
from lc_helpers import make_rig, user_text

from langchain_agentsleep import ChatSleepHybrid, SleepMemory

pytestmark = pytest.mark.vllm
TURNS = 10


def test_agent_over_vllm_engine(checkpoint: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from agentsleep.serving.settings import apply_env_defaults

    apply_env_defaults()
    from agentsleep.serving.engine import VLLMEngine

    engine = VLLMEngine(checkpoint, state_dir=tmp_path / "vllm-state", max_num_seqs=2)
    try:
        model = ChatSleepHybrid(engine=engine, max_tokens=8)  # tokenizer and chat template from engine.path
        memory = SleepMemory(model, policy=SleepPolicy(window=96, passes=2, debounce_seconds=0))
        agent = create_agent(model, system_prompt="you remember", middleware=[memory], checkpointer=InMemorySaver())
        cfg = {"configurable": {"thread_id": "v"}}
        served = []
        for t in range(TURNS):
            reply = agent.invoke({"messages": [("user", user_text(t))]}, cfg)["messages"][-1]
            memory.flush()
            assert reply.usage_metadata["input_tokens"] + reply.usage_metadata["output_tokens"] <= 96
            assert not reply.response_metadata["agentsleep"]["resynced"]
            served.append(reply.content)
        assert engine.session("v").sleep_count >= 1
        assert agent.get_state(cfg).values["sleep_count"] >= 1
    finally:
        engine.close()
    # The embedded float32 reference on the same first turn (zero S + the same message): vLLM computes in bf16, so
    # the random model's close logits may split later tokens, and then the two conversations diverge; the first
    # tokens must agree.
    rig = make_rig(checkpoint)
    embedded = str(rig.turn("v", user_text(0)).content)
    assert str(served[0]).split()[:3] == embedded.split()[:3], (served[0], embedded)
