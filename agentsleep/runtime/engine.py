"""The `Engine` protocol every model runner implements, and the small typed records it speaks in.

An agent's entire memory is (S, the tokens of its current window) — `AgentMemory`. An engine keeps many agents live:
`observe` appends tokens to an agent's window (one pass each), `generate` wakes it (one pass per new token), `sleep`
folds the window into S with N passes and clears it, `export_state` / `import_state` move the memory in and out.

Snapshot convention (backend-neutral: the torch engine and the vLLM engine restore the same thing): a snapshot is the
`FastWeights` the current window *started from* plus the window's real token ids (no BOS). Restoring it opens a
window on that state and replays the tokens through pass 1. Right after a sleep the window is empty, so a post-sleep
snapshot restores bit-exactly; a mid-window replay runs the window in one prefill instead of token by token, which
agrees to float rounding (docs/runtime.md gives the measured size and the tolerance the tests assert).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentsleep.errors import InvalidInput
from agentsleep.model.adaptive import Passes
from agentsleep.model.state import FastWeights

TokenIds = Sequence[int] | torch.Tensor
SleepTrigger = Literal["sleep", "window_full"]
"""`sleep`: asked for (`Engine.sleep`, usually by the scheduler). `window_full`: the window had no room for the next
token inside `observe` / `generate`, so the call slept before going on (the paper's rule, paper.md §5)."""


@dataclass(frozen=True, slots=True)
class AgentMemory:
    """An agent's whole memory: the state its current window started from, and that window's token ids.

    Attributes:
        state: fast weights (batch of one) the current window started from.
        window: the window's real token ids, BOS excluded; at most L, plus at most one generated token that did not
            fit any more and waits for the next window.
        tokens_consolidated: tokens folded into ``state`` over the agent's life (bookkeeping, travels with it).
        sleep_count: sleeps over the agent's life.
        tokens_seen: tokens the agent has taken in over its life (consolidated + window).
    """

    state: FastWeights
    window: tuple[int, ...] = ()
    tokens_consolidated: int = 0
    sleep_count: int = 0
    tokens_seen: int = 0


@dataclass(frozen=True, slots=True)
class AgentSession:
    """A consistent view of one live agent (a copy: it does not change as the agent goes on).

    ``tokens_since_sleep`` equals ``len(window)``: a sleep clears the window, and every token taken in since then is
    in it (under sliding eviction the retained keys/values live in S's side of the memory, not in the window).
    """

    agent_id: str
    window: tuple[int, ...]
    sleep_count: int
    snapshot_id: str | None
    tokens_consolidated: int
    tokens_seen: int

    @property
    def window_tokens(self) -> int:
        return len(self.window)

    @property
    def tokens_since_sleep(self) -> int:
        return len(self.window)


class SamplingParams(BaseModel):
    """How `generate` picks tokens. ``temperature=0`` is greedy; otherwise softmax(logits / T), optionally restricted
    to the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p`` (nucleus sampling,
    Holtzman et al. 2019), drawn with the request's `torch.Generator` (seeded for reproducibility)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(32, ge=0, description="tokens to generate at most (0: only take the prompt in)")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (argmax); > 0 = sample")
    top_k: int | None = Field(None, ge=1, description="keep only the k most likely tokens (sampling only)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus mass to keep (sampling only)")
    seed: int | None = Field(None, ge=0, description="seed of a fresh torch.Generator for this call")
    stop_tokens: tuple[int, ...] = Field((), description="stop after emitting any of these ids (it is kept)")

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one error type for users, as everywhere else
            raise InvalidInput(f"invalid sampling parameters: {e}") from e

    @field_validator("stop_tokens", mode="before")
    @classmethod
    def _stops(cls, v: object) -> tuple[int, ...]:
        if isinstance(v, int):
            return (v,)
        return tuple(v)  # type: ignore[arg-type]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True, slots=True)
class ObserveResult:
    """What `observe` did. ``logits[i]`` ([n, vocab], only with ``return_logits``) predicts the token after token i."""

    agent_id: str
    tokens: int
    sleeps: int  # window-full sleeps this call waited for
    window_tokens: int
    logits: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class Generation:
    """What `generate` produced.

    ``logits[j]`` is the distribution token j was drawn from ([n_new, vocab]); ``prompt_logits[i]`` predicts the
    token after prompt token i ([n_prompt, vocab]); both only with ``return_logits``. The last new token is taken
    into the window but runs through the model only with the agent's next input (its logits are not needed yet).
    """

    agent_id: str
    tokens: tuple[int, ...]
    stop_reason: Literal["stop", "length"]
    prompt_tokens: int
    sleeps: int  # window-full sleeps this call waited for
    window_tokens: int
    logits: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class SleepCommit:
    """A sleep about to be committed: handed to the ``persist`` callback before the agent's memory is swapped."""

    agent_id: str
    memory: AgentMemory  # the agent's memory right after the sleep (window: tokens carried into the new window)
    passes: int  # passes run (an adaptive sleep: where it stopped)
    tokens: int  # window tokens consolidated by this sleep
    trigger: SleepTrigger


@dataclass(frozen=True, slots=True)
class SleepResult:
    """What `sleep` did. ``skipped``: ``"empty"`` (nothing to consolidate) or ``"superseded"`` (another sleep or an
    import replaced the window while this one computed; its result was dropped)."""

    agent_id: str
    passes: int  # passes run (an adaptive sleep: where it stopped; a skipped one: the most it would have run)
    tokens: int
    skipped: Literal["empty", "superseded"] | None
    snapshot_id: str | None
    seconds: float
    carried: int = 0  # tokens that arrived while the sleep computed, replayed into the new window


PersistSleep = Callable[[SleepCommit], "str | None"]
"""Save a sleep's result (e.g. `SnapshotStore.save`) and return the snapshot id. Called with the agent locked, before
the swap: if it raises, the agent keeps its old memory (a requested sleep then fails; see `Engine.sleep`)."""

PersistMemory = Callable[[AgentMemory], "str | None"]
"""Save an agent's current memory and return the snapshot id (`Engine.checkpoint`)."""


@dataclass(frozen=True)
class GenerateRequest:
    """One agent's part of a batched generation (`TorchEngine.generate_batch`)."""

    agent_id: str
    prompt: TokenIds
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None


@runtime_checkable
class Engine(Protocol):
    """A model runner hosting many agents. `TorchEngine` is the embedded reference; every engine must agree with it.

    Thread safety: every method may be called from any thread; calls on one agent are serialised, calls on different
    agents may run at once. Errors: `UnknownAgent`, `InvalidInput` (bad ids, empty input, bad sampling parameters),
    `SnapshotMismatch` (a memory of another model), `SleepFailed` (a window-full sleep could not be computed).
    """

    @property
    def fingerprint(self) -> str: ...  # the model's (SleepHybrid.fingerprint): snapshots must carry the same

    @property
    def window(self) -> int: ...  # L

    @property
    def passes(self) -> Passes: ...  # default N, or AutoPasses (adaptive depth)

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str | bytes) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def create_agent(self, agent_id: str) -> AgentSession: ...

    def has_agent(self, agent_id: str) -> bool: ...

    def agent_ids(self) -> list[str]: ...

    def remove_agent(self, agent_id: str) -> None: ...

    def session(self, agent_id: str) -> AgentSession: ...

    def observe(
        self,
        agent_id: str,
        tokens: TokenIds,
        *,
        return_logits: bool = False,
        passes: Passes | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> ObserveResult: ...

    def generate(
        self,
        agent_id: str,
        prompt: TokenIds,
        sampling: SamplingParams | None = None,
        *,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
        passes: Passes | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> Generation: ...

    def sleep(
        self, agent_id: str, passes: Passes | None = None, *, persist: PersistSleep | None = None
    ) -> SleepResult: ...

    def checkpoint(self, agent_id: str, persist: PersistMemory) -> str | None: ...

    def export_state(self, agent_id: str) -> AgentMemory: ...

    def import_state(self, agent_id: str, memory: AgentMemory, *, snapshot_id: str | None = None) -> AgentSession: ...


def check_token_ids(tokens: object, vocab_size: int, *, what: str = "tokens", allow_empty: bool = False) -> list[int]:
    """Validate token ids (a sequence of ints or a 1-D integer tensor) and return them as a list.

    Raises:
        InvalidInput: text instead of ids, a non-integer, an id outside [0, vocab_size), or an empty input.
    """
    if isinstance(tokens, str | bytes | bytearray | memoryview):
        raise InvalidInput(f"{what} must be token ids, got {type(tokens).__name__}; encode text with engine.encode()")
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InvalidInput(f"{what} must be a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        ids = [int(t) for t in tokens.tolist()]
    else:
        try:
            items = list(tokens)  # type: ignore[call-overload]
        except TypeError as e:
            raise InvalidInput(f"{what} must be a sequence of token ids, got {type(tokens).__name__}") from e
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in items):
            bad = next(t for t in items if isinstance(t, bool) or not isinstance(t, numbers.Integral))
            raise InvalidInput(f"{what} must be integer token ids; found {bad!r} ({type(bad).__name__})")
        ids = [int(t) for t in items]
    if not ids and not allow_empty:
        raise InvalidInput(f"{what} is empty: an agent turn needs at least one token")
    bad_ids = [t for t in ids if not 0 <= t < vocab_size]
    if bad_ids:
        raise InvalidInput(f"{what} holds ids outside the vocabulary [0, {vocab_size}): {bad_ids[:5]}")
    return ids


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
    "TokenIds",
    "check_token_ids",
]
