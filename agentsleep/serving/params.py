"""The per-request agent parameters (``kv_transfer_params``), parsed without importing vLLM.

Two forms, both strict (an unknown key is an error, with the closest known key as a hint, so a misspelled
``"agentid"`` is never served as a memoryless request):

* `AgentParams`: what a client sends to ``agentsleep serve`` (the server's middleware parses it);
* `ConnectorParams`: what the middleware and `VLLMEngine` send on to vLLM for `FastWeightConnector` — which state to
  restore and, for `VLLMEngine`'s one-pass sleep, where to save it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from agentsleep.errors import InvalidInput
from agentsleep.ids import check_agent_id, check_id

FIELD = "kv_transfer_params"


def _check_keys(raw: dict[str, Any], known: Iterable[str]) -> None:
    known = tuple(known)
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInput(f"unknown {FIELD} key {key!r}{hint}; known keys: {', '.join(known)}")


def _flag(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{FIELD}.{name} must be true or false, got {value!r}")
    return value


def _optional_id(raw: dict[str, Any], name: str) -> str | None:
    value = raw.get(name)
    return None if value is None else check_id(value, f"{FIELD}.{name}")


@dataclass(frozen=True)
class AgentParams:
    """A client's ``kv_transfer_params`` for one agent turn (docs/serving.md, "Request format").

    Attributes:
        agent_id: the agent (`agentsleep.ids.check_agent_id`: the store's and the host's rule).
        restore: False starts the turn from S = 0 and an empty window (a new agent, or a reset).
        create: with ``restore``, an unknown agent is started from S = 0 instead of answered with 404 (send it on
            every turn of a client that does not track whether its agent exists yet).
        snapshot_id: start from this snapshot instead of the agent's current one (revive an old state, or fork one
            into another agent id).
        turn_id: idempotency key: a repeated turn id returns the stored reply and appends nothing.
    """

    agent_id: str
    restore: bool = True
    create: bool = False
    snapshot_id: str | None = None
    turn_id: str | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("agent_id", "restore", "create", "snapshot_id", "turn_id")

    @classmethod
    def parse(cls, raw: Any) -> AgentParams:
        """`InvalidInput` for anything but a dict of known keys with a valid ``agent_id``."""
        if not isinstance(raw, dict):
            raise InvalidInput(f"{FIELD} must be a JSON object with an agent_id, got {type(raw).__name__}")
        _check_keys(raw, cls.KEYS)
        if "agent_id" not in raw:
            raise InvalidInput(f"{FIELD}.agent_id is required (the agent this turn belongs to)")
        params = cls(
            agent_id=check_agent_id(raw["agent_id"]),
            restore=_flag(raw, "restore", True),
            create=_flag(raw, "create", False),
            snapshot_id=_optional_id(raw, "snapshot_id"),
            turn_id=_optional_id(raw, "turn_id"),
        )
        if params.snapshot_id is not None and not params.restore:
            raise InvalidInput(f"{FIELD}: snapshot_id restores a snapshot, restore=false starts from zero; pick one")
        return params


@dataclass(frozen=True)
class ConnectorParams:
    """What `FastWeightConnector` is told about one vLLM request (``kv_transfer_params`` / ``extra_args``).

    Attributes:
        agent_id: the agent.
        restore: restore a state into the window header (False: the request runs from S = 0).
        snapshot_id: a snapshot holding the state to restore (None: the agent's current one).
        state_key: `agentsleep.serving.resident.state_key` of that state: the connector reuses the header it computed
            for the same state (every turn between two sleeps), without reading the store.
        sleep: copy the GDN state out of vLLM after the prompt and save it as a one-pass sleep (`VLLMEngine`).
        expect_current: for ``sleep``: the compare-and-set of that save (`SnapshotStore.save`).
    """

    agent_id: str
    restore: bool = True
    snapshot_id: str | None = None
    state_key: str | None = None
    sleep: bool = False
    expect_current: str | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("agent_id", "restore", "snapshot_id", "state_key", "sleep", "expect_current")

    @classmethod
    def parse(cls, raw: Any) -> ConnectorParams | None:
        """None for requests without an agent (stateless); `InvalidInput` for malformed parameters."""
        if not raw or not isinstance(raw, dict) or "agent_id" not in raw:
            return None
        _check_keys(raw, cls.KEYS)
        key = raw.get("state_key")
        if key is not None and not isinstance(key, str):
            raise InvalidInput(f"{FIELD}.state_key must be a string, got {key!r}")
        expect = raw.get("expect_current")
        if expect is not None and not isinstance(expect, str):
            raise InvalidInput(f"{FIELD}.expect_current must be a snapshot id, got {expect!r}")
        return cls(
            agent_id=check_agent_id(raw["agent_id"]),
            restore=_flag(raw, "restore", True),
            snapshot_id=_optional_id(raw, "snapshot_id"),
            state_key=key,
            sleep=_flag(raw, "sleep", False),
            expect_current=expect,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"agent_id": self.agent_id, "restore": self.restore}
        for name in ("snapshot_id", "state_key", "expect_current"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.sleep:
            out["sleep"] = True
        return out


__all__ = ["FIELD", "AgentParams", "ConnectorParams"]
