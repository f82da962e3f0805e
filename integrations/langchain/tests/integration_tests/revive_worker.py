"""Run turns ``start..stop-1`` of a deterministic conversation on one thread, in its own process.

Used by test_lc_revive.py: one process can stop (normally, by SIGKILL after its last turn, or by SIGKILL in the middle
of a turn with ``--kill-at TURN:POINT``) and a fresh one continue the same thread from the same SQLite checkpointer
file and snapshot store (``--resume`` first finishes the interrupted turn with ``agent.invoke(None, config)``); the
replies must equal an uninterrupted run. Writes one JSON line per turn to ``--out``: the reply, the state's sleep
count and the window size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lc_helpers

import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)

from agentsleep.memory import SleepPolicy  # noqa: E402
from agentsleep.store import SnapshotStore  # noqa: E402
from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import AgentMiddleware  # noqa: E402
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver  # noqa: E402
from lc_helpers import user_text  # noqa: E402

from langchain_agentsleep import ChatSleepHybrid, SleepMemory  # noqa: E402


class Killer(AgentMiddleware):
    """SIGKILLs the process at one point of one turn (inside SleepMemory, so after its part of that step ran)."""

    def __init__(self, point: str | None) -> None:
        super().__init__()
        self.point = point
        self.armed = False

    def _maybe(self, point: str) -> None:
        if self.armed and point == self.point:
            os.kill(os.getpid(), signal.SIGKILL)

    def before_model(self, state, runtime):  # type: ignore[no-untyped-def]
        self._maybe("before_model")

    async def abefore_model(self, state, runtime):  # type: ignore[no-untyped-def]
        self._maybe("before_model")

    def wrap_model_call(self, request, handler):  # type: ignore[no-untyped-def]
        self._maybe("model")  # SleepMemory has revived the agent and prepared the call; the model has not run
        return handler(request)

    async def awrap_model_call(self, request, handler):  # type: ignore[no-untyped-def]
        self._maybe("model")
        return await handler(request)

    def after_model(self, state, runtime):  # type: ignore[no-untyped-def]
        self._maybe("after_model")  # the reply is in the checkpoint; after_agent has not run

    async def aafter_model(self, state, runtime):  # type: ignore[no-untyped-def]
        self._maybe("after_model")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dir", required=True, help="holds graph.db and snapshots.db")
    p.add_argument("--thread", default="alice")
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--stop", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill", action="store_true", help="SIGKILL this process after the last turn")
    p.add_argument("--kill-at", help="TURN:POINT (before_model, model, after_model): SIGKILL in the middle of a turn")
    p.add_argument("--resume", action="store_true", help="first finish the interrupted turn --start-1 (invoke None)")
    p.add_argument("--async", dest="use_async", action="store_true", help="ainvoke instead of invoke")
    args = p.parse_args()
    kill_turn, kill_point = (
        (int(args.kill_at.split(":")[0]), args.kill_at.split(":")[1]) if args.kill_at else (-1, None)
    )

    d = Path(args.dir)
    model = ChatSleepHybrid.from_pretrained(args.ckpt, max_tokens=8)
    memory = SleepMemory(
        model,
        SnapshotStore(f"sqlite:///{d / 'snapshots.db'}"),
        policy=SleepPolicy(window=96, passes=2, debounce_seconds=0),
    )
    turns = [(args.start - 1, None)] if args.resume else []
    turns += [(t, {"messages": [("user", user_text(t))]}) for t in range(args.start, args.stop)]
    killer = Killer(kill_point)
    cfg = {"configurable": {"thread_id": args.thread}}

    def make_agent(saver: object) -> object:
        return create_agent(model, system_prompt="you remember", middleware=[memory, killer], checkpointer=saver)

    def record(out: object, turn: int, result: dict, values: dict) -> None:
        reply = result["messages"][-1]
        row = {
            "turn": turn,
            "reply": reply.content,
            "sleep_count": values.get("sleep_count", 0),
            "window": reply.response_metadata["agentsleep"]["window_tokens"],
        }
        out.write(json.dumps(row) + "\n")  # type: ignore[attr-defined]
        out.flush()  # type: ignore[attr-defined]

    async def run_async() -> None:  # the async surface end to end: AsyncSqliteSaver, ainvoke, aflush, aget_state
        async with AsyncSqliteSaver.from_conn_string(str(d / "graph.db")) as saver:
            agent = make_agent(saver)
            with open(args.out, "a") as out:
                for turn, inp in turns:
                    killer.armed = turn == kill_turn
                    result = await agent.ainvoke(inp, cfg, durability="sync")
                    await memory.aflush()  # sleeps land between turns, at the same points in every run
                    record(out, turn, result, (await agent.aget_state(cfg)).values)

    if args.use_async:
        asyncio.run(run_async())
    else:
        agent = make_agent(SqliteSaver(sqlite3.connect(str(d / "graph.db"), check_same_thread=False)))
        with open(args.out, "a") as out:
            for turn, inp in turns:
                killer.armed = turn == kill_turn
                result = agent.invoke(inp, cfg, durability="sync")
                memory.flush()  # sleeps land between turns, at the same points in every run
                record(out, turn, result, agent.get_state(cfg).values)
    if args.kill:
        os.kill(os.getpid(), signal.SIGKILL)
    memory.close()


if __name__ == "__main__":
    main()
