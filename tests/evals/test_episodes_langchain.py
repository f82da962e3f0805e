"""The LangChain driver (create_agent + SleepMemory + ChatSleepHybrid + SqliteSaver) gives the AgentHost driver's
replies, turn for turn, including after a SIGKILL and a revive from the snapshot store + the LangGraph checkpointer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agentsleep.episodes.build import depo_episodes, english_episodes, gsm_episodes
from agentsleep.episodes.drivers import Condition
from agentsleep.episodes.harness import run_chain, run_condition, threshold_turns
from evals.episodes.langchain_driver import CONTENT_ONLY, FACTORY, langchain_driver
from tests.episodes.helpers import build_checkpoint, depo_task, family_task, gsm_task


@pytest.mark.parametrize("kind", ["depo", "gsm", "family"])
def test_langchain_driver_equals_agent_host_driver(kind: str, tmp_path: Path) -> None:
    if kind == "depo":
        ckpt = build_checkpoint(tmp_path / "ckpt", depo_task(), 2, seed=7)
        episodes = depo_episodes(depo_task().config, 1, seed=9)
    elif kind == "family":  # plain English messages through create_agent, one-word replies
        ckpt = build_checkpoint(tmp_path / "ckpt", family_task(), 2, seed=7)
        episodes = english_episodes(family_task().config, 2, seed=9)
    else:
        ckpt = build_checkpoint(tmp_path / "ckpt", gsm_task(), 2, seed=8)
        episodes = gsm_episodes(gsm_task().config, 1, seed=9)
    cond = Condition(name="sleep N=2", checkpoint=str(ckpt))
    host = run_condition(episodes, cond, "agentsleep.episodes.drivers:host_driver", tmp_path / "host", seed=2)
    chain = run_condition(episodes, cond, langchain_driver, tmp_path / "lc", seed=2)
    for h, c in zip(host, chain):
        assert c.killed_at == h.killed_at is not None
        assert c.revive_equal and h.revive_equal
        assert c.replies == h.replies and c.sleeps == h.sleeps >= 2
        assert [q.answer for q in c.questions] == [q.answer for q in h.questions]
    assert (tmp_path / "lc" / "killed" / "graph.db").is_file()  # the thread lived in the LangGraph checkpointer


def test_content_only_template_and_factory_name() -> None:
    assert CONTENT_ONLY.prefix == "" and CONTENT_ONLY.suffix == ""
    assert FACTORY == "evals.episodes.langchain_driver:langchain_driver"


def slow_langchain_driver(condition: Condition, workdir: Path) -> Any:
    """Sleeps take 0.5 s, so the SIGKILL (0–50 ms after the turn) lands inside the background sleep."""
    driver = langchain_driver(condition, workdir)
    plain = driver.engine.sleep

    def sleep(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return plain(*args, **kwargs)

    driver.engine.sleep = sleep
    return driver


def test_langchain_revive_reruns_a_background_sleep_the_kill_interrupted(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "ckpt", gsm_task(), 2, seed=8)
    ep = gsm_episodes(gsm_task().config, 1, seed=2)[0]
    cond = Condition(name="sleep N=2", checkpoint=str(ckpt), soft_threshold=0.5)
    turn = threshold_turns(ep, 64, 0.5)[0]
    full = run_chain([ep], cond, langchain_driver, tmp_path / "full")
    cut = run_chain([ep], cond, slow_langchain_driver, tmp_path / "cut", kills={ep.id: turn})
    assert cut.in_flight == {0: True} and cut.processes == 2
    assert cut.replies == full.replies and cut.done[0]["sleeps"] == full.done[0]["sleeps"] >= 2


@pytest.mark.parametrize("driver", [langchain_driver, "agentsleep.episodes.drivers:host_driver"])
def test_kill_just_before_the_forced_sleep(driver: Any, tmp_path: Path) -> None:
    """Killed after the last fact: the revived agent must still consolidate the facts before the questions."""
    ckpt = build_checkpoint(tmp_path / "ckpt", depo_task(), 2, seed=7)
    ep = depo_episodes(depo_task().config, 1, seed=3)[0]
    last_fact = max(i for i, t in enumerate(ep.turns) if t.reply == 0)
    assert ep.turns[last_fact + 1].sleep_before
    cond = Condition(name="sleep N=2", checkpoint=str(ckpt))
    full = run_chain([ep], cond, driver, tmp_path / "full")
    cut = run_chain([ep], cond, driver, tmp_path / "cut", kills={ep.id: last_fact})
    assert cut.replies == full.replies and cut.done[0]["sleeps"] == full.done[0]["sleeps"]
