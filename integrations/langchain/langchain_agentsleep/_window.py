"""Which messages fill an agent's attention window: the ledger `ChatSleepHybrid` writes and `SleepMemory` reads.

After every call, `ChatSleepHybrid` leaves the engine's window for the agent equal to the tokens of exactly
``[system?] + messages + [its reply]`` (see `ChatCodec`). It records the ids of those messages here, with the window's
length. A sleep consolidates the whole window; `SleepMemory` checks the engine's window still has that length and
then knows the last message the sleep folded into S. The ledger is process-local and per engine: after a revive it
is rebuilt by the next model call (a post-sleep snapshot has an empty window, so nothing is lost).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class WindowLedger:
    """The messages whose tokens fill an agent's window, oldest first.

    Attributes:
        message_ids: ids of the messages in the window that have ids (graph state messages; a system prompt passed
            per call has none and is re-sent after every sleep).
        window_tokens: the window's length when recorded; a sleep may use the ledger only if it still matches.
        head_tokens: tokens of the leading id-less messages (the system prompt), for fit estimates.
    """

    message_ids: tuple[str, ...]
    window_tokens: int
    head_tokens: int = 0

    @property
    def through(self) -> str | None:
        """Id of the newest message fully in the window (what a sleep of this window consolidates through)."""
        return self.message_ids[-1] if self.message_ids else None


EMPTY = WindowLedger((), 0)


@dataclass(eq=False)
class AgentSlot:
    """Process-local bookkeeping of one agent on one engine."""

    lock: threading.RLock = field(default_factory=threading.RLock)  # serialises whole chat-model calls per agent
    ledger: WindowLedger | None = None  # None: unknown (fresh process, failed call): the next call resyncs
    head_tokens: int = 0  # system-prompt tokens last seen, for fit estimates before the next call
    head_ids: tuple[int, ...] | None = None  # those tokens (None: unknown), to rebuild a window without a call


_LOCK = threading.Lock()
_WEAK: weakref.WeakKeyDictionary[Any, dict[str, AgentSlot]] = weakref.WeakKeyDictionary()
_STRONG: dict[int, tuple[Any, dict[str, AgentSlot]]] = {}  # engines that cannot be weakly referenced


def slot(engine: Any, agent_id: str) -> AgentSlot:
    """The slot of ``agent_id`` on ``engine`` (created on first use)."""
    with _LOCK:
        try:
            slots = _WEAK.get(engine)
            if slots is None:
                slots = _WEAK[engine] = {}
        except TypeError:  # not weak-referenceable or not hashable: keep it alive with its slots
            entry = _STRONG.get(id(engine))
            if entry is None or entry[0] is not engine:
                entry = _STRONG[id(engine)] = (engine, {})
            slots = entry[1]
        s = slots.get(agent_id)
        if s is None:
            s = slots[agent_id] = AgentSlot()
        return s


def forget(engine: Any, agent_id: str) -> None:
    """Drop an agent's slot (after it was removed from the engine)."""
    with _LOCK:
        try:
            slots = _WEAK.get(engine)
        except TypeError:
            entry = _STRONG.get(id(engine))
            slots = entry[1] if entry is not None and entry[0] is engine else None
        if slots is not None:
            slots.pop(agent_id, None)


__all__ = ["EMPTY", "AgentSlot", "WindowLedger", "forget", "slot"]
