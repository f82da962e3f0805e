"""Errors specific to the LangChain integration (all in agentsleep's hierarchy, so `AgentSleepError` catches them)."""

from __future__ import annotations

from agentsleep.errors import InvalidInput, WindowOverflow


class MissingAgentKey(InvalidInput):
    """`SleepMemory` cannot tell which agent a run belongs to: no thread id, no explicit agent id.

    Run the agent with a checkpointer and ``config={"configurable": {"thread_id": ...}}``, or construct
    ``SleepMemory(..., agent_id=...)`` / ``agent_key=...``, or put ``agent_id`` into the runtime context.
    """


class MessageTooLong(WindowOverflow, InvalidInput):
    """One message is longer than the model's attention window can ever hold, so it can never be shown to the model.

    Raised before the model runs; `SleepMemory` also takes the message out of the graph state, so the thread goes on
    as if it had not been sent. Split the input into several messages that each fit (the model folds earlier ones
    into its fast weights by sleeping), or summarise it first.

    Attributes:
        tokens: the message's tokens with the model's tokenizer and chat template.
        limit: the most tokens one message may have beside the system prompt and the shortest reply.
        message_id: the message's id, if it has one.
    """

    def __init__(self, message: str, *, tokens: int, limit: int, message_id: str | None = None) -> None:
        super().__init__(message)
        self.tokens = tokens
        self.limit = limit
        self.message_id = message_id


__all__ = ["MessageTooLong", "MissingAgentKey"]
