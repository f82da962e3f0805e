"""AgentHost saves are compare-and-set: a consolidation written by someone else (a sleep worker) is merged, never
overwritten — the host replays the tokens it took in since onto it — and anything it cannot merge raises
`SnapshotConflict`. Parking (`remove`, `park`) persists what the agent took in. SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from agentsleep.errors import InvalidInput, SnapshotConflict, UnknownAgent
from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.memory.worker import SleepWorker, consolidate
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import SamplingParams, TorchEngine, memory_from_snapshot, save_memory
from agentsleep.store import SnapshotStore
from tests.runtime.helpers import make_model, turn_tokens

from .lineage import assert_monotone, stream_of

L, N = 32, 2


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotStore]:
    sqlite = request.param == "sqlite"
    url = f"sqlite:///{tmp_path / 's.db'}" if sqlite else request.getfixturevalue("postgres_schema_url")
    with SnapshotStore(url, sqlite_synchronous="OFF") as s:
        yield s


@pytest.fixture(scope="module")
def model() -> SleepHybrid:
    return make_model(window=L, passes=N)


def policy(**kw: object) -> SleepPolicy:
    base: dict[str, object] = {"window": L, "passes": N, "soft_threshold": 1.0, "debounce_seconds": 0.0}
    return SleepPolicy(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- parking


def test_remove_saves_what_the_agent_took_in(store: SnapshotStore, model: SleepHybrid) -> None:
    """The reviewed loss: default settings (no turn snapshots), turns, then park — every token must survive."""
    taken: list[int] = []
    with AgentHost(TorchEngine(model), store, policy()) as host:
        host.create("a")
        for t in range(4):
            ids = turn_tokens(t, 3)
            res = host.turn("a", ids, max_new_tokens=2)
            taken += ids + list(res.tokens)
        assert len(taken) == 20 and [r.reason for r in store.history("a")] == ["create"]
        live = host.engine.export_state("a")
        host.remove("a")
        assert not host.engine.has_agent("a")
        with pytest.raises(UnknownAgent):
            host.remove("a")
    park = store.latest("a")
    assert park.record.reason == "park" and tuple(park.window) == live.window == tuple(taken)
    assert park.record.meta["tokens_seen"] == 20
    with AgentHost(TorchEngine(model), store, policy()) as fresh:
        assert fresh.revive("a").window == tuple(taken)
        fresh.remove("a")  # nothing new: no second snapshot
    assert [r.reason for r in store.history("a")] == ["create", "park"]


def test_remove_without_saving_drops_on_purpose(store: SnapshotStore, model: SleepHybrid) -> None:
    with AgentHost(TorchEngine(model), store, policy()) as host:
        host.create("a")
        host.turn("a", turn_tokens(1, 4), max_new_tokens=1)
        host.remove("a", save=False)
    assert [r.reason for r in store.history("a")] == ["create"]


def test_park_consolidates_and_a_revived_agent_continues(store: SnapshotStore, model: SleepHybrid) -> None:
    with AgentHost(TorchEngine(model), store, policy()) as host:
        host.create("a")
        host.turn("a", turn_tokens(1, 9), max_new_tokens=3)
        parked = host.park("a")
        assert not host.engine.has_agent("a")
        with pytest.raises(InvalidInput):
            AgentHost(TorchEngine(model), None, policy()).park("a")
    if store.dialect == "sqlite":  # no workers: slept here, before it left
        assert parked.slept and parked.job is None and not parked.saved  # the sleep's snapshot holds it all
        assert [r.reason for r in store.history("a")] == ["create", "sleep"]
    else:  # queued for the workers, who consolidate the parked snapshot
        assert parked.saved and not parked.slept and parked.job is not None and parked.job.status == "todo"
        assert parked.job.passes == N and store.latest("a").record.id == parked.snapshot_id
        report = SleepWorker(TorchEngine(model), store, heartbeat_s=0.3, stalled_after_s=2.0).run_once()
        assert report is not None and report.status == "succeeded"
    rec = store.latest("a").record
    assert (rec.tokens_consolidated, rec.window_len, rec.meta["tokens_seen"]) == (12, 0, 12)
    with AgentHost(TorchEngine(model), store, policy()) as host:
        assert host.turn("a", turn_tokens(2, 2), max_new_tokens=1).window_tokens == 3  # revived on its turn
        assert host.session("a").tokens_consolidated == 12


# ---------------------------------------------------------------------------------------------- compare-and-set


def test_a_workers_consolidation_is_merged_not_overwritten(store: SnapshotStore, model: SleepHybrid) -> None:
    with AgentHost(TorchEngine(model), store, policy(), background=False, snapshot_turns=True) as host:
        host.create("a")
        first = host.turn("a", turn_tokens(1, 6), max_new_tokens=2)  # saved: the base B
        worker = consolidate(TorchEngine(model), store, "a", worker_id="w")  # C: B's window slept elsewhere
        assert worker.parent_id == first.snapshot_id
        later = turn_tokens(2, 5)
        res = host.turn("a", later, max_new_tokens=3)  # its save conflicts with C, merges it, saves on top
        assert res.snapshot_id is not None
        d = store.latest("a").record
        assert d.id == res.snapshot_id and d.parent_id == worker.snapshot_id  # C was kept, D descends from it
        assert (d.tokens_consolidated, d.window_len, d.meta["sleep_count"]) == (8, 8, 1)
        session = host.session("a")
        assert session.window == tuple(later) + res.tokens and session.tokens_seen == 16
        # the live memory is C's S with the host's tokens replayed on top: it answers like a fresh engine given C
        ref = TorchEngine(model)
        ref.import_state("ref", memory_from_snapshot(store.load(worker.snapshot_id)))
        ref.observe("ref", list(later) + list(res.tokens))
        prompt = turn_tokens(3, 2)
        got = host.turn("a", prompt, max_new_tokens=3, return_logits=True)
        want = ref.generate("ref", prompt, SamplingParams(max_new_tokens=3), return_logits=True, passes=N)
        assert got.tokens == want.tokens and torch.allclose(got.logits, want.logits, atol=1e-5)
        assert got.snapshot_id == store.current_id("a")
    lineage = store.lineage(store.current_id("a"))
    assert [r.reason for r in lineage] == ["create", "turn", "sleep", "turn", "turn"]
    assert_monotone(lineage)
    assert len(stream_of(store, "a")) == 21  # every token taken in, at its position, in one consistent stream


def test_a_background_sleep_that_meets_a_consolidation_merges_it(store: SnapshotStore, model: SleepHybrid) -> None:
    pol = policy(soft_threshold=0.5, retry_backoff_seconds=0.01)
    with AgentHost(TorchEngine(model), store, pol) as host:
        host.create("a")
        host.turn("a", turn_tokens(1, 8), max_new_tokens=0)  # below the threshold: no sleep yet
        host.snapshot("a")  # B
        done = consolidate(TorchEngine(model), store, "a")  # a worker consolidates B: C
        res = host.turn("a", turn_tokens(2, 9), max_new_tokens=0)  # past the threshold: a background sleep
        record = res.background_sleep.result(30)  # its save expects B, meets C: merged instead
        assert record.status == "completed" and record.outcome.detail["skipped"].startswith("merged"), record
        assert host.flush(30)
        assert host.session("a").window == tuple(turn_tokens(2, 9))  # C's empty window + the tokens since B
    lineage = store.lineage(store.current_id("a"))
    assert [r.reason for r in lineage][-2:] == ["sleep", "merge"] and lineage[-2].id == done.snapshot_id
    assert_monotone(lineage)
    assert len(stream_of(store, "a")) == 17


def test_a_change_the_host_cannot_merge_raises_and_overwrites_nothing(store: SnapshotStore, model: SleepHybrid) -> None:
    with AgentHost(TorchEngine(model), store, policy(), background=False) as host:
        host.create("a")
        host.turn("a", turn_tokens(1, 4), max_new_tokens=1)
        other = TorchEngine(model)  # a second writer of the same agent, with its own turns
        other.import_state("a", memory_from_snapshot(store.latest("a")))
        other.observe("a", turn_tokens(7, 3))
        theirs = save_memory(store, "a", other.export_state("a"), reason="turn", passes=N)
        with pytest.raises(SnapshotConflict, match="cannot merge"):
            host.snapshot("a")
        assert store.current_id("a") == theirs.id
        with pytest.raises(SnapshotConflict):
            host.remove("a")  # parking would overwrite it: refused, the agent stays live
        assert host.engine.has_agent("a")
        host.revive("a")  # continue from the store instead
        assert host.session("a").window == tuple(store.latest("a").window)
        assert host.snapshot("a") != theirs.id
        host.remove("a")


def test_two_hosts_create_one_agent_exactly_once(store: SnapshotStore, model: SleepHybrid) -> None:
    h1, h2 = AgentHost(TorchEngine(model), store, policy()), AgentHost(TorchEngine(model), store, policy())
    try:
        h1.create("a")
        real = h2.store.agent

        def not_yet(agent_id: str):  # h2 checked before h1 committed: only the store's new_agent save decides
            raise UnknownAgent(agent_id)

        h2.store.agent = not_yet  # type: ignore[method-assign]
        with pytest.raises(InvalidInput, match="already exists"):
            h2.create("a")
        h2.store.agent = real  # type: ignore[method-assign]
        assert not h2.engine.has_agent("a") and len(store.history("a")) == 1
    finally:
        h1.close()
        h2.close()


def test_reviving_an_older_snapshot_branches_from_it(store: SnapshotStore, model: SleepHybrid) -> None:
    with AgentHost(TorchEngine(model), store, policy(), background=False, snapshot_turns=True) as host:
        host.create("a")
        old = host.turn("a", turn_tokens(1, 3), max_new_tokens=1).snapshot_id
        host.turn("a", turn_tokens(2, 3), max_new_tokens=1)
        host.revive("a", old)
        new = host.turn("a", turn_tokens(3, 3), max_new_tokens=1)
        rec = store.get(new.snapshot_id)
        assert rec.parent_id == old and store.current_id("a") == rec.id
        assert torch.equal(torch.tensor(store.load(rec.id).window[:4]), torch.tensor(store.load(old).window))


def test_an_agent_made_live_behind_the_hosts_back_is_saved_too(store: SnapshotStore, model: SleepHybrid) -> None:
    engine = TorchEngine(model)
    engine.create_agent("a")  # not through host.create: the host has no book for it yet
    with AgentHost(engine, store, policy(), background=False) as host:
        taken = []
        for t in range(3):
            ids = turn_tokens(t, 12)
            taken += ids + list(host.turn("a", ids, max_new_tokens=2).tokens)  # window-full sleeps mid-turn
        assert store.current_id("a") is not None  # those sleeps were saved (the agent created in the store)
        host.remove("a")
    rec = store.latest("a").record
    assert rec.reason == "park" and rec.tokens_consolidated + rec.window_len == len(taken) == 42
