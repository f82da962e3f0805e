"""What stays resident between an agent's turns: a content key for a fast-weight state, and a small LRU map.

A turn never changes S (only a sleep does), but every turn writes a new snapshot id. So caches that must survive
turns are keyed by the *content* of S (`state_key`), not by snapshot id: the connector computes the window header of
one S once and reuses it for every turn until the agent sleeps, and the server keeps each active agent's memory keyed
by agent id, checked against the store's current snapshot id (one indexed read) instead of reloaded every turn.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

from agentsleep.model.state import FastWeights

K = TypeVar("K")
V = TypeVar("V")


def state_key(state: FastWeights) -> str:
    """A key equal for equal states of the same model: ``"<fingerprint>:<sha256 of the tensors>"``."""
    return f"{state.fingerprint}:{state.digest()}"


class LRU(Generic[K, V]):
    """A thread-safe map keeping the ``capacity`` most recently used entries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def pop(self, key: K) -> V | None:
        with self._lock:
            return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items


__all__ = ["LRU", "state_key"]
