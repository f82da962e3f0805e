"""Sync and async invocation and streaming give the same conversation; concurrent threads never share state."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessageChunk
from lc_helpers import Rig, make_rig, user_text

TURNS = 12
L = 96


def config(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


def streamed_text(parts: list[Any]) -> str:
    return "".join(
        str(c.content) for c, meta in parts if isinstance(c, AIMessageChunk) and meta["langgraph_node"] == "model"
    )


async def reply(rig: Rig, mode: str, thread: str, text: str) -> str:
    inp = {"messages": [("user", text)]}
    cfg = config(thread)
    if mode == "invoke":
        return str(rig.agent.invoke(inp, cfg)["messages"][-1].content)
    if mode == "ainvoke":
        return str((await rig.agent.ainvoke(inp, cfg))["messages"][-1].content)
    if mode == "stream":
        got = streamed_text(list(rig.agent.stream(inp, cfg, stream_mode="messages")))
    else:
        got = streamed_text([p async for p in rig.agent.astream(inp, cfg, stream_mode="messages")])
    final = str(rig.state(thread)["messages"][-1].content)
    assert got == final  # the streamed tokens are the reply that entered the state
    return got


async def test_invoke_ainvoke_stream_astream_agree(checkpoint: Path) -> None:
    rig = make_rig(checkpoint)
    replies: dict[str, list[str]] = {}
    for mode in ("invoke", "ainvoke", "stream", "astream"):
        replies[mode] = []
        for t in range(TURNS):
            replies[mode].append(await reply(rig, mode, mode, user_text(t)))
            await rig.memory.aflush()
    assert replies["ainvoke"] == replies["stream"] == replies["astream"] == replies["invoke"]
    counts = {mode: rig.state(mode)["sleep_count"] for mode in replies}
    assert len(set(counts.values())) == 1 and counts["invoke"] >= 2
    # the reply of a streamed call carries its token ids too, so the next call found the window in sync
    for mode in replies:
        last = rig.state(mode)["messages"][-1]
        assert not last.response_metadata["agentsleep"]["resynced"]


def test_concurrent_threads_never_share_state(checkpoint: Path) -> None:
    def solo(seed: int) -> list[str]:
        rig = make_rig(checkpoint)
        out = []
        for t in range(TURNS):
            out.append(str(rig.turn("solo", user_text(t, seed)).content))
            rig.memory.flush()
        return out

    expected = {1: solo(1), 2: solo(2)}
    assert expected[1] != expected[2]

    rig = make_rig(checkpoint)
    barrier = threading.Barrier(3)
    got: dict[int, list[str]] = {1: [], 2: []}

    def worker(seed: int) -> None:
        for t in range(TURNS):
            got[seed].append(str(rig.turn(f"thread-{seed}", user_text(t, seed)).content))
            barrier.wait()  # both turns done: the main thread runs the sleeps they asked for
            barrier.wait()

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(worker, s) for s in (1, 2)]
        for _ in range(TURNS):
            barrier.wait()
            rig.memory.flush()
            barrier.wait()
        for f in futures:
            f.result()
    assert got == expected
    assert rig.state("thread-1")["sleep_count"] == rig.state("thread-2")["sleep_count"] >= 2


def test_background_sleeps_without_flushing(checkpoint: Path) -> None:
    """No test-side flushes: sleeps run on the scheduler's own time, beside two threads' turns."""
    rig = make_rig(checkpoint, debounce_seconds=0.02)

    def worker(seed: int) -> None:
        for t in range(30):
            r = rig.turn(f"bg-{seed}", user_text(t, seed))
            assert r.usage_metadata["input_tokens"] + r.usage_metadata["output_tokens"] <= L

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(worker, s) for s in (1, 2)]:
            f.result()
    assert rig.memory.flush(timeout=30)
    stats = rig.memory.scheduler.stats()
    assert stats.failed == 0
    for seed in (1, 2):
        assert rig.model.engine.session(f"bg-{seed}").sleep_count >= 5
        completed = [r for r in rig.memory.history(f"bg-{seed}") if r.status == "completed"]
        assert completed
