"""Sleep workers: consolidate the agents queued with `SnapshotStore.enqueue_sleep`, on procrastinate (Postgres).

procrastinate (a Postgres task queue) gives the guarantees a hand-made jobs table lacked: jobs are fetched with
``FOR UPDATE SKIP LOCKED`` (any number of workers, each job taken once), one agent's sleeps never run at once (the
job's ``lock``), at most one sleep waits per agent (its ``queueing_lock``), workers heartbeat, and a failed attempt
is retried with a backoff. This module adds what is ours:

- the task (`consolidate`): load the agent's current snapshot, sleep its window with N passes, save the result as a
  compare-and-set on the snapshot it loaded (`SnapshotConflict`: a turn or another sleep landed first; reload and
  redo, a few times). A worker never overwrites a newer snapshot;
- the retry rule: a store failure (`StoreError`, the database gone for a moment) or a lost compare-and-set is
  retried with exponential backoff up to ``max_attempts``; anything else (a corrupt snapshot, another model's, a bad
  ``passes``, an agent deleted meanwhile, the model raising) fails the job at once with the error's type and text;
- stalled-job recovery: a job whose worker stopped heartbeating for ``stalled_after_s`` (killed, frozen, cut off)
  is put back in the queue by any live worker (checked every heartbeat) and done by one of them. Redoing it is
  safe: the first attempt either saved (the redo finds its snapshot current, an empty window, nothing to do) or did
  not (the redo does the work).

A worker takes only its model's queue (`agentsleep.store.jobs.sleep_queue` of the engine's fingerprint), so workers
of several models share one database. SQLite stores have no queue (`UnsupportedBackend`): there the host sleeps its
agents in process (`AgentHost`'s scheduler).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text

from agentsleep.errors import AgentSleepError, InvalidInput, SnapshotConflict, StoreError, UnsupportedBackend
from agentsleep.ids import ID_LEN, check_agent_id, check_id
from agentsleep.model.fingerprint import accepted
from agentsleep.runtime.engine import Engine, SleepCommit
from agentsleep.runtime.revive import memory_from_snapshot, save_memory, window_limit
from agentsleep.store import LoadedSnapshot, SnapshotStore
from agentsleep.store.jobs import SLEEP_TASK, sleep_queue

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 10.0  # procrastinate's default
DEFAULT_STALLED_AFTER_S = 60.0  # a worker silent this long is presumed dead and its job is redone
DEFAULT_MAX_ATTEMPTS = 5  # attempts of one job (first run, retries and recoveries together)
DEFAULT_RETRY_BACKOFF_S = 1.0  # first retry delay; doubles per attempt
DEFAULT_RETRY_BACKOFF_MAX_S = 60.0
DEFAULT_POLL_S = 1.0  # new jobs arrive by LISTEN/NOTIFY at once; polling finds retries whose backoff ran out
CONFLICT_TRIES = 3  # reloads per attempt when the agent moves on while it is being consolidated
_MAX_ERROR = 2000  # characters of an error kept in a report

JobStatus = Literal["succeeded", "failed", "retry"]


def default_worker_id() -> str:
    """``host:pid:random``: unique per worker, and says where it ran."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[-ID_LEN:]


@dataclass(frozen=True, slots=True)
class Consolidation:
    """What `consolidate` did: ``snapshot_id`` is the new snapshot (None: the window was empty, nothing to do),
    ``parent_id`` the snapshot it consolidated, ``tokens`` the window tokens slept, ``tries`` the loads it took."""

    agent_id: str
    snapshot_id: str | None
    parent_id: str
    tokens: int
    passes: int | None
    tries: int


@dataclass(frozen=True, slots=True)
class JobReport:
    """One finished attempt of a sleep job, as a worker saw it (`SleepWorker.run`'s ``on_job``, `run_once`).

    ``status``: ``succeeded``, ``failed`` (for good) or ``retry`` (procrastinate runs it again after a backoff).
    """

    job_id: int
    agent_id: str
    status: JobStatus
    attempt: int  # 1-based
    snapshot_id: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def line(self) -> str:
        """One line for logs and the CLI, e.g. ``job 7 agent alice: succeeded -> snapshot 5599...``."""
        head = f"job {self.job_id} agent {self.agent_id}: {self.status}"
        if self.status == "succeeded":
            return f"{head} -> snapshot {self.snapshot_id}" if self.snapshot_id else f"{head} (nothing to consolidate)"
        return f"{head} (attempt {self.attempt}): {self.error}"


# ---------------------------------------------------------------------------------------------- the work


def consolidate(
    engine: Engine,
    store: SnapshotStore,
    agent_id: str,
    *,
    passes: int | None = None,
    worker_id: str | None = None,
    job_id: int | None = None,
    tries: int = CONFLICT_TRIES,
) -> Consolidation:
    """Sleep an agent that lives in the store (not in ``engine``): its current snapshot's window is consolidated with
    N passes (``passes``, default the engine's) and saved as the agent's new current snapshot.

    The save follows `AgentHost`'s conventions (reason ``sleep``, ``tokens_consolidated``, metadata ``sleep_count``,
    ``tokens_seen``, ``trigger``, ``window_tokens_slept``; plus ``worker_id`` and ``job_id``) and is a
    compare-and-set on the snapshot it loaded: if a turn or another sleep was saved meanwhile, the newer snapshot is
    loaded and consolidated instead, up to ``tries`` times. Works on any backend (the SQLite live tests drive it from
    threads); the queue and retries around it are `SleepWorker`'s.

    Raises:
        SnapshotConflict: the agent moved on ``tries`` times (a host is writing it; try later).
        UnknownAgent, SnapshotCorrupt, SnapshotMismatch (another model's agent), InvalidInput (bad ``passes``),
        StoreError, and whatever the model raises. Nothing is written then.
    """
    check_agent_id(agent_id)
    if passes is not None:
        _check_passes(passes, "passes")
    for attempt in range(1, tries + 1):
        loaded = store.latest(agent_id, fingerprint=engine.fingerprint)
        if not loaded.window:
            return Consolidation(agent_id, None, loaded.record.id, 0, passes, attempt)
        private = f"~sleep-worker/{job_id if job_id is not None else 'direct'}/{uuid.uuid4().hex}"
        try:
            engine.import_state(private, memory_from_snapshot(loaded), snapshot_id=loaded.record.id)
            persist = functools.partial(_save, engine, store, loaded, worker_id, job_id)
            result = engine.sleep(private, passes, persist=persist)
        except SnapshotConflict as e:
            logger.info("agent %r moved on while it was consolidated (%s); reloading", agent_id, e)
            continue
        finally:
            if engine.has_agent(private):
                engine.remove_agent(private)
        if result.skipped == "empty":
            return Consolidation(agent_id, None, loaded.record.id, 0, passes, attempt)
        if result.skipped is not None or result.snapshot_id is None:
            raise SnapshotConflict(f"the sleep of agent {agent_id!r} was dropped ({result.skipped or 'no save'})")
        return Consolidation(agent_id, result.snapshot_id, loaded.record.id, result.tokens, result.passes, attempt)
    raise SnapshotConflict(
        f"agent {agent_id!r} moved on {tries} times while it was being consolidated (a host is writing it); "
        "nothing was overwritten"
    )


def _save(
    engine: Engine,
    store: SnapshotStore,
    loaded: LoadedSnapshot,
    worker_id: str | None,
    job_id: int | None,
    commit: SleepCommit,
) -> str:
    """Persist a worker's sleep of ``loaded`` (its `PersistSleep`), as a compare-and-set on ``loaded``."""
    meta: dict[str, Any] = {"trigger": commit.trigger, "window_tokens_slept": commit.tokens}
    if worker_id is not None:
        meta["worker_id"] = worker_id
    if job_id is not None:
        meta["job_id"] = job_id
    record = save_memory(
        store,
        loaded.record.agent_id,
        commit.memory,
        reason="sleep",
        passes=commit.passes,
        metadata=meta,
        thread_id=loaded.record.thread_id,
        expect_current=loaded.record.id,
        max_window=window_limit(engine),
    )
    return record.id


# ---------------------------------------------------------------------------------------------- the worker


class SleepWorker:
    """A procrastinate worker that runs sleep jobs of ``engine``'s model from ``store``'s queue, one at a time.

    Args:
        engine: the model runner (`TorchEngine` or any `Engine`); may be shared with other workers or a host (jobs'
            agents live under private ids and are removed after each job).
        store: a Postgres store (the queue lives in its database).
        worker_id: recorded in the snapshots' metadata and the logs (default: `default_worker_id`).
        passes: default N for jobs that name none (default: the engine's).
        heartbeat_s: how often the worker tells the database it is alive (and looks for stalled jobs).
        stalled_after_s: a worker silent this long is presumed dead: its running job goes back to the queue. Keep it
            several heartbeats long; it need not exceed a sleep's duration (heartbeats continue while a job runs).
        max_attempts: attempts per job before it fails for good (retries of store errors and lost compare-and-sets,
            and recoveries of jobs whose worker died).
        retry_backoff_s, retry_backoff_max_s: first retry delay, doubled per attempt, capped.
        poll_s: how often to look for jobs whose retry backoff ran out (new jobs arrive at once by LISTEN/NOTIFY).

    Raises:
        UnsupportedBackend: ``store`` is not Postgres. InvalidInput: a bad argument.
    """

    def __init__(
        self,
        engine: Engine,
        store: SnapshotStore,
        *,
        worker_id: str | None = None,
        passes: int | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        stalled_after_s: float = DEFAULT_STALLED_AFTER_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S,
        retry_backoff_max_s: float = DEFAULT_RETRY_BACKOFF_MAX_S,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        wid = default_worker_id() if worker_id is None else worker_id
        check_id(wid, "worker_id")
        self.passes = None if passes is None else _check_passes(passes, "passes")
        self.heartbeat_s = _check_seconds(heartbeat_s, "heartbeat_s")
        self.stalled_after_s = _check_seconds(stalled_after_s, "stalled_after_s")
        if self.stalled_after_s <= self.heartbeat_s:
            raise InvalidInput(
                f"stalled_after_s ({stalled_after_s}) must exceed heartbeat_s ({heartbeat_s}), or live workers would "
                "be taken for dead"
            )
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidInput(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        self.max_attempts = max_attempts
        self.retry_backoff_s = _check_seconds(retry_backoff_s, "retry_backoff_s")
        self.retry_backoff_max_s = _check_seconds(retry_backoff_max_s, "retry_backoff_max_s")
        self.poll_s = _check_seconds(poll_s, "poll_s")
        self.require_postgres(store)
        self.engine = engine
        self.store = store
        self.worker_id = wid
        # Jobs are queued under the agent row's fingerprint, which may still be a legacy tag of this model (an agent
        # moves to the current rule at its next save): listen on the queue of every fingerprint the model answers to.
        self.queues = tuple(dict.fromkeys(sleep_queue(fp) for fp in accepted(engine.fingerprint)))
        self.queue = self.queues[0]

    def __repr__(self) -> str:
        return f"SleepWorker({self.worker_id!r}, store={self.store.url!r}, queue={self.queue!r})"

    @staticmethod
    def require_postgres(store: SnapshotStore) -> None:
        """Raise `UnsupportedBackend` unless ``store`` is Postgres (the queue's home)."""
        if store.dialect != "postgresql":
            raise UnsupportedBackend(
                f"sleep workers need a Postgres store (procrastinate is a Postgres task queue); {store.url} is "
                f"{store.dialect}. With SQLite, AgentHost sleeps its agents in process: no workers needed"
            )

    # ------------------------------------------------------------------ running

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        max_jobs: int | None = None,
        wait: bool = True,
        on_job: Callable[[JobReport], None] | None = None,
    ) -> int:
        """Run jobs until ``stop`` is set, ``max_jobs`` attempts are finished, or (``wait=False``) the queue is empty.
        The job in hand is always finished first. ``on_job`` is called with every finished attempt. Returns the
        number of attempts finished.

        Raises `StoreError` if the database cannot be reached at start; once running, procrastinate reconnects.
        """
        if max_jobs is not None and (isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1):
            raise InvalidInput(f"max_jobs must be an int >= 1 or None, got {max_jobs!r}")
        run = _Run(self, stop or threading.Event(), max_jobs, on_job)
        try:
            asyncio.run(run.main(wait))
        except AgentSleepError:
            raise
        except Exception as e:  # procrastinate / psycopg: the database is unreachable or refused us
            raise StoreError(f"sleep worker {self.worker_id}: the job queue failed: {type(e).__name__}: {e}") from e
        return run.done

    def run_once(self) -> JobReport | None:
        """Run at most one job attempt if one is waiting now; its report, or None if the queue was empty."""
        return self.run_once_reporting(None)

    def run_once_reporting(self, on_job: Callable[[JobReport], None] | None) -> JobReport | None:
        """`run_once`, also handing the report to ``on_job``."""
        reports: list[JobReport] = []

        def keep(r: JobReport) -> None:
            reports.append(r)
            if on_job is not None:
                on_job(r)

        self.run(max_jobs=1, wait=False, on_job=keep)
        return reports[0] if reports else None

    # ------------------------------------------------------------------ stalled jobs

    def recover_stalled(self) -> int:
        """Put back in the queue the running jobs (of this worker's queues) whose worker stopped heartbeating for
        ``stalled_after_s`` seconds; a job that already had ``max_attempts`` attempts, or whose agent already has a
        waiting sleep (that one covers it), fails instead. Runs every heartbeat while `run` runs; any worker may do
        it, each stalled job is recovered once (rows locked, ``SKIP LOCKED``). Returns the number put back."""
        retried = 0
        with self.store.engine.begin() as c:
            stalled = c.execute(
                text(
                    "SELECT j.id, j.queueing_lock, j.attempts FROM procrastinate_jobs j "
                    "LEFT JOIN procrastinate_workers w ON w.id = j.worker_id "
                    "WHERE j.status = 'doing' AND j.task_name = :task AND j.queue_name = ANY(:queues) "
                    "AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => :secs)) "
                    "FOR UPDATE OF j SKIP LOCKED"
                ),
                {"task": SLEEP_TASK, "queues": list(self.queues), "secs": self.stalled_after_s},
            ).all()
            for job_id, qlock, attempts in stalled:
                waiting = c.execute(
                    text("SELECT id FROM procrastinate_jobs WHERE queueing_lock = :q AND status = 'todo'"), {"q": qlock}
                ).scalar()
                if waiting is None and attempts + 1 < self.max_attempts:
                    c.execute(text("SAVEPOINT agentsleep_recover"))
                    try:
                        c.execute(text("SELECT procrastinate_retry_job_v2(:i, now(), NULL, NULL, NULL)"), {"i": job_id})
                    except Exception:  # a sleep was queued for the agent meanwhile (its queueing lock): it covers us
                        c.execute(text("ROLLBACK TO SAVEPOINT agentsleep_recover"))
                    else:
                        c.execute(text("RELEASE SAVEPOINT agentsleep_recover"))
                        retried += 1
                        logger.warning("sleep job %d: its worker stopped heartbeating; back in the queue", job_id)
                        continue
                c.execute(text("SELECT procrastinate_finish_job_v1(:i, 'failed', false)"), {"i": job_id})
                why = f"job {waiting} waits for the agent" if waiting is not None else f"{attempts + 1} attempts"
                logger.error("sleep job %d: its worker stopped heartbeating; failed for good (%s)", job_id, why)
            c.execute(text("SELECT procrastinate_prune_stalled_workers_v1(:secs)"), {"secs": self.stalled_after_s})
        return retried

    # ------------------------------------------------------------------ retries

    def retry_delay(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1`` after ``attempt`` failed: backoff · 2^(attempt−1), capped."""
        return min(self.retry_backoff_s * 2.0 ** min(attempt - 1, 62), self.retry_backoff_max_s)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Store failures and lost compare-and-sets are retried (they pass); anything else fails the job now."""
        return isinstance(error, StoreError) and attempt < self.max_attempts

    def _job(self, agent_id: object, passes: object, job_id: int) -> Consolidation:
        """The task procrastinate runs (in a thread): check the job's arguments, then `consolidate`."""
        if not isinstance(agent_id, str):
            raise InvalidInput(f"sleep job {job_id} names no agent (agent_id={agent_id!r})")
        n = self.passes if passes is None else _check_passes(passes, "the job's passes")
        return consolidate(self.engine, self.store, agent_id, passes=n, worker_id=self.worker_id, job_id=job_id)


def _job_manager_class() -> type:
    from procrastinate import exceptions, jobs, manager

    class JobManager(manager.JobManager):
        """procrastinate's job manager, except that a retry colliding with a sleep already waiting for the agent
        (the queueing lock: one waiting sleep per agent) finishes the job as failed: the waiting sleep consolidates
        whatever the failed one would have. Without this the retry's unique violation leaves the job running."""

        async def retry_job(self, job: Any, *args: Any, **kwargs: Any) -> None:
            try:
                await super().retry_job(job, *args, **kwargs)
            except exceptions.UniqueViolation:
                logger.warning("sleep job %s: not retried, a sleep of the same agent already waits", job.id)
                await self.finish_job(job=job, status=jobs.Status.FAILED, delete_job=False)

    return JobManager


def _JobManager(connector: Any) -> Any:
    return _job_manager_class()(connector)


class _Run:
    """One `SleepWorker.run`: a procrastinate app on the store's database, its worker, and our side loops."""

    def __init__(
        self,
        worker: SleepWorker,
        stop: threading.Event,
        max_jobs: int | None,
        on_job: Callable[[JobReport], None] | None,
    ) -> None:
        self.worker = worker
        self.stop = stop
        self.max_jobs = max_jobs
        self.on_job = on_job
        self.done = 0

    def _app(self) -> Any:
        import procrastinate
        from procrastinate.retry import BaseRetryStrategy, RetryDecision

        w = self.worker
        url = w.store.engine.url.set(drivername="postgresql")
        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=url.render_as_string(hide_password=False), min_size=1, max_size=4
            )
        )

        class Retry(BaseRetryStrategy):
            def get_retry_decision(self, *, exception: BaseException, job: Any) -> RetryDecision | None:
                attempt = job.attempts + 1
                if not w.should_retry(exception, attempt):
                    return None
                return RetryDecision(retry_in={"seconds": w.retry_delay(attempt)})  # type: ignore[typeddict-item]

        app.job_manager = _JobManager(app.connector)  # retries that collide with a waiting sleep fail instead

        @app.task(name=SLEEP_TASK, pass_context=True, retry=Retry())
        def sleep(context: Any, agent_id: object = None, passes: object = None, **_: object) -> dict[str, Any]:
            done = w._job(agent_id, passes, context.job.id)
            return {"snapshot_id": done.snapshot_id, "parent_id": done.parent_id, "tokens": done.tokens}

        del sleep  # registered with the app
        return app

    async def _middleware(self, call_next: Callable[[], Any], context: Any, pworker: Any) -> Any:
        """Around every job, on the event loop: report the attempt, and stop after ``max_jobs`` (before the worker
        could fetch another one)."""
        job = context.job
        attempt = job.attempts + 1
        agent = str(job.task_kwargs.get("agent_id", "?"))
        t0 = time.perf_counter()
        report: JobReport
        try:
            result = await call_next()
        except BaseException as e:
            retry = self.worker.should_retry(e, attempt)
            error = _clip(f"{type(e).__name__}: {e}")
            report = JobReport(
                job.id, agent, "retry" if retry else "failed", attempt, None, error, time.perf_counter() - t0
            )
            self._finish(report, pworker)
            raise
        snapshot = result.get("snapshot_id") if isinstance(result, dict) else None
        report = JobReport(job.id, agent, "succeeded", attempt, snapshot, None, time.perf_counter() - t0)
        self._finish(report, pworker)
        return result

    def _finish(self, report: JobReport, pworker: Any) -> None:
        self.done += 1
        log = logger.info if report.status == "succeeded" else logger.warning
        log("sleep worker %s: %s (%.2f s)", self.worker.worker_id, report.line(), report.seconds)
        if self.on_job is not None:
            try:
                self.on_job(report)
            except Exception:
                logger.exception("sleep worker %s: on_job failed; ignored", self.worker.worker_id)
        if self.max_jobs is not None and self.done >= self.max_jobs:
            pworker.stop()

    async def _side_loop(self) -> None:
        """Heartbeat-paced housekeeping: recover stalled jobs (also once at start)."""
        w = self.worker
        while True:
            try:
                n = await asyncio.to_thread(w.recover_stalled)
                if n:
                    logger.info("sleep worker %s: recovered %d stalled job(s)", w.worker_id, n)
            except Exception:  # the database may be away for a moment: try again next beat
                logger.warning("sleep worker %s: looking for stalled jobs failed", w.worker_id, exc_info=True)
            await asyncio.sleep(w.heartbeat_s)

    async def _watch_stop(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(0.05)

    async def main(self, wait: bool) -> None:
        w = self.worker
        app = self._app()
        async with app.open_async():
            run = asyncio.create_task(
                app.run_worker_async(
                    queues=list(w.queues),
                    name=w.worker_id,
                    concurrency=1,  # sleeps are compute-bound: one at a time per worker; run more workers
                    wait=wait,
                    install_signal_handlers=False,  # the CLI and library callers own the signals (`stop`)
                    update_heartbeat_interval=w.heartbeat_s,
                    stalled_worker_timeout=w.stalled_after_s,
                    fetch_job_polling_interval=w.poll_s,
                    worker_middleware=[self._middleware],
                )
            )
            side = asyncio.create_task(self._side_loop())
            watch = asyncio.create_task(self._watch_stop())
            try:
                await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (side, watch):
                    task.cancel()
                if not run.done():
                    run.cancel()  # procrastinate stops gracefully: the job in hand finishes and is recorded
                try:
                    await run
                except asyncio.CancelledError:
                    pass


def _check_passes(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{what} must be an int >= 1, got {value!r}")
    return value


def _check_seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise InvalidInput(f"{what} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _clip(text_: str) -> str:
    return text_ if len(text_) <= _MAX_ERROR else text_[: _MAX_ERROR - 3] + "..."


__all__ = [
    "CONFLICT_TRIES",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_STALLED_AFTER_S",
    "Consolidation",
    "JobReport",
    "SleepWorker",
    "consolidate",
    "default_worker_id",
]
