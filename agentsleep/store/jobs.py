"""Sleep jobs on procrastinate (Postgres only): the queue's data side — its schema, deferring a job, listing jobs.

procrastinate is a Postgres task queue: jobs are rows fetched with ``FOR UPDATE SKIP LOCKED``, workers heartbeat,
failed jobs are retried with a backoff, and two per-job keys order the work:

- ``lock``: at most one job with a given lock runs at a time, the others wait their turn. We use one per agent,
  so one agent's sleeps never run at once;
- ``queueing_lock``: at most one job with a given queueing lock waits (``todo``); deferring another raises
  ``AlreadyEnqueued``. Also one per agent, so at most one sleep waits per agent: a sleep carries no data (it
  consolidates whatever window the agent has when it runs), so a waiting one already is the requested work.

Jobs of one model go to one queue (`sleep_queue`), so workers of several models share a database and each takes only
what its model can run. The store defers jobs in its own transaction (no connection pool of procrastinate's, and the
agent is checked in the same transaction); the workers that run them are `agentsleep.memory.worker` (the store
never imports an engine).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from agentsleep.store.records import SleepJobRecord

if TYPE_CHECKING:
    import procrastinate

log = logging.getLogger(__name__)

SLEEP_TASK = "agentsleep.sleep"  # the task name workers register; stable, unlike a dotted path
_LOCK_PREFIX = "agentsleep-sleep:"  # lock / queueing lock of an agent's sleeps (namespaced: other apps may share)
_PROCRASTINATE_TABLES = ("procrastinate_events", "procrastinate_periodic_defers", "procrastinate_jobs",
                         "procrastinate_workers")  # fmt: skip
_PROCRASTINATE_TYPES = ("procrastinate_job_to_defer_v1", "procrastinate_job_event_type", "procrastinate_job_status")


def sleep_queue(fingerprint: str) -> str:
    """The queue of a model's sleep jobs: ``sleep-`` + 32 hex digits of sha256(fingerprint).

    A digest, not the fingerprint itself: procrastinate notifies workers on the channel
    ``procrastinate_queue_v1#<queue>``, and Postgres channel names stop at 63 bytes.
    """
    return "sleep-" + hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:32]


def agent_lock(agent_id: str) -> str:
    """The procrastinate ``lock`` and ``queueing_lock`` of an agent's sleep jobs."""
    return _LOCK_PREFIX + agent_id


def agent_of_lock(lock: str | None) -> str | None:
    return lock[len(_LOCK_PREFIX) :] if lock and lock.startswith(_LOCK_PREFIX) else None


# ---------------------------------------------------------------------------------------------- schema


def has_procrastinate_schema(conn: Connection) -> bool:
    """True if procrastinate's tables are visible on this connection's ``search_path``."""
    return conn.execute(text("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")).scalar_one()


def install_procrastinate_schema(conn: Connection) -> bool:
    """Create procrastinate's tables, types and functions in the connection's current schema (the first on its
    ``search_path``), inside the caller's transaction. Idempotent: does nothing if they exist. Returns True if it
    created them."""
    if has_procrastinate_schema(conn):
        log.info("procrastinate's schema is already installed; leaving it as it is")
        return False
    from procrastinate.schema import SchemaManager

    # The raw psycopg connection (same transaction): the SQL holds '%' and ':' that a bound-parameter layer would
    # take for placeholders.
    conn.connection.driver_connection.execute(SchemaManager.get_schema())  # type: ignore[union-attr]
    return True


def drop_procrastinate_schema(conn: Connection) -> None:
    """Drop procrastinate's tables, functions and types from the current schema (migration 0004's downgrade)."""
    for table in _PROCRASTINATE_TABLES:
        conn.execute(text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
    functions = conn.execute(
        text(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate%'"
        )
    ).scalars()
    for signature in list(functions):
        conn.execute(text(f"DROP FUNCTION IF EXISTS {signature} CASCADE"))
    for typ in _PROCRASTINATE_TYPES:
        conn.execute(text(f'DROP TYPE IF EXISTS "{typ}" CASCADE'))


# ---------------------------------------------------------------------------------------------- jobs


@functools.cache
def _deferrer() -> procrastinate.App:
    """A procrastinate app used only to build and insert jobs on a connection we hand it (never opened)."""
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector())


def defer_sleep(s: Session, agent_id: str, fingerprint: str, passes: int | None) -> tuple[int, bool]:
    """Queue a sleep of ``agent_id`` in the session's transaction; (job id, True) if a new job was queued,
    (id of the job already waiting, False) if one waits for this agent."""
    from procrastinate.exceptions import AlreadyEnqueued

    lock = agent_lock(agent_id)
    args: dict[str, Any] = {"agent_id": agent_id}
    if passes is not None:
        args["passes"] = passes
    raw = s.connection().connection.driver_connection
    # A refused insert must abort only a savepoint, not the caller's transaction. Explicit SQL on the raw
    # connection: the Session would emit its own SAVEPOINT only at its next statement, after procrastinate's.
    raw.execute("SAVEPOINT agentsleep_defer")
    try:
        deferrer = _deferrer().configure_task(
            SLEEP_TASK, lock=lock, queueing_lock=lock, queue=sleep_queue(fingerprint), connection=raw
        )
        job_id = deferrer.defer(**args)
    except AlreadyEnqueued:
        raw.execute("ROLLBACK TO SAVEPOINT agentsleep_defer")
        waiting = s.execute(
            text("SELECT id FROM procrastinate_jobs WHERE queueing_lock = :q AND status = 'todo'"), {"q": lock}
        ).scalar_one_or_none()
        if waiting is None:  # it started between the refused insert and this read: queue ours after all
            return defer_sleep(s, agent_id, fingerprint, passes)
        return int(waiting), False
    except BaseException:
        raw.execute("ROLLBACK TO SAVEPOINT agentsleep_defer")
        raise
    raw.execute("RELEASE SAVEPOINT agentsleep_defer")
    return job_id, True


def list_sleep_jobs(s: Session, agent_id: str | None = None) -> list[SleepJobRecord]:
    """Sleep jobs, oldest first (optionally one agent's)."""
    sql = (
        "SELECT id, status::text AS status, lock, args, attempts, queue_name, worker_id, scheduled_at "
        "FROM procrastinate_jobs WHERE task_name = :task"
    )
    params: dict[str, Any] = {"task": SLEEP_TASK}
    if agent_id is not None:
        sql += " AND lock = :lock"
        params["lock"] = agent_lock(agent_id)
    out = []
    for r in s.execute(text(sql + " ORDER BY id"), params).mappings():
        args = r["args"] if isinstance(r["args"], dict) else {}
        passes = args.get("passes")
        out.append(
            SleepJobRecord(
                id=int(r["id"]),
                agent_id=agent_of_lock(r["lock"]) or str(args.get("agent_id", "")),
                status=r["status"],
                passes=passes if isinstance(passes, int) else None,
                attempts=int(r["attempts"]),
                queue=r["queue_name"],
                worker_id=r["worker_id"],
                scheduled_at=r["scheduled_at"],
            )
        )
    return out


def forget_agent_jobs(s: Session, agent_id: str) -> int:
    """Delete an agent's sleep jobs that are not running (waiting ones and finished ones); returns how many.
    A running one is left to finish: it fails on its own, the agent being gone."""
    return s.execute(
        text("DELETE FROM procrastinate_jobs WHERE task_name = :task AND lock = :lock AND status <> 'doing'"),
        {"task": SLEEP_TASK, "lock": agent_lock(agent_id)},
    ).rowcount


__all__ = [
    "SLEEP_TASK",
    "agent_lock",
    "agent_of_lock",
    "defer_sleep",
    "drop_procrastinate_schema",
    "forget_agent_jobs",
    "has_procrastinate_schema",
    "install_procrastinate_schema",
    "list_sleep_jobs",
    "sleep_queue",
]
