"""Live agents: the `Engine` protocol, the embedded `TorchEngine`, sessions, and revival from snapshots.

    from agentsleep.runtime import TorchEngine, SamplingParams
    engine = TorchEngine.from_pretrained("checkpoints/depo-micro-n4")
    engine.create_agent("alice")
    engine.observe("alice", engine.encode("a b c"))
    out = engine.generate("alice", engine.encode("q"), SamplingParams(max_new_tokens=8))
    engine.sleep("alice")                       # N passes over the window into S; the window is cleared

See docs/runtime.md for the snapshot convention, over-long turns, batching and the latency numbers.
"""

from agentsleep.runtime.engine import (
    AgentMemory,
    AgentSession,
    Engine,
    GenerateRequest,
    Generation,
    ObserveResult,
    PersistMemory,
    PersistSleep,
    SamplingParams,
    SleepCommit,
    SleepResult,
    SleepTrigger,
    TokenIds,
    check_token_ids,
)
from agentsleep.runtime.revive import memory_from_snapshot, revive, save_memory
from agentsleep.runtime.sampling import sample_next
from agentsleep.runtime.text import TextCodec
from agentsleep.runtime.torch_engine import TorchEngine

__all__ = [
    "AgentMemory",
    "AgentSession",
    "Engine",
    "GenerateRequest",
    "Generation",
    "ObserveResult",
    "PersistMemory",
    "PersistSleep",
    "SamplingParams",
    "SleepCommit",
    "SleepResult",
    "SleepTrigger",
    "TextCodec",
    "TokenIds",
    "TorchEngine",
    "check_token_ids",
    "memory_from_snapshot",
    "revive",
    "sample_next",
    "save_memory",
]
