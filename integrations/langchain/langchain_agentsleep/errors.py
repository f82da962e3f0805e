"""Errors specific to the LangChain integration (all in agentsleep's hierarchy, so `AgentSleepError` catches them)."""

from __future__ import annotations

from agentsleep.errors import InvalidInput


class MissingAgentKey(InvalidInput):
    """`SleepMemory` cannot tell which agent a run belongs to: no thread id, no explicit agent id.

    Run the agent with a checkpointer and ``config={"configurable": {"thread_id": ...}}``, or construct
    ``SleepMemory(..., agent_id=...)`` / ``agent_key=...``, or put ``agent_id`` into the runtime context.
    """


__all__ = ["MissingAgentKey"]
