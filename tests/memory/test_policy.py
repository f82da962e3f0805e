"""SleepPolicy: arithmetic on window fill, retry backoff, validation, settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentsleep.errors import InvalidInput
from agentsleep.memory import SleepPolicy


def test_defaults_and_frozen() -> None:
    policy = SleepPolicy(window=1024)
    assert (policy.passes, policy.soft_threshold, policy.idle_seconds, policy.snapshot_after_sleep) == (
        4,
        0.75,
        None,
        True,
    )
    with pytest.raises(ValidationError):
        policy.passes = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        SleepPolicy(window=10, pases=2)  # a typo is an error, not a silent default
    for name, field in SleepPolicy.model_fields.items():
        assert field.description, f"{name} has no description"


@pytest.mark.parametrize(
    ("window", "threshold", "limit"),
    [(10, 0.7, 7), (12, 0.75, 9), (1024, 1.0, 1024), (1000, 0.0001, 1), (3, 0.5, 2), (100, 0.333, 34)],
    ids=["W10-0.7-float-edge", "W12-0.75", "W1024-full", "W1000-tiny", "W3-half-rounds-up", "W100-0.333"],
)
def test_soft_limit(window: int, threshold: float, limit: int) -> None:
    policy = SleepPolicy(window=window, soft_threshold=threshold)
    assert policy.soft_limit_tokens == limit
    assert policy.should_sleep_after_turn(limit)
    assert not policy.should_sleep_after_turn(limit - 1)


def test_must_sleep_before() -> None:
    policy = SleepPolicy(window=100)
    assert not policy.must_sleep_before(60, 40)  # exactly fills the window
    assert policy.must_sleep_before(60, 41)
    assert policy.must_sleep_before(100, 1)
    assert not policy.must_sleep_before(0, 500)  # an empty window: sleeping makes no room
    assert not policy.fits_empty_window(101)
    assert policy.fits_empty_window(100)
    with pytest.raises(InvalidInput, match="window_tokens must be >= 0"):
        policy.must_sleep_before(-1, 5)
    with pytest.raises(InvalidInput, match="incoming_tokens"):
        policy.must_sleep_before(5, -1)
    with pytest.raises(InvalidInput):
        policy.should_sleep_after_turn(-3)


def test_retry_delay_doubles_and_caps() -> None:
    policy = SleepPolicy(window=8, retry_backoff_seconds=0.5, retry_backoff_max_seconds=3.0)
    assert [policy.retry_delay(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.retry_delay(10_000) == 3.0  # no overflow on a long failure streak
    with pytest.raises(InvalidInput):
        policy.retry_delay(0)


@pytest.mark.parametrize(
    "bad",
    [
        {"passes": 0},
        {"soft_threshold": 0.0},
        {"soft_threshold": 1.5},
        {"idle_seconds": -1.0},
        {"idle_seconds": 0.0},
        {"window": 0},
        {"debounce_seconds": -0.1},
        {"max_retries": -1},
        {"retry_backoff_seconds": 0.0},
        {"sleep_timeout_seconds": 0.0},
        {"retry_backoff_seconds": 5.0, "retry_backoff_max_seconds": 1.0},
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_validation_errors(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SleepPolicy(**{"window": 64, **bad})


def test_idle_none_disables() -> None:
    assert SleepPolicy(window=8, idle_seconds=None).idle_seconds is None


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSLEEP_SLEEP_WINDOW", "2048")
    monkeypatch.setenv("AGENTSLEEP_SLEEP_IDLE_SECONDS", "30")
    monkeypatch.setenv("AGENTSLEEP_SLEEP_PASSES", "8")
    policy = SleepPolicy.from_env(passes=2)
    assert type(policy) is SleepPolicy
    assert (policy.window, policy.idle_seconds, policy.passes) == (2048, 30.0, 2)  # keyword arguments win
    # Constructing a policy in code never reads the environment.
    assert SleepPolicy(window=16).passes == 4
    monkeypatch.setenv("AGENTSLEEP_SLEEP_PASSES", "0")
    with pytest.raises(ValidationError):
        SleepPolicy.from_env()
