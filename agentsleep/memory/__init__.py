"""When to sleep: token counting, the sleep policy, and the background sleep scheduler.

* `TokenCounter` — exact window counts with the model's tokenizer; offline tiktoken counts for text budgets.
* `SleepPolicy` — window L, passes N, soft threshold, idle sleep, retries, timeouts (pydantic, frozen).
* `SleepScheduler` — runs a `SleepJob` in the background: per-agent debounce, one sleep per agent at a time,
  a synchronous `sleep_now` only when a turn cannot fit, failures retried and never raised into a turn.
"""

from agentsleep.memory.policy import SleepPolicy
from agentsleep.memory.scheduler import (
    ManualClock,
    SchedulerStats,
    SleepHandle,
    SleepJob,
    SleepOutcome,
    SleepReason,
    SleepRecord,
    SleepRequest,
    SleepScheduler,
    SleepStatus,
)
from agentsleep.memory.tokens import EncodingName, TokenCounter, offline_encoding

_LAZY = {"AgentHost", "TurnResult"}  # the host pulls in torch and the runtime: import it only when asked for


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from agentsleep.memory import host

        return getattr(host, name)
    raise AttributeError(f"module 'agentsleep.memory' has no attribute {name!r}")


__all__ = [
    "AgentHost",
    "EncodingName",
    "ManualClock",
    "SchedulerStats",
    "SleepHandle",
    "SleepJob",
    "SleepOutcome",
    "SleepPolicy",
    "SleepReason",
    "SleepRecord",
    "SleepRequest",
    "SleepScheduler",
    "SleepStatus",
    "TokenCounter",
    "TurnResult",
    "offline_encoding",
]
