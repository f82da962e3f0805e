"""How deep a sleep goes, as a value: N passes, or `AutoPasses` (until S has converged, at most ``max_passes``).

A plain-data module (no torch): the store records a job's depth and the policies, CLIs and engines parse one, without
loading the model. The adaptive sleep itself is `agentsleep.model.adaptive`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from agentsleep.errors import InvalidInput

Criterion = Literal["state", "kl"]
CRITERIA: tuple[str, ...] = ("state", "kl")


@dataclass(frozen=True)
class AutoPasses:
    """``passes="auto"`` as a value: sleep each label-free window adaptively (for `forward_adaptive` and scorers)."""

    max_passes: int = 8
    tol: float = 0.05
    criterion: Criterion = "state"

    def __post_init__(self) -> None:
        check_auto(self.max_passes, self.tol, self.criterion)

    def __str__(self) -> str:
        return f"auto(max {self.max_passes}, {self.criterion} < {self.tol:g})"


def check_auto(max_passes: int, tol: float, criterion: str) -> None:
    """Raise `InvalidInput` for an unusable adaptive-sleep setting."""
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise InvalidInput(f"max_passes must be an integer ≥ 1, got {max_passes!r}")
    if not isinstance(tol, int | float) or isinstance(tol, bool) or math.isnan(tol) or tol < 0:
        raise InvalidInput(f"tol must be a number ≥ 0, got {tol!r}")
    if criterion not in CRITERIA:
        raise InvalidInput(f"criterion must be one of {CRITERIA}, got {criterion!r}")


Passes = int | AutoPasses
"""How deep a sleep goes: N passes, or ``AutoPasses`` (stop when S has converged, at most ``max_passes``)."""


def check_passes(value: object, what: str = "passes") -> Passes:
    """``value`` as a sleep depth: an int ≥ 1, an `AutoPasses`, or its JSON form (`passes_to_json`); else
    `InvalidInput`. The one parser for every place a depth arrives from outside (policies, jobs, CLIs)."""
    if isinstance(value, AutoPasses):
        return value
    if isinstance(value, dict):
        keys = {"auto", "max_passes", "tol", "criterion"}
        if value.get("auto") is not True or not set(value) <= keys:
            raise InvalidInput(f"{what} must be an int >= 1 or {{'auto': true, 'max_passes', 'tol', 'criterion'}}")
        try:
            return AutoPasses(**{k: v for k, v in value.items() if k != "auto"})
        except TypeError as e:  # pragma: no cover - the key check above makes this unreachable
            raise InvalidInput(f"{what}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{what} must be an int >= 1 or adaptive ('auto'), got {value!r}")
    return value


def passes_to_json(passes: Passes) -> int | dict[str, object]:
    """The JSON form of a depth (a job argument, a run record): the int, or ``{"auto": true, ...}``."""
    if isinstance(passes, AutoPasses):
        return {"auto": True, "max_passes": passes.max_passes, "tol": passes.tol, "criterion": passes.criterion}
    return passes


def cap_passes(passes: Passes, cap: int | None) -> Passes:
    """``passes`` with at most ``cap`` passes (a sleep cut short by the idle time it has); ``cap`` None: unchanged."""
    if cap is None:
        return passes
    cap = max(1, int(cap))
    if isinstance(passes, AutoPasses):
        return AutoPasses(min(passes.max_passes, cap), passes.tol, passes.criterion)
    return min(passes, cap)


def nominal_passes(passes: Passes) -> int:
    """The most passes a sleep of this depth runs (N, or ``max_passes``): what a skipped sleep reports."""
    return passes.max_passes if isinstance(passes, AutoPasses) else passes
