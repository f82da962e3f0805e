"""``agentsleep sleep-worker``: consume sleep jobs from a shared snapshot store (see `agentsleep.memory.worker`).

Exit codes: 0 success (a job that failed is an outcome recorded in the store, not a worker failure); 2 bad usage,
argument or checkpoint; 5 the store failed (database unreachable, schema newer than this agentsleep); 1 anything
else. Errors print one line, ``error: ...``, on stderr.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click

from agentsleep.errors import AgentSleepError, CheckpointError, ConfigError, InvalidInput, StoreError
from agentsleep.memory.worker import DEFAULT_STALE_AFTER_S, SleepWorker
from agentsleep.runtime.torch_engine import TorchEngine
from agentsleep.store.cli import blob_dir_option, url_option
from agentsleep.store.records import SleepJobRecord
from agentsleep.store.store import SnapshotStore

EXIT_USAGE, EXIT_STORE = 2, 5


def _exit_code(e: AgentSleepError) -> int:
    if isinstance(e, InvalidInput | CheckpointError | ConfigError):
        return EXIT_USAGE
    if isinstance(e, StoreError):
        return EXIT_STORE
    return 1


def _describe(job: SleepJobRecord) -> str:
    line = f"job {job.id} agent {job.agent_id}: {job.status}"
    if job.result_snapshot_id is not None:
        return f"{line} -> snapshot {job.result_snapshot_id}"
    if job.error is not None:
        return f"{line}: {job.error}"
    return f"{line} (nothing to consolidate)" if job.status == "done" else line


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM finish the job in hand, then stop (a second SIGINT interrupts at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        click.echo("stopping after the current job (Ctrl-C again to interrupt it)", err=True)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@click.command("sleep-worker", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Model checkpoint directory (config.json, model.safetensors): the model the agents' snapshots were made with.",
)
@url_option("Store database URL (env AGENTSLEEP_STORE_URL); Postgres to share jobs between workers on many hosts.")
@blob_dir_option
@click.option(
    "--passes", type=click.IntRange(min=1), default=None, help="Sleep passes N for jobs that name none [checkpoint's]."
)
@click.option(
    "--poll",
    "poll_s",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds to wait when there is no job.",
)
@click.option("--once", is_flag=True, help="Process at most one job, then exit.")
@click.option("--max-jobs", type=click.IntRange(min=1), default=None, help="Exit after this many jobs.")
@click.option("--worker-id", default=None, help="Name recorded on claimed jobs and snapshots [host:pid:random].")
@click.option(
    "--stale-after",
    "stale_after_s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_STALE_AFTER_S,
    show_default=True,
    help="Take over running jobs claimed longer ago than this many seconds (their worker died).",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device for the model.")
def sleep_worker(
    checkpoint: str,
    url: str,
    blob_dir: str | None,
    passes: int | None,
    poll_s: float,
    once: bool,
    max_jobs: int | None,
    worker_id: str | None,
    stale_after_s: float,
    device: str,
) -> None:
    """Consume sleep jobs (`SnapshotStore.enqueue_sleep`) from the store: load each agent's current snapshot, sleep
    its window with N passes, save the result (a compare-and-set: a newer snapshot is never overwritten) and record
    the job's outcome. Any number of workers may share one Postgres store; each job is done by one of them.

    Prints one line per job. SIGINT / SIGTERM stop the worker after the job in hand.
    """
    try:
        try:
            engine = TorchEngine.from_pretrained(checkpoint, passes=passes, device=device)
        except (RuntimeError, ValueError) as e:  # torch: an unknown device; our typed errors pass through
            if isinstance(e, AgentSleepError):
                raise
            raise ConfigError(f"cannot load the checkpoint {checkpoint!r} on device {device!r}: {e}") from e
        with SnapshotStore(url, blob_dir=blob_dir) as store:
            worker = SleepWorker(engine, store, worker_id=worker_id, passes=passes, stale_after_s=stale_after_s)
            click.echo(
                f"sleep-worker {worker.worker_id}: model {engine.fingerprint} (L={engine.window}, N={engine.passes}), "
                f"store {store.url}",
                err=True,
            )
            if once:
                job = worker.run_once()
                click.echo(_describe(job) if job is not None else "no pending sleep job")
                return
            stop = threading.Event()
            with _stop_on_signals(stop):
                n = worker.run(poll_s=poll_s, stop=stop, max_jobs=max_jobs, on_job=lambda j: click.echo(_describe(j)))
    except AgentSleepError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(_exit_code(e))
    except OSError as e:  # e.g. an unreadable checkpoint file
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"{n} job{'s' if n != 1 else ''} processed", err=True)


__all__ = ["sleep_worker"]
