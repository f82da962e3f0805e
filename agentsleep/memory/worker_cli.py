"""``agentsleep sleep-worker``: a procrastinate worker running the sleep jobs queued in a Postgres snapshot store
(see `agentsleep.memory.worker`).

Exit codes: 0 success (a job that failed is an outcome recorded in the queue, not a worker failure); 2 bad usage,
argument or checkpoint, or a SQLite store (no workers there); 5 the store failed (database unreachable, schema newer
than this agentsleep); 1 anything else. Errors print one line, ``error: ...``, on stderr.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from agentsleep.errors import (
    AgentSleepError,
    CheckpointError,
    ConfigError,
    InvalidInput,
    StoreError,
    UnsupportedBackend,
)
from agentsleep.memory.worker import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_POLL_S,
    DEFAULT_STALLED_AFTER_S,
    JobReport,
    SleepWorker,
)
from agentsleep.model.adaptive import AutoPasses
from agentsleep.runtime.torch_engine import TorchEngine
from agentsleep.store.cli import blob_dir_option, url_option
from agentsleep.store.engine import normalise_url, one_line
from agentsleep.store.store import SnapshotStore

EXIT_USAGE, EXIT_STORE = 2, 5


def _exit_code(e: AgentSleepError) -> int:
    if isinstance(e, InvalidInput | CheckpointError | ConfigError):
        return EXIT_USAGE
    if isinstance(e, StoreError):
        return EXIT_STORE
    return 1


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


class SleepDepth(click.ParamType):
    """A sleep depth on the command line: a whole number N ≥ 1, or ``auto``."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            n = int(text)
        except ValueError:
            self.fail(f"{value!r} is neither a whole number of passes nor 'auto'", param, ctx)
        if n < 1:
            self.fail(f"{n} passes: a sleep runs at least 1", param, ctx)
        return n


@click.command("sleep-worker", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Model checkpoint directory (config.json, model.safetensors): the model the agents' snapshots were made with.",
)
@url_option("Postgres store URL (env AGENTSLEEP_STORE_URL): its database holds the job queue shared by all workers.")
@blob_dir_option
@click.option(
    "--passes",
    type=SleepDepth(),
    default=None,
    help="Sleep passes N for jobs that name none, or 'auto': until S converges [checkpoint's].",
)
@click.option(
    "--max-passes",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="With --passes auto: the most passes a sleep runs.",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="With --passes auto: stop once S changes by less than this (relative) between passes.",
)
@click.option("--once", is_flag=True, help="Run at most one waiting job, then exit.")
@click.option("--max-jobs", type=click.IntRange(min=1), default=None, help="Exit after this many job attempts.")
@click.option("--drain", is_flag=True, help="Exit once no job waits (instead of waiting for more).")
@click.option("--worker-id", default=None, help="Name recorded in the snapshots and logs [host:pid:random].")
@click.option(
    "--heartbeat",
    "heartbeat_s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_HEARTBEAT_S,
    show_default=True,
    help="Seconds between heartbeats (and looks for jobs of dead workers).",
)
@click.option(
    "--stalled-after",
    "stalled_after_s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_STALLED_AFTER_S,
    show_default=True,
    help="A worker silent this many seconds is presumed dead; its running job goes back to the queue.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_ATTEMPTS,
    show_default=True,
    help="Attempts per job (retries of store errors and recoveries included) before it fails for good.",
)
@click.option(
    "--poll",
    "poll_s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_POLL_S,
    show_default=True,
    help="Seconds between looks for jobs whose retry delay ran out (new jobs arrive at once).",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device for the model.")
def sleep_worker(
    checkpoint: str,
    url: str,
    blob_dir: str | None,
    passes: int | str | None,
    max_passes: int,
    tol: float,
    once: bool,
    max_jobs: int | None,
    drain: bool,
    worker_id: str | None,
    heartbeat_s: float,
    stalled_after_s: float,
    max_attempts: int,
    poll_s: float,
    device: str,
) -> None:
    """Run the sleep jobs queued with `SnapshotStore.enqueue_sleep` (procrastinate, on the Postgres store): load each
    agent's current snapshot, sleep its window with N passes, save the result (a compare-and-set: a newer snapshot is
    never overwritten). Any number of workers may share one store; each job is done by one of them, a job of a dead
    worker is taken over once its heartbeat stops, and store errors are retried with backoff.

    Prints one line per job attempt. SIGINT / SIGTERM stop the worker after the job in hand.
    """
    try:
        if normalise_url(url).get_backend_name() != "postgresql":  # before opening or loading anything
            raise UnsupportedBackend(
                f"sleep workers need a Postgres store (procrastinate is a Postgres task queue), not {url!r}; with "
                "SQLite, AgentHost sleeps its agents in process: no workers needed"
            )
        depth = AutoPasses(max_passes, tol) if passes == "auto" else passes
        with SnapshotStore(url, blob_dir=blob_dir, create=False) as store:
            try:
                engine = TorchEngine.from_pretrained(checkpoint, passes=depth, device=device)
            except (RuntimeError, ValueError) as e:  # torch: an unknown device; our typed errors pass through
                if isinstance(e, AgentSleepError):
                    raise
                raise ConfigError(f"cannot load the checkpoint {checkpoint!r} on device {device!r}: {e}") from e
            worker = SleepWorker(
                engine,
                store,
                worker_id=worker_id,
                passes=depth,
                heartbeat_s=heartbeat_s,
                stalled_after_s=stalled_after_s,
                max_attempts=max_attempts,
                poll_s=poll_s,
            )
            click.echo(
                f"sleep-worker {worker.worker_id}: model {engine.fingerprint} (L={engine.window}, N={engine.passes}), "
                f"store {store.url}, queue {worker.queue}",
                err=True,
            )

            def report(r: JobReport) -> None:
                click.echo(r.line())

            if once:
                if worker.run_once_reporting(report) is None:
                    click.echo("no waiting sleep job")
                return
            stop = threading.Event()
            with _stop_on_signals(stop):
                n = worker.run(stop=stop, max_jobs=max_jobs, wait=not drain, on_job=report)
    except AgentSleepError as e:
        click.echo(f"error: {one_line(e)}", err=True)
        sys.exit(_exit_code(e))
    except OSError as e:  # e.g. an unreadable checkpoint file
        click.echo(f"error: {one_line(e)}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"{n} job attempt{'s' if n != 1 else ''} processed", err=True)


__all__ = ["sleep_worker"]
