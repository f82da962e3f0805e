"""The reliability suite at a given scale, on SQLite and (if given) Postgres: the rows of the table."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import scenarios as sc
from .report import Row


@dataclass(frozen=True)
class Scale:
    """How big each scenario runs. ``SMALL`` is CI's (a couple of minutes in all); ``FULL`` is the size of the
    review that found the bugs (150 races, 100+ SIGKILLs, 4 workers x 200 jobs)."""

    kill_rounds: int
    kill_writers: int
    races: int
    flips: int
    cuts: int
    cas_writers: int
    cas_saves: int
    park_agents: int
    live_turns: int
    queue_workers: int
    queue_jobs: int
    queue_kills: int


SMALL = Scale(kill_rounds=2, kill_writers=2, races=20, flips=60, cuts=10, cas_writers=4, cas_saves=10,
              park_agents=4, live_turns=20, queue_workers=2, queue_jobs=20, queue_kills=1)  # fmt: skip
FULL = Scale(kill_rounds=30, kill_writers=3, races=150, flips=1000, cuts=200, cas_writers=4, cas_saves=100,
             park_agents=20, live_turns=200, queue_workers=4, queue_jobs=200, queue_kills=8)  # fmt: skip


def scenarios(scale: Scale, tmp: Path) -> list[tuple[str, bool, Callable[[str], Row]]]:
    """(name, Postgres only, run(url) -> Row) for every scenario."""
    models: list[object] = []
    ckpt: list[str] = []

    def model():  # type: ignore[no-untyped-def]  # built on first use, not when the scenarios are listed
        if not models:
            models.append(sc.toy_model())
        return models[0]

    def checkpoint() -> str:
        if not ckpt:
            ckpt.append(sc.checkpoint_dir(tmp))
        return ckpt[0]

    def blobs(name: str) -> str:
        return sc.fresh_blob_dir(tmp, name)

    return [
        ("sigkill", False, lambda url: sc.sigkill_shared_files(
            url, blobs("kill-blobs"), rounds=scale.kill_rounds, writers=scale.kill_writers)),
        ("race", False, lambda url: sc.blob_race(url, blobs("race-blobs"), iterations=scale.races)),
        ("flips", False, lambda url: sc.bit_flips(url, blobs("flip-blobs"), flips=scale.flips)),
        ("truncation", False, lambda url: sc.truncation(url, blobs("cut-blobs"), tmp, cuts=scale.cuts)),
        ("cas", False, lambda url: sc.cas_writers(url, writers=scale.cas_writers, saves=scale.cas_saves)),
        ("bad-input", False, lambda url: sc.bad_inputs(url, Path(tempfile.mkdtemp(dir=tmp)))),
        ("park", False, lambda url: sc.park_flow(url, model(), agents=scale.park_agents)),
        ("live", False, lambda url: sc.live(url, model(), turns=scale.live_turns, workers=2)),
        ("queue", True, lambda url: sc.queue_exactly_once(
            url, checkpoint(), workers=scale.queue_workers, jobs=scale.queue_jobs, kills=scale.queue_kills)),
    ]  # fmt: skip


@contextmanager
def sqlite_url(tmp: Path, name: str) -> Iterator[str]:
    d = Path(tempfile.mkdtemp(dir=tmp, prefix=name))
    yield f"sqlite:///{d / 'store.db'}"
