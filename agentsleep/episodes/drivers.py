"""How an episode reaches a model: conditions (checkpoint + baseline), the `Driver` protocol, the AgentHost driver.

A `Condition` is one row of a score table: a checkpoint run with its own N (sleep), the same checkpoint with nothing
surviving a window (``truncate``: window truncation, old messages simply dropped), or a full-attention checkpoint that
reads the whole episode in one window (``full_history``).

Sleep points are the same in every driver, so drivers can be compared answer for answer:

* before a turn, if the window plus the turn plus the episode's reply reserve would not fit L, the agent sleeps
  (the one sleep a turn waits for);
* after a turn, once the window holds ``soft_threshold`` of L, a background sleep is scheduled; the runner waits for
  it (`Driver.settle`) before the next turn — except right after the turn it kills the process at, so a background
  sleep may be in flight when the SIGKILL lands;
* a turn marked ``sleep_before`` sleeps first (the agent was idle: the questions come after everything was evicted).

Full-history conditions never sleep.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from agentsleep.episodes.types import Episode, Turn
from agentsleep.errors import InvalidInput, UnknownAgent
from agentsleep.memory.policy import SleepPolicy
from agentsleep.model.hybrid import SleepHybrid, WindowCache
from agentsleep.model.state import FastWeights
from agentsleep.runtime.torch_engine import TorchEngine

logger = logging.getLogger(__name__)


class Condition(BaseModel):
    """One model setting an episode runs under."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="row label, e.g. 'sleep N=1', 'truncation', 'full attention'")
    checkpoint: str = Field(description="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    passes: int | None = Field(None, ge=1, description="N for sleeps (default: the checkpoint's own)")
    truncate: bool = Field(False, description="window truncation: S is reset to zeros at every sleep")
    full_history: bool = Field(False, description="never sleep: the whole episode stays in one window")
    soft_threshold: float = Field(0.8, gt=0.0, le=1.0, description="background sleep once the window is this full")

    def policy(self, engine: TorchEngine) -> SleepPolicy:
        return SleepPolicy.with_depth(
            engine.window,
            engine.passes,
            soft_threshold=1.0 if self.full_history else self.soft_threshold,
            debounce_seconds=0.0,  # the runner decides when turns come; no need to wait for a burst to end
            retry_backoff_seconds=0.05,
            retry_backoff_max_seconds=0.5,
        )

    def engine(self) -> TorchEngine:
        """A fresh engine on the checkpoint (whose sleeps keep nothing under ``truncate``)."""
        cls = TruncatingEngine if self.truncate else TorchEngine
        return cls.from_pretrained(self.checkpoint, passes=self.passes)

    def check_fits(self, episode: Episode, window: int) -> None:
        if self.full_history and episode.max_tokens > window:
            raise InvalidInput(
                f"{self.name}: episode {episode.id} needs {episode.max_tokens} tokens, the window holds {window}"
            )


# --------------------------------------------------------------------------------------------------- truncation


class _ForgetOnSleep:
    """A `SleepHybrid` whose sleeps keep nothing: the new state is zeros (what a window started from at birth).

    Everything else is the wrapped model's, so wake-time computation, fingerprints and snapshots are unchanged.
    """

    def __init__(self, model: SleepHybrid) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def sleep_window(self, cache: WindowCache, passes: int | None = None) -> FastWeights:
        return self._model.init_state(cache.ids.shape[0])

    def sleep(self, tokens: torch.Tensor, state: FastWeights, passes: int | None = None) -> FastWeights:
        return self._model.init_state(tokens.shape[0])


class TruncatingEngine(TorchEngine):
    """The window-truncation baseline: the same checkpoint, but a sleep drops the window and resets S to zeros.

    The agent then sees only the messages since its last sleep, as a chat that simply drops old messages would.
    """

    def __init__(self, model: SleepHybrid, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.model = _ForgetOnSleep(self.model)  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------------- drivers


class Driver(Protocol):
    """Runs episodes' turns on one stack (one process; many episodes, one agent each)."""

    def begin(self, episode: Episode, *, resume: bool) -> None:
        """A new agent for the episode, or (``resume``) the agent revived from the store in this fresh process."""

    def turn(self, episode: Episode, turn: Turn) -> tuple[int, ...]:
        """Send one turn; return the reply's token ids (empty for a fact)."""

    def sleep(self, episode: Episode) -> None:
        """Sleep the agent now (no-op on an empty window)."""

    def settle(self, episode: Episode) -> None:
        """Wait until the background sleeps scheduled so far have finished."""

    def sleeps(self, episode: Episode) -> int:
        """Sleeps over the agent's life (survives a revive)."""

    def in_flight(self, episode: Episode) -> bool:
        """Whether a background sleep of the agent is scheduled or running right now."""

    def finish(self, episode: Episode) -> None:
        """Done with the episode: free the live agent."""

    def close(self) -> None: ...


class HostDriver:
    """The embedded default stack: `TorchEngine` + SQLite `SnapshotStore` + `SleepPolicy` + scheduler, via `AgentHost`.

    Every turn is snapshotted (``snapshot_turns``), so a SIGKILL between turns loses nothing; a background sleep
    killed in flight is re-run on revive (`begin`), exactly as the scheduler would have run it.
    """

    def __init__(self, condition: Condition, workdir: Path) -> None:
        from agentsleep.memory.host import AgentHost
        from agentsleep.store import SnapshotStore

        self.condition = condition
        engine = condition.engine()
        self.policy = condition.policy(engine)
        self.store = SnapshotStore(f"sqlite:///{Path(workdir) / 'snapshots.db'}")
        self.host = AgentHost(engine, self.store, self.policy, background=True, snapshot_turns=True)

    @property
    def window(self) -> int:
        return self.policy.window

    def begin(self, episode: Episode, *, resume: bool) -> None:
        self.condition.check_fits(episode, self.window)
        if not resume:
            self.host.create(episode.id)
            return
        session = self.host.revive(episode.id)
        if not self.condition.full_history and self.policy.should_sleep_after_turn(session.window_tokens):
            logger.info("agent %r revived with a full window: its lost background sleep runs now", episode.id)
            self.host.sleep_now(episode.id)

    def turn(self, episode: Episode, turn: Turn) -> tuple[int, ...]:
        if turn.sleep_before and not self.condition.full_history:
            self.sleep(episode)
        w = self.host.session(episode.id).window_tokens
        if w > 0 and w + len(turn.ids) + episode.reserve > self.window:
            self.host.sleep_now(episode.id)
        res = self.host.turn(episode.id, list(turn.ids), max_new_tokens=turn.reply, stop_tokens=episode.stop_ids)
        return tuple(res.tokens)

    def sleep(self, episode: Episode) -> None:
        if self.host.session(episode.id).window_tokens > 0:
            self.host.sleep_now(episode.id)

    def settle(self, episode: Episode) -> None:
        self.host.flush()

    def sleeps(self, episode: Episode) -> int:
        return self.host.session(episode.id).sleep_count

    def in_flight(self, episode: Episode) -> bool:
        return any(not r.done for r in self.host.scheduler.history(episode.id))

    def finish(self, episode: Episode) -> None:
        self.host.flush()
        try:
            self.host.remove(episode.id)
        except UnknownAgent:
            pass

    def close(self) -> None:
        self.host.close()
        self.store.close()


def host_driver(condition: Condition, workdir: Path) -> HostDriver:
    """`DriverFactory` of the AgentHost stack (the name the worker imports)."""
    return HostDriver(condition, workdir)


__all__ = ["Condition", "Driver", "HostDriver", "TruncatingEngine", "host_driver"]
