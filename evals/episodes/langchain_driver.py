"""The LangChain driver: episodes through ``create_agent`` + `SleepMemory` + `ChatSleepHybrid` + ``SqliteSaver``.

Each episode is one LangGraph thread (thread id = agent id = episode id). A turn is ``agent.invoke`` with one user
message whose text is the turn's ids decoded by the checkpoint's tokenizer; a content-only chat template renders it
back to exactly those ids, so the window holds the layout the checkpoint was trained on. The run's context carries the
turn's reply budget (0 for a fact) and stop string; `ReplyBudget` hands them to the model call.

Sleep points match the AgentHost driver (`agentsleep.episodes.drivers`): `SleepMemory` sleeps before a call that would
not fit (with the episode's reply reserve), its scheduler sleeps in the background past the soft threshold, and the
runner flushes between turns. After a SIGKILL the fresh process revives S from the snapshot store and the messages
since the last sleep from the LangGraph checkpointer; a background sleep the kill interrupted before it committed is
re-run first (`begin`), as the scheduler would have run it.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_agentsleep import ChatSleepHybrid, ChatTemplate, ReplyBudget, SleepMemory
from langchain_agentsleep.chat_models import sync_window
from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.checkpoint.sqlite import SqliteSaver

from agentsleep.episodes.drivers import Condition
from agentsleep.episodes.types import Episode, Turn
from agentsleep.errors import InvalidInput, UnknownAgent, UnknownSnapshot
from agentsleep.store import SnapshotStore

logger = logging.getLogger(__name__)

# A message renders as exactly its content tokens: no role tokens, no separators (the task checkpoints never saw any).
CONTENT_ONLY = ChatTemplate(prefix="", suffix="", tool_call="{json}")


def _after(messages: list[AnyMessage], through: str | None) -> list[AnyMessage]:
    ids = [m.id for m in messages]
    return messages[ids.index(through) + 1 :] if through in ids else list(messages)


class LangChainDriver:
    """One process's LangChain stack for one condition (many threads, one per episode)."""

    def __init__(self, condition: Condition, workdir: Path) -> None:
        self.condition = condition
        self.engine = condition.engine()
        self.model = ChatSleepHybrid(
            engine=self.engine, tokenizer=str(Path(condition.checkpoint) / "tokenizer.json"), chat_template=CONTENT_ONLY
        )
        self.policy = condition.policy(self.engine)
        self.store = SnapshotStore(f"sqlite:///{Path(workdir) / 'snapshots.db'}")
        self.memory: SleepMemory[Any, Any] = SleepMemory(self.model, self.store, policy=self.policy, on_error="raise")
        self._conn = sqlite3.connect(str(Path(workdir) / "graph.db"), check_same_thread=False)
        self.saver = SqliteSaver(self._conn)
        self.agent = create_agent(self.model, middleware=[self.memory, ReplyBudget()], checkpointer=self.saver)

    @staticmethod
    def _cfg(episode: Episode) -> dict[str, Any]:
        return {"configurable": {"thread_id": episode.id}}

    def text(self, ids: tuple[int, ...]) -> str:
        """A turn's ids as message text; the content-only template must give the very same ids back."""
        text = self.model.codec.decode(list(ids))
        if tuple(self.model.codec.encode(text)) != tuple(ids):
            raise InvalidInput(f"turn ids {ids[:8]}… do not survive decode/encode with this tokenizer")
        return text

    def begin(self, episode: Episode, *, resume: bool) -> None:
        self.condition.check_fits(episode, self.policy.window)
        self.memory.reserve_tokens = episode.reserve or None
        if not resume:
            return  # SleepMemory creates the agent at the first turn (no snapshot exists for this thread)
        through = None
        try:
            self.memory.revive(episode.id)
            through = self.store.latest(episode.id, fallback=True).record.meta.get("consolidated_through")
        except (UnknownAgent, UnknownSnapshot):
            pass  # killed before its first sleep: the messages are all in the checkpointer
        messages = _after(self.agent.get_state(self._cfg(episode)).values.get("messages", []), through)
        if not messages:
            return
        # Put the messages since the last sleep back into the window now (the next call would do it lazily), so a
        # sleep that comes before that call — the lost background one, or a turn's `sleep_before` — consolidates them.
        sync_window(self.engine, self.model.codec, episode.id, messages)
        if not self.condition.full_history and self.policy.should_sleep_after_turn(self.model.codec.count(messages)):
            logger.info("thread %r revived with a full window: its lost background sleep runs now", episode.id)
            self.memory.scheduler.sleep_now(episode.id)

    def turn(self, episode: Episode, turn: Turn) -> tuple[int, ...]:
        if turn.sleep_before and not self.condition.full_history:
            self.sleep(episode)
        context = {"max_tokens": turn.reply, "stop": episode.stop_text if turn.reply else None}
        result = self.agent.invoke(
            {"messages": [HumanMessage(self.text(turn.ids))]}, self._cfg(episode), context=context, durability="sync"
        )
        reply = result["messages"][-1]
        return tuple(int(t) for t in reply.response_metadata["agentsleep"]["token_ids"])

    def sleep(self, episode: Episode) -> None:
        if self.engine.has_agent(episode.id) and self.engine.session(episode.id).window_tokens > 0:
            self.memory.scheduler.sleep_now(episode.id)

    def settle(self, episode: Episode) -> None:
        self.memory.flush()

    def sleeps(self, episode: Episode) -> int:
        return self.engine.session(episode.id).sleep_count

    def in_flight(self, episode: Episode) -> bool:
        return any(not r.done for r in self.memory.history(episode.id))

    def finish(self, episode: Episode) -> None:
        self.memory.flush()
        self.memory.forget(episode.id)

    def close(self) -> None:
        self.memory.close()
        self._conn.close()
        self.store.close()


def langchain_driver(condition: Condition, workdir: Path) -> LangChainDriver:
    """`DriverFactory` of the LangChain stack (the name the worker imports)."""
    return LangChainDriver(condition, workdir)


FACTORY = "evals.episodes.langchain_driver:langchain_driver"

__all__ = ["CONTENT_ONLY", "FACTORY", "LangChainDriver", "langchain_driver"]
