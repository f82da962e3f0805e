"""`SleepWorker`: consume sleep jobs from a shared `SnapshotStore`, so any number of processes and hosts can do the
consolidation for agents that are not live anywhere (scale-out; docs/store.md "Sleep workers").

One job (`SleepWorker.run_once`):

1. claim the oldest pending job (`SnapshotStore.claim_job`: ``FOR UPDATE SKIP LOCKED`` on Postgres, so workers never
   take the same job or wait on each other);
2. load the agent's current snapshot, checked against the engine's model fingerprint;
3. import it into the engine under a private agent id and sleep over its window with N passes (the job's
   ``params["passes"]``, else the worker's ``passes``, else the engine's default);
4. save the result exactly as `AgentHost` saves a sleep (reason ``"sleep"``, the same ``tokens_consolidated``,
   ``sleep_count``, ``tokens_seen``, ``trigger`` and ``window_tokens_slept``), plus ``worker_id`` and ``job_id``
   in the metadata; its parent is the loaded snapshot, and the save is a compare-and-set on it
   (``expect_current``), so a worker never clobbers a snapshot saved after it loaded (a turn, another sleep);
5. finish the job: ``done`` with the new snapshot; ``done`` with no snapshot for an empty window (nothing to
   consolidate); ``failed`` with ``"superseded: ..."`` when the agent moved on meanwhile (a later job consolidates the
   newer snapshot); ``failed`` with the error text for anything else (a corrupt snapshot, another model's snapshot, a
   bad ``passes``, a store failure). The private agent is always removed from the engine again.

A failing job never stops the worker. A job whose worker dies stays ``running`` until another worker's claim finds it
older than ``stale_after_s`` and takes it over; because the save is a compare-and-set, redoing it is safe.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agentsleep.errors import InvalidInput, SnapshotConflict
from agentsleep.ids import ID_LEN, check_id
from agentsleep.runtime.engine import Engine, SleepCommit
from agentsleep.runtime.revive import memory_from_snapshot
from agentsleep.store import LoadedSnapshot, SleepJobRecord, SnapshotStore

logger = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 600.0  # a running job older than this is taken over (there is no heartbeat: keep it > a sleep)
_MAX_ERROR = 2000  # characters of an error message kept in the job row


def default_worker_id() -> str:
    """``host:pid:random``: unique per worker, and says where it ran."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[-ID_LEN:]


class SleepWorker:
    """Takes sleep jobs from ``store`` and runs them on ``engine``, one at a time.

    Args:
        engine: the model runner (`TorchEngine` or any `Engine`); must run the model the agents' snapshots were made
            with (another model's snapshot fails its job with `SnapshotMismatch`). It may be shared with other workers
            or a host: the worker's agents live under private ids and are removed after each job.
        store: the shared store (Postgres for many workers; SQLite serialises claims but works).
        worker_id: recorded on the job (``claimed_by``) and in the snapshot's metadata (default: `default_worker_id`).
        passes: default N for jobs without ``params["passes"]`` (default: the engine's).
        stale_after_s: take over running jobs claimed longer ago than this (their worker presumably died);
            None never takes a job over. Keep it well above the longest sleep: jobs have no heartbeat.

    Thread safety: one worker is driven by one thread; run several workers (threads or processes) to share the work.
    """

    def __init__(
        self,
        engine: Engine,
        store: SnapshotStore,
        *,
        worker_id: str | None = None,
        passes: int | None = None,
        stale_after_s: float | None = DEFAULT_STALE_AFTER_S,
    ) -> None:
        wid = default_worker_id() if worker_id is None else worker_id
        check_id(wid, "worker_id")
        self.engine = engine
        self.store = store
        self.worker_id = wid
        self.passes = None if passes is None else _check_passes(passes, "passes")
        if stale_after_s is not None and (
            isinstance(stale_after_s, bool) or not isinstance(stale_after_s, int | float) or not stale_after_s > 0
        ):
            raise InvalidInput(f"stale_after_s must be a number > 0 or None, got {stale_after_s!r}")
        self.stale_after_s = stale_after_s

    def __repr__(self) -> str:
        return f"SleepWorker({self.worker_id!r}, store={self.store.url!r}, engine={self.engine.fingerprint!r})"

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        *,
        poll_s: float = 1.0,
        stop: threading.Event | None = None,
        max_jobs: int | None = None,
        on_job: Callable[[SleepJobRecord], None] | None = None,
    ) -> int:
        """Process jobs until ``stop`` is set or ``max_jobs`` jobs are finished; wait ``poll_s`` seconds whenever there
        is nothing to do (or the store fails: that is logged and retried, never raised). ``on_job`` is called with
        every finished job. Returns the number of jobs processed."""
        if isinstance(poll_s, bool) or not isinstance(poll_s, int | float) or poll_s < 0:
            raise InvalidInput(f"poll_s must be a number >= 0, got {poll_s!r}")
        if max_jobs is not None and (isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1):
            raise InvalidInput(f"max_jobs must be an int >= 1 or None, got {max_jobs!r}")
        stop = stop if stop is not None else threading.Event()
        done = 0
        while not stop.is_set() and (max_jobs is None or done < max_jobs):
            try:
                job = self.run_once()
            except Exception:
                logger.exception("sleep worker %s: claiming or finishing a job failed; retrying", self.worker_id)
                stop.wait(poll_s)
                continue
            if job is None:
                stop.wait(poll_s)
                continue
            done += 1
            if on_job is not None:
                on_job(job)
        return done

    def run_once(self) -> SleepJobRecord | None:
        """Claim and run one job; returns it finished (``done`` or ``failed``), or None if there was none.

        Raises only when the store cannot claim or finish the job (`StoreError`); a job that cannot be finished stays
        ``running`` and is taken over once it is stale.
        """
        # Only this model's agents: a worker of another checkpoint leaves the job to a worker that can run it.
        job = self.store.claim_job(
            self.worker_id, stale_after_s=self.stale_after_s, fingerprint=self.engine.fingerprint
        )
        if job is None:
            return None
        t0 = time.perf_counter()
        logger.info(
            "sleep worker %s: claimed job %d (agent %r, attempt %d)", self.worker_id, job.id, job.agent_id, job.attempts
        )
        snapshot_id: str | None = None
        error: str | None = None
        detail = ""
        try:
            snapshot_id, detail = self._sleep(job)
        except SnapshotConflict as e:
            error = _clip(f"superseded: {e}")
        except Exception as e:  # a failing job never stops the worker: record it and go on
            logger.debug("sleep job %d failed", job.id, exc_info=True)
            error = _clip(f"{type(e).__name__}: {e}")
        finished = self._finish(job, snapshot_id, error)
        seconds = time.perf_counter() - t0
        if error is None:
            logger.info("sleep job %d (agent %r) done in %.2f s: %s", job.id, job.agent_id, seconds, detail)
        else:
            logger.warning("sleep job %d (agent %r) failed after %.2f s: %s", job.id, job.agent_id, seconds, error)
        return finished

    # ------------------------------------------------------------------ one job

    def _sleep(self, job: SleepJobRecord) -> tuple[str | None, str]:
        """Sleep the job's agent and save the result; (the new snapshot id or None, a note for the log)."""
        passes = self._job_passes(job)
        loaded = self.store.latest(job.agent_id, fingerprint=self.engine.fingerprint)
        if not loaded.window:
            return None, f"window of snapshot {loaded.record.id} is empty: nothing to consolidate"
        private = f"~sleep-worker/{job.id}/{uuid.uuid4().hex}"
        try:
            self.engine.import_state(private, memory_from_snapshot(loaded), snapshot_id=loaded.record.id)
            result = self.engine.sleep(private, passes, persist=lambda commit: self._save(job, loaded, commit))
        finally:
            if self.engine.has_agent(private):
                self.engine.remove_agent(private)
        if result.skipped == "empty":
            return None, f"window of snapshot {loaded.record.id} is empty: nothing to consolidate"
        if result.skipped is not None or result.snapshot_id is None:
            raise SnapshotConflict(f"the sleep of agent {job.agent_id!r} was dropped ({result.skipped or 'no save'})")
        return result.snapshot_id, (
            f"snapshot {result.snapshot_id} (N={result.passes}, {result.tokens} tokens, parent {loaded.record.id})"
        )

    def _save(self, job: SleepJobRecord, loaded: LoadedSnapshot, commit: SleepCommit) -> str:
        """Save a sleep the way `AgentHost` does (`save_memory` + its sleep metadata), as a compare-and-set on the
        snapshot the sleep started from."""
        memory = commit.memory
        meta: dict[str, Any] = {
            "sleep_count": memory.sleep_count,
            "tokens_seen": memory.tokens_seen,
            "trigger": commit.trigger,
            "window_tokens_slept": commit.tokens,
            "worker_id": self.worker_id,
            "job_id": job.id,
        }
        record = self.store.save(
            job.agent_id,
            memory.state,
            list(memory.window),
            reason="sleep",
            passes=commit.passes,
            tokens_consolidated=memory.tokens_consolidated,
            parent_id=loaded.record.id,
            thread_id=loaded.record.thread_id,
            metadata=meta,
            expect_current=loaded.record.id,
        )
        return record.id

    def _job_passes(self, job: SleepJobRecord) -> int | None:
        if "passes" in job.params:
            return _check_passes(job.params["passes"], "job params 'passes'")
        return self.passes

    def _finish(self, job: SleepJobRecord, snapshot_id: str | None, error: str | None) -> SleepJobRecord:
        try:
            return self.store.complete_job(job.id, snapshot_id=snapshot_id, error=error)
        except InvalidInput as e:
            # Finished by a worker that took it over as stale, or deleted with its agent: nothing left to record.
            logger.warning("sleep job %d: could not record its outcome (%s)", job.id, e)
            for j in self.store.jobs(job.agent_id):
                if j.id == job.id:
                    return j
            return job


def _check_passes(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{what} must be an int >= 1, got {value!r}")
    return value


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


__all__ = ["DEFAULT_STALE_AFTER_S", "SleepWorker", "default_worker_id"]
