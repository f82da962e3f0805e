"""The per-request agent parameters (``kv_transfer_params``), parsed without importing vLLM (the server's middleware
and the connector share this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentsleep.errors import InvalidInput


@dataclass(frozen=True)
class AgentParams:
    """The parsed ``kv_transfer_params`` of one request."""

    agent_id: str
    snapshot_id: str | None = None
    restore: bool = True
    save: bool = True
    sleep: bool = False

    @classmethod
    def parse(cls, raw: Any) -> AgentParams | None:
        """None for requests without an agent (stateless); `InvalidInput` for malformed parameters."""
        if not raw or not isinstance(raw, dict) or "agent_id" not in raw:
            return None
        agent_id = raw["agent_id"]
        if not isinstance(agent_id, str) or not agent_id:
            raise InvalidInput(f"kv_transfer_params.agent_id must be a non-empty string, got {agent_id!r}")
        snapshot_id = raw.get("snapshot_id")
        if snapshot_id is not None and not isinstance(snapshot_id, str):
            raise InvalidInput(f"kv_transfer_params.snapshot_id must be a string, got {snapshot_id!r}")
        flags = {}
        for name, default in (("restore", True), ("save", True), ("sleep", False)):
            value = raw.get(name, default)
            if not isinstance(value, bool):
                raise InvalidInput(f"kv_transfer_params.{name} must be true or false, got {value!r}")
            flags[name] = value
        return cls(agent_id=agent_id, snapshot_id=snapshot_id, **flags)


__all__ = ["AgentParams"]
