"""A live agent and sleep workers writing the same agent at once, in real time (importable, no pytest here).

A host takes turns (every turn snapshotted, sleeps in the background) while workers consolidate the agent's stored
snapshot again and again: on Postgres, procrastinate `SleepWorker`s fed by a thread that keeps enqueueing its sleep;
on SQLite (no queue) threads calling `consolidate` in a loop. Every save is a compare-and-set, so afterwards:

- the agent's history is one chain (each snapshot's parent is the one saved before it): nothing was overwritten;
- along it, seq, tokens_consolidated, sleep_count and tokens_seen never go backwards;
- the windows along the chain spell one token stream in which every acknowledged turn's tokens sit at their
  positions (no turn lost), and the workers' consolidations are in it (they were merged, not overwritten).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field

from agentsleep.errors import SnapshotConflict
from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.memory.worker import SleepWorker, consolidate
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import TorchEngine
from agentsleep.store import SnapshotStore

from .lineage import assert_monotone, stream_of

REPLY = 2


@dataclass
class LiveResult:
    turns: int = 0
    acknowledged: list[tuple[int, list[int]]] = field(default_factory=list)  # (stream position, tokens) per turn
    worker_sleeps: int = 0  # consolidations by workers in the final lineage
    host_merges: int = 0  # host saves whose parent is a worker's consolidation
    snapshots: int = 0
    lost_tokens: int = 0
    errors: list[str] = field(default_factory=list)


def run_live(url: str, model: SleepHybrid, *, turns: int, workers: int = 2, min_worker_sleeps: int = 3,
             seconds_max: float = 120.0, seed: int = 0) -> LiveResult:  # fmt: skip
    """Drive the scenario and check it; raises AssertionError on any violation, returns the counts."""
    rng = random.Random(seed)
    L = model.config.window
    policy = SleepPolicy(window=L - REPLY - 1, passes=2, soft_threshold=0.6, debounce_seconds=0.0,
                         retry_backoff_seconds=0.01, retry_backoff_max_seconds=0.05)  # fmt: skip
    out = LiveResult()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    store = SnapshotStore(url)
    postgres = store.dialect == "postgresql"

    def guard(name: str, fn) -> threading.Thread:  # type: ignore[no-untyped-def]
        def body() -> None:
            try:
                fn()
            except BaseException as e:  # reported by the caller
                out.errors.append(f"{name}: {type(e).__name__}: {e}")

        return threading.Thread(target=body, name=name, daemon=True)

    def loop_consolidate(i: int) -> None:
        with SnapshotStore(url) as s:
            engine = TorchEngine(model)
            r = random.Random(seed * 31 + i)
            while not stop.is_set():
                try:
                    consolidate(engine, s, "live", passes=2, worker_id=f"w{i}")
                except SnapshotConflict:
                    pass  # the host won this time
                stop.wait(r.uniform(0.005, 0.03))

    def loop_enqueue() -> None:
        with SnapshotStore(url) as s:
            while not stop.is_set():
                s.enqueue_sleep("live", passes=2)
                stop.wait(0.02)

    def run_worker(i: int) -> None:
        with SnapshotStore(url) as s:
            SleepWorker(TorchEngine(model), s, worker_id=f"w{i}", heartbeat_s=0.5, stalled_after_s=3.0,
                        retry_backoff_s=0.02, poll_s=0.05).run(stop=stop)  # fmt: skip

    host = AgentHost(TorchEngine(model), store, policy, snapshot_turns=True)
    try:
        host.create("live")
        if postgres:
            threads.append(guard("enqueuer", loop_enqueue))
            threads += [guard(f"worker-{i}", lambda i=i: run_worker(i)) for i in range(workers)]
        else:
            threads += [guard(f"worker-{i}", lambda i=i: loop_consolidate(i)) for i in range(workers)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds_max
        t = 0
        while time.monotonic() < deadline and (t < turns or _worker_sleeps(store) < min_worker_sleeps):
            ids = [rng.randrange(2, model.config.vocab_size) for _ in range(rng.randrange(2, 7))]
            before = host.session("live").tokens_seen
            res = host.turn("live", ids, max_new_tokens=REPLY)
            out.acknowledged.append((before, ids + list(res.tokens)))
            t += 1
            time.sleep(rng.uniform(0.0, 0.06))  # idle moments: when workers get their turn
        out.turns = t
        host.flush(60)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
        try:
            host.park("live", sleep=False)  # whatever the last turns left unsaved
        finally:
            host.close()
    try:
        _check(store, out)
    finally:
        store.close()
    return out


def _worker_sleeps(store: SnapshotStore) -> int:
    return sum(1 for r in store.history("live") if "worker_id" in r.meta)


def _check(store: SnapshotStore, out: LiveResult) -> None:
    assert not out.errors, out.errors
    history = store.history("live")
    out.snapshots = len(history)
    assert store.current_id("live") == history[-1].id
    for prev, rec in itertools.pairwise(history):  # one chain: every save built on the one before it
        assert rec.parent_id == prev.id, f"snapshot seq {rec.seq} ({rec.reason}) does not descend from seq {prev.seq}"
    assert_monotone(history)
    stream = stream_of(store, "live")
    for pos, tokens in out.acknowledged:
        for i, tok in enumerate(tokens):
            if stream.get(pos + i) != tok:
                out.lost_tokens += 1
    assert out.lost_tokens == 0, f"{out.lost_tokens} acknowledged tokens are not in the lineage"
    end = max(p + len(t) for p, t in out.acknowledged)
    assert sorted(stream) == list(range(end)), "the lineage does not cover the agent's whole token stream"
    workers = {r.id for r in history if "worker_id" in r.meta}
    out.worker_sleeps = len(workers)
    out.host_merges = sum(1 for r in history if r.parent_id in workers and "worker_id" not in r.meta)


__all__ = ["LiveResult", "run_live"]
