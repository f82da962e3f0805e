"""When an agent should sleep: the knobs, and the arithmetic on window fill.

The paper's rule is "sleep whenever the window is full" (paper §5). An agent that waits for that has to sleep on the
response path, so `SleepPolicy` adds a *soft* threshold (sleep in the background between turns once the window is this
full) and an *idle* timer (sleep between tasks), and keeps the hard rule only as the last resort: when the next turn
cannot fit, that turn waits for one sleep.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentsleep.errors import InvalidInput
from agentsleep.model.adaptive import AutoPasses, Criterion, Passes, cap_passes, nominal_passes

ENV_PREFIX = "AGENTSLEEP_SLEEP_"


class SleepPolicy(BaseModel):
    """When to sleep, how hard, and what to do when a sleep fails.

    Example:
        >>> policy = SleepPolicy(window=1024, passes=4, soft_threshold=0.75, idle_seconds=60)
        >>> policy.should_sleep_after_turn(800), policy.must_sleep_before(1000, incoming_tokens=100)
        (True, True)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: int = Field(gt=0, description="L: the attention window in tokens; a window never holds more than this.")
    passes: int | Literal["auto"] = Field(
        default=4,
        description="N: offline passes over the window per sleep. N = 1 is the plain hybrid (no extra compute); "
        "4 is Ouro's loop count, which the paper's N replaces (paper spec §2). 'auto': adaptive depth, passes until "
        "S has converged (`tol`), at most `max_passes`; for models trained with sampled N (docs/training.md).",
    )
    max_passes: int = Field(default=8, ge=1, description="passes='auto': the most passes one sleep runs (N_max).")
    tol: float = Field(
        default=0.05,
        ge=0.0,
        description="passes='auto': stop once the relative change of S between two passes is below this (criterion "
        "'state'), or the mean KL of successive passes' predictions on the window is (criterion 'kl', nats).",
    )
    criterion: Criterion = Field(default="state", description="passes='auto': the convergence test, 'state' or 'kl'.")
    max_sleep_seconds: float | None = Field(
        default=None,
        gt=0.0,
        description="Cap each scheduled sleep's passes so it should end within this many seconds (the idle time an "
        "agent can spare), from the seconds per pass its earlier sleeps took; None: no cap. The first sleep, with "
        "nothing measured yet, runs uncapped.",
    )
    soft_threshold: float = Field(
        default=0.75,
        gt=0.0,
        le=1.0,
        description="After a turn, schedule a background sleep once the window holds at least this fraction of L.",
    )
    idle_seconds: float | None = Field(
        default=None,
        gt=0.0,
        description="Sleep after this many seconds without a turn ('sleep between tasks'); None disables it. Off by "
        "default: an early sleep trades attention context for consolidation.",
    )
    debounce_seconds: float = Field(
        default=1.0,
        ge=0.0,
        description="A threshold sleep waits this long after the last turn, so a burst of turns yields one sleep.",
    )
    snapshot_after_sleep: bool = Field(
        default=True, description="Persist the new fast-weight state to the snapshot store after every sleep."
    )
    max_retries: int = Field(
        default=3, ge=0, description="Retries after a failed sleep attempt; the agent keeps its last good state."
    )
    retry_backoff_seconds: float = Field(
        default=1.0, gt=0.0, description="Delay before the first retry; doubles on each further failure."
    )
    retry_backoff_max_seconds: float = Field(default=60.0, gt=0.0, description="Cap on the retry delay.")
    sleep_timeout_seconds: float = Field(
        default=120.0,
        gt=0.0,
        description="How long a turn that cannot fit waits for its sleep before giving up with SleepFailed. A "
        "background sleep past this is only logged: a running sleep is never abandoned half-way.",
    )
    max_turn_seconds: float = Field(
        default=300.0,
        gt=0.0,
        description="A background sleep does not start while its agent is inside a turn; after this long without "
        "turn_finished the turn is presumed dead and the sleep may start.",
    )

    @model_validator(mode="after")
    def _check_backoff(self) -> SleepPolicy:
        if isinstance(self.passes, int) and self.passes < 1:
            raise ValueError(f"passes must be >= 1 or 'auto', got {self.passes}")
        if self.retry_backoff_max_seconds < self.retry_backoff_seconds:
            raise ValueError(
                f"retry_backoff_max_seconds ({self.retry_backoff_max_seconds}) is below retry_backoff_seconds "
                f"({self.retry_backoff_seconds}); raise the cap or lower the base delay"
            )
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> SleepPolicy:
        """Read `AGENTSLEEP_SLEEP_<FIELD>` environment variables (e.g. `AGENTSLEEP_SLEEP_WINDOW=2048`); keyword
        arguments win over the environment."""
        return cls(**_SleepPolicyEnv(**overrides).model_dump())

    @classmethod
    def with_depth(cls, window: int, passes: Passes, **fields: Any) -> SleepPolicy:
        """A policy sleeping ``passes`` deep (an engine's default: N or `AutoPasses`); other fields as given."""
        if isinstance(passes, AutoPasses):
            depth = {"passes": "auto", "max_passes": passes.max_passes, "tol": passes.tol}
            return cls(window=window, criterion=passes.criterion, **depth, **fields)
        return cls(window=window, passes=passes, **fields)

    @property
    def sleep_passes(self) -> Passes:
        """What a sleep runs, as engines take it: N, or `AutoPasses(max_passes, tol, criterion)` for 'auto'."""
        if self.passes == "auto":
            return AutoPasses(self.max_passes, self.tol, self.criterion)
        return self.passes

    @property
    def nominal_passes(self) -> int:
        """N, or ``max_passes`` for 'auto': the most passes one sleep runs."""
        return nominal_passes(self.sleep_passes)

    def passes_within(self, seconds: float | None, seconds_per_pass: float | None) -> Passes:
        """`sleep_passes` capped so that a sleep should take at most ``seconds`` (at ``seconds_per_pass``, a
        measurement); at least one pass always runs. Either argument None: no cap."""
        if seconds is None or seconds_per_pass is None or not seconds_per_pass > 0 or not math.isfinite(seconds):
            return self.sleep_passes
        return cap_passes(self.sleep_passes, max(1, math.floor(seconds / seconds_per_pass)))

    @property
    def soft_limit_tokens(self) -> int:
        """Window fill (tokens) at which `should_sleep_after_turn` turns true; at least 1."""
        # round() first: 0.7 * 10 is 7.000000000000001 in floats, which must mean 7 tokens, not 8.
        return max(1, math.ceil(round(self.soft_threshold * self.window, 9)))

    def should_sleep_after_turn(self, window_tokens: int) -> bool:
        """True when a window holding `window_tokens` is full enough to sleep between turns."""
        _check_count("window_tokens", window_tokens)
        return window_tokens >= self.soft_limit_tokens

    def must_sleep_before(self, window_tokens: int, incoming_tokens: int) -> bool:
        """True when `incoming_tokens` do not fit beside the `window_tokens` already held: the turn must wait for a
        sleep. An empty window never needs one (sleeping it would not make room); see `fits_empty_window`."""
        _check_count("window_tokens", window_tokens)
        _check_count("incoming_tokens", incoming_tokens)
        return window_tokens > 0 and window_tokens + incoming_tokens > self.window

    def fits_empty_window(self, incoming_tokens: int) -> bool:
        """False when `incoming_tokens` exceed L on their own: no sleep helps, the input must be split."""
        _check_count("incoming_tokens", incoming_tokens)
        return incoming_tokens <= self.window

    def retry_delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failed attempts (>= 1): base · 2^(failures−1), capped."""
        if failures < 1:
            raise InvalidInput(f"failures must be >= 1, got {failures}")
        # min() on the exponent first keeps 2**k finite for any failure streak.
        exponent = min(failures - 1, 62)
        return min(self.retry_backoff_seconds * 2.0**exponent, self.retry_backoff_max_seconds)


class _SleepPolicyEnv(BaseSettings, SleepPolicy):
    """`SleepPolicy` read from the environment; only `SleepPolicy.from_env` uses it, so that constructing a policy
    in code never picks up stray environment variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise InvalidInput(f"{name} must be >= 0, got {value}")


__all__ = ["ENV_PREFIX", "SleepPolicy"]
