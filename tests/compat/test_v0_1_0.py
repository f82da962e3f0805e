"""Agents saved by agentsleep 0.1.0 revive in this release and answer exactly as they did then (the fixture in
tests/fixtures/compat/v0.1.0, made with the 0.1.0 release): through TorchEngine, AgentHost and a sleep worker, on
SQLite and Postgres; the automatic move to the current fingerprint rule at the next save and the explicit
``agentsleep snapshots migrate``; and a typed error naming both rule versions when a model truly computes something
else. Keep this file passing in every release (docs/store.md, "Fingerprints")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from agentsleep.cli import main
from agentsleep.errors import SnapshotMismatch, UnsupportedBackend
from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.memory.worker import SleepWorker
from agentsleep.model.fingerprint import fingerprint_of, rule_of
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.runtime import TorchEngine
from agentsleep.store import SnapshotStore
from agentsleep.store.migrate import migrate_agents

from .helpers import AGENTS, CHECKPOINTS, V2, expected, greedy, model, model_of, replies

REPLY_CASES = [pytest.param(r, id=f"{r['agent']}-{'older' if r['snapshot_id'] else 'current'}") for r in replies()]


def _host(agent: str, store: SnapshotStore) -> AgentHost:
    m = model_of(agent)
    return AgentHost(TorchEngine(m), store, SleepPolicy(window=8, passes=m.config.passes), background=False)


def test_checkpoints_answer_to_their_0_1_0_fingerprints() -> None:
    for name, info in expected()["checkpoints"].items():
        m = model(name)
        assert rule_of(info["fingerprint"]) == "v1" and rule_of(m.fingerprint) == "v2"
        assert m.fingerprints == (V2[name], info["fingerprint"])  # current first, then the 0.1.0 one
        dump = m.config.model_dump()
        assert {k: dump[k] for k in info["config"]} == info["config"]  # every 0.1.0 field as 0.1.0 saved it
        defaults = type(m.config)(**info["config"]).model_dump()  # fields added later stay at their defaults
        assert {k: v for k, v in dump.items() if k not in info["config"]} == {
            k: v for k, v in defaults.items() if k not in info["config"]
        }


def test_the_0_1_0_fingerprint_recipe_is_reproduced() -> None:
    """41 configs across every 0.1.0 field, hashed by 0.1.0 over two fixed tensors: the v1 alias equals each."""
    tensors = {
        "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7.0,
        "a.bias": torch.arange(4, dtype=torch.float32) * -0.5,
    }
    for case in expected()["fingerprint_cases"]:
        fp = fingerprint_of(HybridConfig(**case["config"]), tensors)
        assert fp.aliases == (case["fingerprint"],), case["config_json"]


def test_the_store_is_as_0_1_0_left_it(old_store: SnapshotStore) -> None:
    for aid, info in expected()["agents"].items():
        agent = old_store.agent(aid)
        assert agent.fingerprint == info["fingerprint"] and agent.current_snapshot_id == info["current"]
        assert [r.id for r in old_store.history(aid)] == [s["id"] for s in info["snapshots"]]
    windows = {aid: info["current_window_len"] for aid, info in expected()["agents"].items()}
    assert windows["alice"] > 0 and windows["carol"] > 0 and windows["bob"] == 0  # non-empty and empty windows


@pytest.mark.parametrize("case", REPLY_CASES)
def test_torch_engine_revives_and_answers_as_0_1_0(old_store: SnapshotStore, case: dict) -> None:
    agent = case["agent"]
    engine = TorchEngine(model_of(agent))
    session = engine.revive(agent, old_store, case["snapshot_id"])
    assert session.snapshot_id == (case["snapshot_id"] or expected()["agents"][agent]["current"])
    assert greedy(engine, agent, case["prompt"], case["max_new_tokens"]) == case["engine"]
    assert engine.export_state(agent).state.fingerprint == V2[expected()["agents"][agent]["checkpoint"]]


@pytest.mark.parametrize("case", REPLY_CASES)
def test_agent_host_revives_answers_and_moves_the_agent_to_v2_at_its_next_save(
    old_store: SnapshotStore, case: dict
) -> None:
    agent = case["agent"]
    old_fp = expected()["agents"][agent]["fingerprint"]
    with _host(agent, old_store) as host:
        host.revive(agent, case["snapshot_id"])
        res = host.turn(agent, case["prompt"], max_new_tokens=case["max_new_tokens"])
        assert list(res.tokens) == case["host"]
        sid = host.snapshot(agent)  # the next save: same model, current rule
    new_fp = V2[expected()["agents"][agent]["checkpoint"]]
    assert old_store.agent(agent).fingerprint == new_fp
    rec = old_store.get(sid)
    assert rec.fingerprint == new_fp
    chain = old_store.lineage(sid)
    assert chain[-1].id == sid and any(r.fingerprint == old_fp for r in chain)  # the lineage shows the change
    assert old_store.get(case["snapshot_id"] or expected()["agents"][agent]["current"]).fingerprint == old_fp
    engine = TorchEngine(model_of(agent))  # and the agent revives from its v2 snapshot too
    engine.revive(agent, old_store)
    assert engine.export_state(agent).window == host.engine.export_state(agent).window


def test_a_sleep_queued_by_0_1_0_survives_the_upgrade(old_store: SnapshotStore) -> None:
    """0.1.0 left a waiting sleep job for alice. On Postgres the upgrade carries it over to procrastinate (on the
    queue of alice's v1 tag, with its passes) and a current worker of her model runs it; SQLite stores have no sleep
    workers any more, so there the job is dropped (logged) and her memory, which a job never holds, is intact."""
    want = expected()["worker"]
    if old_store.dialect != "postgresql":
        assert old_store.sleep_jobs() == []
        with pytest.raises(UnsupportedBackend):
            SleepWorker(TorchEngine(model("hard")), old_store)
        assert TorchEngine(model("hard")).revive("alice", old_store).snapshot_id == want["parent_id"]
        return
    (job,) = old_store.sleep_jobs("alice")
    assert job.status == "todo" and job.passes == want["params"]["passes"]
    other = SleepWorker(TorchEngine(model("sliding")), old_store, worker_id="w-other")
    assert other.run_once() is None  # alice's job is not the sliding model's
    worker = SleepWorker(TorchEngine(model("hard")), old_store, worker_id="w-now")
    report = worker.run_once()
    assert report is not None and report.job_id == job.id and report.status == "succeeded", report
    rec = old_store.get(report.snapshot_id)
    assert rec.parent_id == want["parent_id"] and rec.tokens_consolidated == want["tokens_consolidated"]
    assert rec.fingerprint == V2["hard"] == old_store.agent("alice").fingerprint
    engine = TorchEngine(model("hard"))
    engine.revive("alice", old_store)
    assert greedy(engine, "alice", want["prompt"], want["max_new_tokens"]) == want["reply"]


def test_migrate_retags_every_agent_in_its_lineage_and_is_idempotent(old_store_url: str) -> None:
    runner = CliRunner()
    args = ["snapshots", "--url", old_store_url, "migrate"]
    args += ["--checkpoint", str(CHECKPOINTS / "hard"), "--checkpoint", str(CHECKPOINTS / "sliding")]
    with SnapshotStore(old_store_url) as store:
        before = {a.id: (a.fingerprint, a.current_snapshot_id, a.n_snapshots) for a in store.agents()}
    dry = runner.invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert all(f"would migrate agent {aid!r}" in dry.output for aid in AGENTS)
    with SnapshotStore(old_store_url) as store:
        assert {a.id: (a.fingerprint, a.current_snapshot_id, a.n_snapshots) for a in store.agents()} == before
    done = runner.invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "4 agents migrated" in done.output
    with SnapshotStore(old_store_url) as store:
        for aid in AGENTS:
            old_fp, old_current, n = before[aid]
            agent = store.agent(aid)
            assert agent.fingerprint == V2[expected()["agents"][aid]["checkpoint"]] and agent.n_snapshots == n + 1
            new = store.get(agent.current_snapshot_id)
            old = store.get(old_current)
            assert (new.reason, new.parent_id, new.fingerprint) == ("migrate", old_current, agent.fingerprint)
            assert new.meta["migrated_from"] == {"snapshot_id": old_current, "fingerprint": old_fp, "rule": "v1"}
            assert {k: v for k, v in new.meta.items() if k != "migrated_from"} == old.meta  # the same memory's books
            assert (new.window_len, new.tokens_consolidated, new.passes) == (
                old.window_len,
                old.tokens_consolidated,
                old.passes,
            )
            a, b = store.load(new.id), store.load(old_current)
            assert a.window == b.window and a.state.digest() == b.state.digest()
        for case in replies():
            engine = TorchEngine(model_of(case["agent"]))
            engine.revive(case["agent"], store, case["snapshot_id"])  # the old snapshots load as before
            assert greedy(engine, case["agent"], case["prompt"], case["max_new_tokens"]) == case["engine"]
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "0 agents migrated, 4 already current" in again.output, again.output


def test_migrate_leaves_other_models_alone_and_reports_a_corrupt_agent(old_store: SnapshotStore) -> None:
    with old_store.engine.begin() as c:  # damage bob's current snapshot
        from agentsleep.store import Snapshot

        c.execute(
            Snapshot.__table__.update()
            .where(Snapshot.__table__.c.id == expected()["agents"]["bob"]["current"])
            .values(sha256="0" * 64)
        )
    results = {r.agent_id: r for r in migrate_agents(old_store, model("hard").fingerprint)}
    assert results["sam"].action == "other-model" and old_store.agent("sam").fingerprint != V2["sliding"]
    assert results["bob"].action == "failed" and "SnapshotCorrupt" in (results["bob"].error or "")
    assert old_store.agent("bob").fingerprint == expected()["agents"]["bob"]["fingerprint"]  # nothing written
    assert results["alice"].action == results["carol"].action == "migrated"


def test_a_model_that_computes_something_else_is_refused_naming_both_rules(old_store: SnapshotStore) -> None:
    changed = SleepHybrid(HybridConfig(**{**model("hard").config.model_dump(), "window": 12}))
    changed.load_state_dict(model("hard").state_dict())  # same weights, another window: another computation
    with pytest.raises(SnapshotMismatch) as err:
        TorchEngine(changed).revive("alice", old_store)
    msg = str(err.value)
    assert expected()["agents"]["alice"]["fingerprint"] in msg and changed.fingerprint in msg
    assert "rule v1" in msg and "rule v2" in msg and "checkpoint that saved it" in msg
    assert type(err.value) is SnapshotMismatch  # the class tools already match on


def test_a_model_0_1_0_could_not_have_made_says_so(old_store: SnapshotStore) -> None:
    """A config value that did not exist in 0.1.0 (simulated: a field added after it, set off its default)."""

    class Later(HybridConfig):
        loop_start: int = 0  # a field a later release adds (at its default: computation unchanged)

    m = model("hard")
    same = fingerprint_of(Later(**m.config.model_dump()), m.state_dict())
    assert same == m.fingerprint and same.aliases == m.fingerprint.aliases  # a new field at its default: no change
    other = fingerprint_of(Later(**m.config.model_dump(), loop_start=1), m.state_dict())
    assert other.aliases == () and other != m.fingerprint
    with pytest.raises(SnapshotMismatch, match="no v1 fingerprint") as err:
        old_store.latest("alice", fingerprint=other)
    assert "rule v1" in str(err.value) and "rule v2" in str(err.value)


def test_migrate_retries_when_an_old_host_saves_in_between(old_store_url: str) -> None:
    """Transactional per agent: a save that lands between migrate's load and its save (here by a host still on
    0.1.0's rule) wins; migrate retries on the new current snapshot."""
    m = model("hard")
    raced: list[str] = []

    class Racing(SnapshotStore):
        def load(self, snapshot_id: str, **kw):  # type: ignore[no-untyped-def]
            loaded = super().load(snapshot_id, **kw)
            if loaded.record.agent_id == "alice" and not raced:
                with SnapshotStore(old_store_url) as other:
                    old = other.load(snapshot_id)  # v1-tagged, as an old host holds it
                    raced.append(other.save("alice", old.state, [*old.window, 7], reason="turn").id)
            return loaded

    with Racing(old_store_url) as store:
        (result,) = migrate_agents(store, m.fingerprint, agent_ids=["alice"])
        assert raced and result.action == "migrated" and result.from_snapshot == raced[0]
        new = store.get(result.snapshot_id)
        assert new.parent_id == raced[0] and new.window_len == store.get(raced[0]).window_len
        assert store.agent("alice").fingerprint == V2["hard"]


def test_migrate_cli_json_and_errors(old_store_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["snapshots", "--url", old_store_url, "migrate"]
    assert runner.invoke(main, [*base, "--help"]).exit_code == 0
    args = ["snapshots", "migrate", "--url", old_store_url, "--checkpoint", str(CHECKPOINTS / "sliding"), "--json"]
    out = runner.invoke(main, args)
    assert out.exit_code == 0, out.output
    rows = {r["agent_id"]: r for r in json.loads(out.stdout)}
    assert rows["sam"]["action"] == "migrated" and rows["sam"]["new_fingerprint"] == V2["sliding"]
    assert {rows[a]["action"] for a in ("alice", "bob", "carol")} == {"other-model"}
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(main, [*base, "--checkpoint", str(tmp_path / "empty")])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(main, base).exit_code == 2  # --checkpoint is required
