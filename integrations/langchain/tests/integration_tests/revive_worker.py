"""Run turns ``start..stop-1`` of a deterministic conversation on one thread, in its own process.

Used by test_lc_revive.py: one process can stop (normally or by SIGKILL after its last turn) and a fresh one continue
the same thread from the same SQLite checkpointer file and snapshot store; the replies must equal an uninterrupted run.
Writes one JSON line per turn to ``--out``: the reply, the state's sleep count and the window size.
"""

from __future__ import annotations

import argparse
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
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402
from lc_helpers import user_text  # noqa: E402

from langchain_agentsleep import ChatSleepHybrid, SleepMemory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dir", required=True, help="holds graph.db and snapshots.db")
    p.add_argument("--thread", default="alice")
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--stop", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill", action="store_true", help="SIGKILL this process after the last turn")
    args = p.parse_args()

    d = Path(args.dir)
    model = ChatSleepHybrid.from_pretrained(args.ckpt, max_tokens=8)
    memory = SleepMemory(
        model,
        SnapshotStore(f"sqlite:///{d / 'snapshots.db'}"),
        policy=SleepPolicy(window=96, passes=2, debounce_seconds=0),
    )
    saver = SqliteSaver(sqlite3.connect(str(d / "graph.db"), check_same_thread=False))
    agent = create_agent(model, system_prompt="you remember", middleware=[memory], checkpointer=saver)
    cfg = {"configurable": {"thread_id": args.thread}}
    with open(args.out, "a") as out:
        for turn in range(args.start, args.stop):
            result = agent.invoke({"messages": [("user", user_text(turn))]}, cfg, durability="sync")
            memory.flush()  # sleeps land between turns, at the same points in every run
            values = agent.get_state(cfg).values
            reply = result["messages"][-1]
            row = {
                "turn": turn,
                "reply": reply.content,
                "sleep_count": values.get("sleep_count", 0),
                "window": reply.response_metadata["agentsleep"]["window_tokens"],
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
    if args.kill:
        os.kill(os.getpid(), signal.SIGKILL)
    memory.close()


if __name__ == "__main__":
    main()
