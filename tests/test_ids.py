"""One id rule for every layer (agentsleep.ids): the store, the engines and the scheduler refuse the same ids."""

from __future__ import annotations

import pytest

from agentsleep.errors import InvalidInput
from agentsleep.ids import ID_LEN, check_agent_id, check_id
from agentsleep.memory.policy import SleepPolicy
from agentsleep.memory.scheduler import SleepScheduler
from agentsleep.runtime.base import check_agent_id as runtime_check

GOOD = ["alice", "a", "x" * ID_LEN, "user:42/thread-7", "ünïcødé 名前", "a b"]
BAD = ["", " alice", "alice ", "a\nb", "a\x00b", "tab\tid", "x" * (ID_LEN + 1), "lone\ud800", 42, None, b"alice"]


@pytest.mark.parametrize("agent_id", GOOD)
def test_good_ids_pass_unchanged(agent_id: str) -> None:
    assert check_agent_id(agent_id) == agent_id
    assert runtime_check(agent_id) == agent_id


@pytest.mark.parametrize("agent_id", BAD, ids=repr)
def test_bad_ids_are_refused_with_invalid_input(agent_id: object) -> None:
    with pytest.raises(InvalidInput, match="agent id"):
        check_agent_id(agent_id)


def test_message_names_what_is_checked() -> None:
    with pytest.raises(InvalidInput, match=r"^worker_id must not be empty"):
        check_id("", "worker_id")


@pytest.mark.parametrize("agent_id", [" alice", "a\nb", "lone\ud800"], ids=repr)
def test_store_and_scheduler_refuse_the_same_ids(agent_id: str, tmp_path) -> None:
    from agentsleep.store import SnapshotStore

    store = SnapshotStore(f"sqlite:///{tmp_path / 's.db'}")
    try:
        with pytest.raises(InvalidInput):
            store.agent(agent_id)
    finally:
        store.close()
    sched = SleepScheduler(lambda *a, **k: None, SleepPolicy(window=16))
    try:
        with pytest.raises(InvalidInput):
            sched.notify_turn(agent_id)
    finally:
        sched.shutdown()
