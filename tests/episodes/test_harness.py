"""The AgentHost driver end to end: SIGKILL at a turn, revive in a fresh process, same replies as uninterrupted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agentsleep.episodes.build import depo_episodes, gsm_episodes
from agentsleep.episodes.drivers import Condition, HostDriver, host_driver
from agentsleep.episodes.harness import kill_turns, run_chain, run_condition, threshold_turns
from agentsleep.errors import InvalidInput
from tests.episodes.helpers import depo_task, gsm_task

FACTORY = "agentsleep.episodes.drivers:host_driver"


def test_kill_and_revive_gives_the_uninterrupted_replies(suite: Path, tmp_path: Path) -> None:
    episodes = depo_episodes(depo_task().config, 2, seed=4)
    cond = Condition(name="sleep N=2", checkpoint=str(suite / "depo-n2"))
    outs = run_condition(episodes, cond, FACTORY, tmp_path / "n2", seed=1)
    assert [o.killed_at for o in outs] == list(kill_turns(episodes, 1, window=25).values())
    assert all(o.revive_equal for o in outs) and all(o.sleeps >= 3 for o in outs)
    assert all(len(o.questions) == 4 and all(q.answer for q in o.questions) for o in outs)
    # The replies depend on S: the truncation baseline (same weights, S dropped at every sleep) answers otherwise.
    cut = run_condition(episodes, cond.model_copy(update={"truncate": True}), FACTORY, tmp_path / "t", kill=False)
    assert [o.replies for o in cut] != [o.replies for o in outs]


def slow_host_driver(condition: Condition, workdir: Path) -> HostDriver:
    """A host driver whose sleeps take 0.5 s, so a SIGKILL 0–50 ms after a turn lands inside its background sleep."""
    driver = HostDriver(condition, workdir)
    engine = driver.host.engine
    plain = engine.sleep

    def sleep(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return plain(*args, **kwargs)

    engine.sleep = sleep  # type: ignore[method-assign]
    return driver


def test_kill_during_a_background_sleep(suite: Path, tmp_path: Path) -> None:
    ep = gsm_episodes(gsm_task().config, 1, seed=2)[0]
    cond = Condition(name="sleep N=2", checkpoint=str(suite / "gsm-last-n2"), soft_threshold=0.5)
    turns = threshold_turns(ep, 64, 0.5)
    assert turns, "the episode must cross the soft threshold somewhere"
    kills = {ep.id: turns[0]}
    full = run_chain([ep], cond, slow_host_driver, tmp_path / "full")
    cut = run_chain([ep], cond, slow_host_driver, tmp_path / "cut", kills=kills)
    assert cut.killed_at == {0: turns[0]} and cut.in_flight == {0: True} and cut.processes == 2
    assert cut.replies == full.replies and cut.done[0]["sleeps"] == full.done[0]["sleeps"] >= 2


def test_full_history_never_sleeps(suite: Path, tmp_path: Path) -> None:
    episodes = depo_episodes(depo_task().config, 1, seed=0)
    cond = Condition(name="full attention", checkpoint=str(suite / "depo-attn"), full_history=True)
    (out,) = run_condition(episodes, cond, FACTORY, tmp_path, seed=3)
    assert out.sleeps == 0 and out.revive_equal
    small = Condition(name="too small", checkpoint=str(suite / "depo-n1"), full_history=True)
    with pytest.raises(Exception, match=r"needs \d+ tokens"):
        run_condition(episodes, small, FACTORY, tmp_path / "small", kill=False)


def test_fresh_interpreter_worker_matches_forked_child(suite: Path, tmp_path: Path) -> None:
    ep = gsm_episodes(gsm_task().config, 1, seed=5)[0]
    cond = Condition(name="sleep N=1", checkpoint=str(suite / "gsm-last-n1"))
    forked = run_chain([ep], cond, host_driver, tmp_path / "fork")
    spawned = run_chain([ep], cond, FACTORY, tmp_path / "spawn", mode="spawn")
    assert spawned.replies == forked.replies and spawned.processes == 1


def test_kill_turns_are_seeded_leave_a_turn_and_favour_sleeping_turns() -> None:
    episodes = depo_episodes(depo_task().config, 40, seed=0)
    kills = kill_turns(episodes, 7)
    assert kills == kill_turns(episodes, 7) and kills != kill_turns(episodes, 8)
    assert all(0 <= kills[e.id] < len(e.turns) - 1 for e in episodes)
    biased = kill_turns(episodes, 7, window=25)
    hot = [biased[e.id] in threshold_turns(e, 25, 0.8) for e in episodes]
    assert 0.4 < sum(hot) / len(hot) < 0.95  # about half aimed at a turn that starts a background sleep, plus luck
    with pytest.raises(InvalidInput):
        run_chain(episodes[:1], Condition(name="x", checkpoint="."), FACTORY, Path("/nonexistent"),
                  kills={episodes[0].id: len(episodes[0].turns) - 1})  # fmt: skip
