"""One row per scenario and backend, and the table `python -m tests.reliability` prints (docs/store.md holds one)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentsleep.errors import AgentSleepError

COLUMNS = [
    ("scenario", "scenario"),
    ("backend", "backend"),
    ("operations", "operations"),
    ("acknowledged", "saves acknowledged"),
    ("lost", "lost"),
    ("typed", "errors typed"),
    ("untyped", "errors untyped"),
    ("silent", "silently wrong"),
    ("seconds", "seconds"),
]


@dataclass
class Row:
    """What one scenario counted. ``lost``: acknowledged saves (or turns, or jobs) that did not survive; ``typed``
    and ``untyped``: errors raised, of agentsleep's hierarchy or not; ``silent``: calls that returned wrong data."""

    scenario: str
    backend: str
    operations: int = 0
    acknowledged: int = 0
    lost: int = 0
    typed: int = 0
    untyped: int = 0
    silent: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def call(self, fn: Callable[[], Any]) -> tuple[str, Any]:
        """Run ``fn`` and count its outcome: ("ok", result), ("typed", exc) or ("untyped", exc)."""
        self.operations += 1
        try:
            return "ok", fn()
        except AgentSleepError as e:
            self.typed += 1
            return "typed", e
        except Exception as e:
            self.untyped += 1
            self.notes.append(f"untyped {type(e).__name__}: {str(e)[:120]}")
            return "untyped", e

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.untyped == 0 and self.silent == 0


class timed:
    """``with timed(row):`` records the wall time of the block in ``row.seconds``."""

    def __init__(self, row: Row) -> None:
        self.row = row

    def __enter__(self) -> Row:
        self.t0 = time.perf_counter()
        return self.row

    def __exit__(self, *exc: object) -> None:
        self.row.seconds = time.perf_counter() - self.t0


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k in ("scenario", "backend") else "---:" for k, _ in COLUMNS) + "|"
    lines = [head, rule]
    for r in rows:
        cells = [f"{getattr(r, k):.1f}" if k == "seconds" else str(getattr(r, k)) for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
