"""Move agents to the current fingerprint rule: ``agentsleep snapshots migrate --checkpoint DIR``.

An agent saved by an older agentsleep is tagged with its model's fingerprint under an older rule (v1). The current
code accepts that tag wherever it compares fingerprints (`agentsleep.model.fingerprint.accepts`), and the agent moves
to the current tag by itself at its next save. `migrate_agents` does the same at once for every agent of a model,
without waiting for a save: useful before retiring old workers, or to make ``snapshots list`` show one tag per model.

For each agent tagged with a legacy alias of ``fingerprint`` it loads and verifies the current snapshot, then saves
the same memory (state tensors, window, counters, metadata) as a new snapshot with reason ``"migrate"``: its parent
is the old current snapshot, its metadata adds ``migrated_from`` (that snapshot's id, fingerprint and rule), and the
agent row takes the current fingerprint in the same transaction. It is a compare-and-set on the old current snapshot,
so a save racing with it wins and the agent is simply retried. Older snapshots keep their tags (they are immutable
and still load through the alias), so the lineage shows exactly where the tag changed. Running it again finds
nothing to do; ``dry_run`` verifies and reports without writing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from agentsleep.errors import AgentSleepError, SnapshotConflict
from agentsleep.model.fingerprint import Fingerprint, rule_of
from agentsleep.store.store import SnapshotStore

log = logging.getLogger(__name__)

REASON = "migrate"
_ATTEMPTS = 3  # compare-and-set retries per agent when a concurrent save moves it on

Action = Literal["migrated", "would-migrate", "current", "other-model", "no-snapshot", "failed"]


@dataclass(frozen=True, slots=True)
class AgentMigration:
    """What `migrate_agents` did (or, in a dry run, would do) for one agent."""

    agent_id: str
    action: Action
    fingerprint: str  # the agent's fingerprint before
    new_fingerprint: str | None = None  # the one it has (or would have) afterwards
    from_snapshot: str | None = None  # the current snapshot the migration copies
    snapshot_id: str | None = None  # the new "migrate" snapshot (None unless migrated)
    error: str | None = None  # why it failed ("failed" only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def migrate_agents(
    store: SnapshotStore,
    fingerprints: Fingerprint | Iterable[Fingerprint],
    *,
    dry_run: bool = False,
    agent_ids: Iterable[str] | None = None,
) -> list[AgentMigration]:
    """Re-tag every agent whose fingerprint is a legacy alias of one of ``fingerprints`` (models' current
    fingerprints, e.g. `SleepHybrid.fingerprint` or `checkpoint_fingerprint`), one transaction per agent.

    Args:
        store: the snapshot store.
        fingerprints: the current fingerprint of each model whose agents to migrate.
        dry_run: verify each agent's current snapshot and report, writing nothing.
        agent_ids: only these agents (default: all).

    Returns:
        one `AgentMigration` per agent, by agent id. An agent that fails (a corrupt current snapshot, a store error)
        is reported as "failed" and the others go on; nothing of it was written.
    """
    models = [fingerprints] if isinstance(fingerprints, str) else list(fingerprints)
    wanted = None if agent_ids is None else set(agent_ids)
    out = []
    for agent in store.agents():
        if wanted is not None and agent.id not in wanted:
            continue
        out.append(_one(store, agent.id, models, dry_run))
    return out


def _one(store: SnapshotStore, agent_id: str, models: list[Fingerprint], dry_run: bool) -> AgentMigration:
    for _ in range(_ATTEMPTS):
        agent = store.agent(agent_id)
        old = agent.fingerprint
        if any(old == str(m) for m in models):
            return AgentMigration(agent_id, "current", old, old)
        model = next((m for m in models if old in m.aliases), None)
        if model is None:
            return AgentMigration(agent_id, "other-model", old)
        new = str(model)
        if agent.current_snapshot_id is None:  # nothing to copy; its next save re-tags it (aliases are accepted)
            return AgentMigration(agent_id, "no-snapshot", old, new)
        try:
            loaded = store.load(agent.current_snapshot_id, fingerprint=model)  # verified; tagged with `model`
            rec = loaded.record
            if dry_run:
                return AgentMigration(agent_id, "would-migrate", old, new, from_snapshot=rec.id)
            migrated_from = {"snapshot_id": rec.id, "fingerprint": rec.fingerprint, "rule": rule_of(rec.fingerprint)}
            saved = store.save(
                agent_id,
                loaded.state,
                loaded.window,
                reason=REASON,
                passes=rec.passes,
                tokens_consolidated=rec.tokens_consolidated,
                parent_id=rec.id,
                thread_id=rec.thread_id,
                metadata={**rec.meta, "migrated_from": migrated_from},  # the same memory: its books carry over
                expect_current=rec.id,
            )
        except SnapshotConflict:
            log.info("agent %r moved on while being migrated; retrying", agent_id)
            continue
        except AgentSleepError as e:
            log.warning("agent %r not migrated: %s", agent_id, e)
            return AgentMigration(agent_id, "failed", old, error=f"{type(e).__name__}: {e}")
        log.info("agent %r migrated from %s to %s (snapshot %s)", agent_id, old, new, saved.id)
        return AgentMigration(agent_id, "migrated", old, new, from_snapshot=rec.id, snapshot_id=saved.id)
    return AgentMigration(
        agent_id, "failed", old, error=f"SnapshotConflict: the agent kept moving on ({_ATTEMPTS} attempts); run again"
    )


__all__ = ["REASON", "AgentMigration", "migrate_agents"]
