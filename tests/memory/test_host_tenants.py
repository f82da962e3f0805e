"""AgentHost(tenant=...): two hosts on one store, the same agent id in two tenants, interleaved turns: each host
sees and saves only its own tenant's agent."""

from __future__ import annotations

import pytest
import torch

from agentsleep.errors import ConfigError, InvalidInput, UnknownAgent
from agentsleep.memory.host import AgentHost
from agentsleep.store import SnapshotStore
from tests.memory.test_host import ids, make_engine, policy


@pytest.fixture
def store(tmp_path) -> SnapshotStore:
    return SnapshotStore(f"sqlite:///{tmp_path / 'snaps.db'}", sqlite_synchronous="OFF")


def test_two_tenants_same_agent_id_interleaved(store: SnapshotStore) -> None:
    kw = {"background": False, "snapshot_turns": True}
    with (
        AgentHost(make_engine(), store, policy(), tenant="acme", **kw) as a,
        AgentHost(make_engine(), store, policy(), tenant="beta", **kw) as b,
    ):
        a.create("bob")
        b.create("bob")
        for step in range(6):  # interleaved, through sleeps: the hosts' memories must stay apart
            a.turn("bob", ids(100 + step, 5), max_new_tokens=1)
            b.turn("bob", ids(200 + step, 3), max_new_tokens=1)
        wa, wb = a.session("bob").window, b.session("bob").window
    sa, sb = store.for_tenant("acme"), store.for_tenant("beta")
    assert sa.latest("bob").window == list(wa) and sb.latest("bob").window == list(wb)
    assert not torch.equal(sa.latest("bob").state.ssm[0], sb.latest("bob").state.ssm[0])
    assert {r.agent_id for r in sa.history("bob")} == {"bob"}
    assert store.agents() == []  # the default tenant saw nothing
    # A revive in a fresh host of each tenant continues that tenant's memory.
    with AgentHost(make_engine(), store, policy(), tenant="beta", background=False) as again:
        assert again.revive("bob").window == wb
        with pytest.raises(UnknownAgent):
            again.revive("ghost")
    with AgentHost(make_engine(), store, policy(), tenant="gamma", background=False) as other:
        with pytest.raises(UnknownAgent) as foreign:
            other.revive("bob")
        assert "bob" in str(foreign.value) and "acme" not in str(foreign.value)
        other.create("bob")  # its own bob: nothing of acme's or beta's is touched
    assert sa.latest("bob").window == list(wa)


def test_tenant_needs_a_store_and_a_valid_name(store: SnapshotStore) -> None:
    with pytest.raises(ConfigError, match="store"):
        AgentHost(make_engine(), None, policy(), tenant="acme")
    with pytest.raises(InvalidInput, match="tenant"):
        AgentHost(make_engine(), store, policy(), tenant="a b")


@pytest.mark.postgres
def test_a_worker_sleeps_each_tenants_agent_in_its_tenant(postgres_schema_url: str) -> None:
    from agentsleep.memory.worker import JobReport, SleepWorker
    from agentsleep.runtime import TorchEngine
    from tests.memory.test_worker import FAST, seed_agent
    from tests.runtime.helpers import make_model, turn_tokens

    model = make_model(window=16, passes=3)
    with SnapshotStore(postgres_schema_url) as root:
        stores = {t: root.for_tenant(t) for t in ("acme", "beta", "")}
        for i, s in enumerate(stores.values()):
            seed_agent(s, model, "bob", turn_tokens(i, 6))
            s.enqueue_sleep("bob")
        reports: list[JobReport] = []
        worker = SleepWorker(TorchEngine(model), root, worker_id="w", **FAST)
        assert worker.run(wait=False, on_job=reports.append) == 3
        assert sorted((r.tenant, r.agent_id, r.status) for r in reports) == [
            ("", "bob", "succeeded"), ("acme", "bob", "succeeded"), ("beta", "bob", "succeeded"),
        ]  # fmt: skip
        for r in reports:
            s = stores[r.tenant]
            assert s.get(r.snapshot_id).reason == "sleep" and s.current_id("bob") == r.snapshot_id
            assert "\x1f" not in r.line() and (r.tenant in r.line())
