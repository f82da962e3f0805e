"""When to sleep: token counting, the sleep policy, and the background sleep scheduler.

* `TokenCounter` — exact window counts with the model's tokenizer; offline tiktoken counts for text budgets.
* `SleepPolicy` — window L, passes N, soft threshold, idle sleep, retries, timeouts (pydantic, frozen).
* `SleepScheduler` — runs a `SleepJob` in the background: per-agent debounce, one sleep per agent at a time,
  a synchronous `sleep_now` only when a turn cannot fit, failures retried and never raised into a turn.
* `AgentHost` — agents' turns on an engine with background sleeps and compare-and-set snapshots; `park` hands an
  agent's sleep to `SleepWorker` — procrastinate workers consolidating agents queued in a Postgres store
  (`agentsleep sleep-worker`).
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

# The host and the sleep worker pull in torch and the runtime: import them only when asked for.
_LAZY = {"AgentHost": "host", "ParkResult": "host", "TurnResult": "host", "SleepWorker": "worker"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"agentsleep.memory.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'agentsleep.memory' has no attribute {name!r}")


__all__ = [
    "AgentHost",
    "EncodingName",
    "ManualClock",
    "ParkResult",
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
    "SleepWorker",
    "TokenCounter",
    "TurnResult",
    "offline_encoding",
]
