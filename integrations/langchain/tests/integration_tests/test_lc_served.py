"""A LangChain agent on a real `agentsleep serve` (vLLM) subprocess, serving the shipped GSM checkpoint: the thread id
is the agent id (``kv_transfer_params``), the server keeps and sleeps the agent's memory, and a fact heard two
windows earlier is recalled from the fast weights. Needs vLLM (``pytest -m vllm``); skipped where it is not
installed. One server for the module (vLLM on CPU takes about a minute to start)."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentsleep.store import SnapshotStore
from langchain.agents import create_agent
from langgraph.checkpoint.memory import InMemorySaver

from langchain_agentsleep import ChatCodec, ChatSleepHybrid, ChatSleepServer, ChatTemplate, ReplyBudget, SleepMemory
from langchain_agentsleep.chat_template import load_tokenizer

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[4]
CHECKPOINT = ROOT / "checkpoints" / "gsm-qlast-n2"  # shipped: symbolic GSM math, L = 64, N = 2
TEMPLATE = ChatTemplate(prefix="", suffix="")  # the checkpoint speaks its task's tokens, no chat roles
FACTS = ["V042 = 5 ;", "V020 = V077 + 1 ;", "V013 = V042 + 1 ;"] + [f"V{i} = V{i - 40} + 1 ;" for i in range(100, 120)]
QUESTION = "Q V042 ; A"
STARTUP_TIMEOUT = 300  # seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``agentsleep serve`` on the shipped checkpoint: (OpenAI base URL, store URL)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    d = tmp_path_factory.mktemp("served")
    store_url = f"sqlite:///{d / 'server.db'}"
    port = _free_port()
    log = d / "server.log"
    # Only the sleeps a turn needs (window full): background threshold sleeps would make the sleep points depend on
    # timing. (The server's own tests do the same.)
    env = {**os.environ, "AGENTSLEEP_SLEEP_DEBOUNCE_SECONDS": "600"}
    cmd = [sys.executable, "-m", "agentsleep.cli", "serve", str(CHECKPOINT), "--port", str(port), "--store", store_url,
           "--kv-cache-bytes", str(64 << 20), "--max-num-seqs", "4"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"{url}/v1", store_url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # the API server and its engine process
            proc.wait(timeout=60)


def served_agent(base_url: str, *middleware: object) -> object:
    model = ChatSleepServer(base_url=base_url, checkpoint=str(CHECKPOINT), chat_template=TEMPLATE, max_tokens=1)
    return create_agent(model, middleware=[*middleware, ReplyBudget()], checkpointer=InMemorySaver())


def test_served_agent_recalls_a_fact_from_its_fast_weights(server: tuple[str, str]) -> None:
    base_url, store_url = server
    thread = f"alice-{uuid.uuid4().hex[:8]}"
    config = {"configurable": {"thread_id": thread}}
    agent = served_agent(base_url, SleepMemory(store=None))  # SleepMemory only names the agent: the server sleeps
    heard = []
    for fact in FACTS:  # each request generates one token: the server cannot take input without replying
        reply = agent.invoke({"messages": [("user", fact)]}, config)["messages"][-1]
        heard.append(reply.response_metadata["agentsleep"]["token_ids"])
    answer = asyncio.run(agent.ainvoke({"messages": [("user", QUESTION)]}, config, context={"max_tokens": 3}))
    reply = answer["messages"][-1]
    assert reply.content.split()[0] == "5", reply  # V042 = 5 was heard two windows and two sleeps ago
    assert reply.response_metadata["agentsleep"]["agent_id"] == thread

    # The server's store holds the thread's agent: one chain of turn snapshots with its sleeps among them, and each
    # request carried only the new message (the window and S hold every token once, never the history again).
    codec = ChatCodec(load_tokenizer(CHECKPOINT), TEMPLATE)
    fed = sum(len(codec.encode(text)) for text in [*FACTS, QUESTION])
    replied = sum(map(len, heard)) + len(reply.response_metadata["agentsleep"]["token_ids"])
    store = SnapshotStore(store_url)
    deadline = time.monotonic() + 30  # a server that writes snapshots behind the reply gets a moment
    while True:
        history = store.history(thread)
        held = history[-1].tokens_consolidated + history[-1].window_len
        if held == fed + replied or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert held == fed + replied  # S + the window hold every token sent and generated, once
    assert sum(r.reason == "sleep" for r in history) >= 2
    assert all(child.parent_id == parent.id for parent, child in itertools.pairwise(history))

    # The embedded engine with the same conversation gives the same answer (float32 there, bf16 on the server).
    model = ChatSleepHybrid(model=str(CHECKPOINT), chat_template=TEMPLATE, max_tokens=1)
    memory = SleepMemory(store=None)
    local = create_agent(model, middleware=[memory, ReplyBudget()], checkpointer=InMemorySaver())
    for fact in FACTS:
        local.invoke({"messages": [("user", fact)]}, config)
        memory.flush()
    mine = local.invoke({"messages": [("user", QUESTION)]}, config, context={"max_tokens": 3})["messages"][-1]
    assert str(mine.content).split()[0] == "5"


def test_served_threads_are_separate_agents(server: tuple[str, str]) -> None:
    """Negative control: a thread that never heard the fact does not answer 5, so the recall above came from that
    thread's own memory."""
    base_url, store_url = server
    config = {"configurable": {"thread_id": f"bob-{uuid.uuid4().hex[:8]}"}}
    agent = served_agent(base_url)  # no SleepMemory: the thread id is found in the run's config
    reply = agent.invoke({"messages": [("user", QUESTION)]}, config, context={"max_tokens": 3})["messages"][-1]
    assert reply.content.split()[:1] != ["5"]
    assert SnapshotStore(store_url).agent(config["configurable"]["thread_id"]).current_snapshot_id is not None


def test_chat_openai_cannot_address_agents(server: tuple[str, str]) -> None:
    """Why ChatSleepServer exists: ChatOpenAI speaks /v1/chat/completions and resends the whole history, but an
    agent's request must be a completion of its new input. The server refuses it with a clear 400 (documented in
    docs/langchain.md); if the server learns chat requests, this test tells the integration to switch."""
    langchain_openai = pytest.importorskip("langchain_openai")
    import openai

    base_url, _ = server
    model = langchain_openai.ChatOpenAI(
        base_url=base_url,
        api_key="EMPTY",
        model="gsm-qlast-n2",
        max_tokens=2,
        extra_body={"kv_transfer_params": {"agent_id": "carol"}},
    )
    with pytest.raises(openai.BadRequestError, match="/v1/completions"):
        model.invoke("V042 = 5 ;")
