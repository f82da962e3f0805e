"""Processes the reliability scenarios start and SIGKILL (forkserver children: each is its own OS process with its
own connections, started in milliseconds). Each reports through a pipe, one message per line, only after the commit
it reports: every reported save must survive the kill."""

from __future__ import annotations

import random
import time
from multiprocessing.connection import Connection

import torch

from agentsleep.store import SnapshotStore
from tests.store.helpers import toy_state

POOL = 3  # states shared by every agent: identical payloads share one content-addressed file


def pool_state(i: int):  # type: ignore[no-untyped-def]
    return toy_state(10_000 + i % POOL)


def shared_writer(url: str, blob_dir: str, seed: int, conn: Connection) -> None:
    """Save kept agents ``keep-<seed>-<k>`` with pool states (files shared with the deleter's victims), forever."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    store = SnapshotStore(url, blob_dir=blob_dir, inline_limit=0, migrate=False)
    store.save(f"warmup-{seed}", toy_state(seed))  # compiles the statements: kills land among real saves
    conn.send_bytes(b"ready")
    i = 0
    while True:
        agent = f"keep-{seed}-{rng.randrange(4)}"
        k = rng.randrange(POOL)
        rec = store.save(agent, pool_state(k), [], tokens_consolidated=i)
        conn.send_bytes(f"{agent} {rec.seq} {rec.id} {k}".encode())
        i += 1


def deleter(url: str, blob_dir: str, seed: int, conn: Connection) -> None:
    """Create victims with pool states and delete or prune them, forever: each unlinks files kept agents share."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    store = SnapshotStore(url, blob_dir=blob_dir, inline_limit=0, migrate=False)
    conn.send_bytes(b"ready")
    i = 0
    while True:
        victim = f"victim-{seed}-{i}"
        for k in rng.sample(range(POOL), 2):
            store.save(victim, pool_state(k), [])
        if rng.random() < 0.5:
            store.delete_agent(victim)
        else:
            store.prune(victim, keep=1)
            store.delete_agent(victim)
        i += 1
        time.sleep(rng.uniform(0, 0.01))  # SQLite's lock is not fair: a deleter in a tight loop starves the writers


def queue_worker(url: str, checkpoint: str, name: str, slow_s: float, conn: Connection) -> None:
    """A sleep worker (procrastinate) on ``checkpoint``'s model; reports every finished attempt."""
    torch.set_num_threads(1)
    from agentsleep.memory.worker import SleepWorker
    from agentsleep.runtime import TorchEngine

    engine = TorchEngine.from_pretrained(checkpoint)
    if slow_s > 0:
        real = engine.model.sleep_window

        def slow(cache, passes=None):  # type: ignore[no-untyped-def]
            time.sleep(slow_s)
            return real(cache, passes)

        engine.model.sleep_window = slow  # type: ignore[method-assign]
    with SnapshotStore(url, migrate=False) as store:
        worker = SleepWorker(engine, store, worker_id=name, heartbeat_s=0.5, stalled_after_s=3.0, poll_s=0.2)
        conn.send_bytes(b"ready")
        worker.run(on_job=lambda r: conn.send_bytes(f"{r.job_id} {r.status} {r.snapshot_id}".encode()))
