"""The reliability scenarios: SIGKILL loops, the payload-file race, bit flips, truncation, concurrent writers, bad
input, the park flow, a live host with sleep workers, and the sleep-job queue under worker kills.

Each scenario takes a store URL and its scale, does its damage, checks everything it was told was saved, and
returns a `Row` of counts (acknowledged / lost, errors typed / untyped, silently wrong results). `test_reliability`
runs them small in CI and asserts a clean row; ``python -m tests.reliability --scale full`` runs them at the size of
the review that found the bugs (docs/store.md prints that table).
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner
from sqlalchemy import select, text, update

from agentsleep.cli import main as cli_main
from agentsleep.errors import AgentSleepError, SnapshotConflict
from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.model.state import FastWeights
from agentsleep.runtime import TorchEngine, save_memory
from agentsleep.store import Snapshot, SnapshotStore
from tests.memory.live import run_live
from tests.runtime.helpers import make_model, turn_tokens
from tests.store.helpers import MP, toy_state

from . import children
from .report import Row, timed

INLINE_LIMIT = 100_000  # toy states (64 KiB) stay inline, the 256 KiB ones go to payload files


def backend(url: str) -> str:
    return "postgres" if url.startswith("postgresql") else "sqlite"


class Proc:
    """A forkserver child reporting through a pipe (read by a thread), SIGKILLed by the scenario."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        recv, send = MP.Pipe(duplex=False)
        self.proc = MP.Process(target=target, args=(*args, send), daemon=True)
        self.proc.start()
        send.close()
        self.lines: list[bytes] = []
        self.reader = threading.Thread(target=self._read, args=(recv,), daemon=True)
        self.reader.start()

    def _read(self, recv: Connection) -> None:
        try:
            while True:
                self.lines.append(recv.recv_bytes())
        except (EOFError, OSError):
            pass

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.lines:
            if self.proc.exitcode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"child {self.proc.name} did not start (exit code {self.proc.exitcode})")
            time.sleep(0.005)

    def kill(self) -> list[bytes]:
        self.proc.kill()
        self.proc.join()
        self.reader.join(10)
        return self.lines[1:]


# ---------------------------------------------------------------------------------------------- SIGKILL + shared files


def sigkill_shared_files(url: str, blob_dir: str, *, rounds: int, writers: int, seed: int = 0) -> Row:
    """Writer processes save agents whose payloads are shared (content-addressed files) with the agents a deleter
    process keeps creating, pruning and deleting; every process is SIGKILLed at its own random moment, round after
    round. Every acknowledged save must load, exactly, afterwards (and after `gc_blobs`)."""
    row = Row("SIGKILL: saves sharing files with prune/delete", backend(url))
    rng = random.Random(seed)
    with timed(row):
        SnapshotStore(url, blob_dir=blob_dir, inline_limit=0).close()  # migrate once; children open migrate=False
        acked: dict[str, tuple[str, int, int]] = {}
        kills = 0
        for r in range(rounds):
            procs = [Proc(children.shared_writer, (url, blob_dir, seed * 1000 + r * 10 + w)) for w in range(writers)]
            procs.append(Proc(children.deleter, (url, blob_dir, seed * 1000 + r * 10 + 9)))
            for p in procs:
                p.wait_ready()
            t0 = time.monotonic()
            for p, at in sorted(((p, rng.uniform(0.2, 1.5)) for p in procs), key=lambda x: x[1]):
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                for line in p.kill():
                    agent, seq, sid, k = line.decode().split()
                    acked[sid] = (agent, int(seq), int(k))
                kills += 1
        row.notes.append(f"{kills} SIGKILLs")
        row.acknowledged = len(acked)
        with SnapshotStore(url, blob_dir=blob_dir, inline_limit=0) as store:
            _check_acked(store, acked, row)
            for a in store.agents():  # every agent (kept, or a victim killed mid-delete) still loads
                status, _ = row.call(lambda a=a: store.latest(a.id))
                if status != "ok":
                    row.lost += 1
            store.gc_blobs(grace_s=0)  # nothing referenced may go
            _check_acked(store, acked, row)
    return row


def _check_acked(store: SnapshotStore, acked: dict[str, tuple[str, int, int]], row: Row) -> None:
    for sid, (agent, seq, k) in acked.items():
        status, got = row.call(lambda sid=sid: store.load(sid))
        if status != "ok":
            row.lost += 1
        elif (got.record.agent_id, got.record.seq, got.state.digest()) != (agent, seq, children.pool_state(k).digest()):
            row.silent += 1


# ---------------------------------------------------------------------------------------------- the reviewed race


def blob_race(url: str, blob_dir: str, *, iterations: int, seed: int = 0) -> Row:
    """The review's reproduction, at its size: agent y saves a payload identical to agent x's (one shared file) while
    x is deleted, for every interleaving the threads happen to produce (the window between the save's file write and
    its commit is widened by 0-3 ms, as a loaded machine would). Every acknowledged save of y must load."""
    row = Row("payload-file race (save vs delete of a sharer)", backend(url))
    rng = random.Random(seed)
    saver = SnapshotStore(url, blob_dir=blob_dir, inline_limit=0)
    deleter = SnapshotStore(url, blob_dir=blob_dir, inline_limit=0)
    real_put = saver.blobs.put  # type: ignore[union-attr]

    def slow_put(sha: str, data: bytes) -> str:
        rel = real_put(sha, data)
        time.sleep(rng.uniform(0, 0.003))
        return rel

    saver.blobs.put = slow_put  # type: ignore[union-attr,method-assign]
    with timed(row):
        try:
            for i in range(iterations):
                st = toy_state(20_000 + i)
                deleter.save(f"x{i}", st)
                barrier = threading.Barrier(2)
                out: dict[str, Any] = {}

                def save(i: int = i, st: FastWeights = st, barrier=barrier, out=out) -> None:  # type: ignore[no-untyped-def]
                    barrier.wait()
                    out["save"] = row.call(lambda: saver.save(f"y{i}", st))

                def delete(i: int = i, barrier=barrier, out=out) -> None:  # type: ignore[no-untyped-def]
                    barrier.wait()
                    time.sleep(rng.uniform(0, 0.002))
                    out["delete"] = row.call(lambda: deleter.delete_agent(f"x{i}"))

                threads = [threading.Thread(target=save), threading.Thread(target=delete)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if out["save"][0] != "ok":
                    continue
                row.acknowledged += 1
                status, got = row.call(lambda i=i: saver.latest(f"y{i}"))
                if status != "ok":
                    row.lost += 1
                elif got.state.digest() != st.digest():
                    row.silent += 1
        finally:
            saver.close()
            deleter.close()
    return row


# ---------------------------------------------------------------------------------------------- bit flips, truncation


def _seed_snapshots(store: SnapshotStore, n: int) -> list[tuple[str, str, list[int]]]:
    """n snapshots over 3 agents: (snapshot id, state digest, window)."""
    out = []
    for i in range(n):
        st, win = toy_state(30_000 + i), list(range(i % 7))
        rec = store.save(f"agent-{i % 3}", st, win, passes=1 + i % 3, tokens_consolidated=10 * i,
                         metadata={"sleep_count": i, "tokens_seen": 10 * i + len(win), "tag": f"t{i}"})  # fmt: skip
        out.append((rec.id, st.digest(), win))
    return out


def _same(store: SnapshotStore, sid: str, digest: str, window: list[int], before: Any) -> Callable[[], bool]:
    def check() -> bool:
        got = store.load(sid)
        return got.state.digest() == digest and got.window == window and got.record == before

    return check


def bit_flips(url: str, blob_dir: str, *, flips: int, seed: int = 0) -> Row:
    """Flip one bit (or one field) at a random place — inline payload, payload file, any row field the memory is
    described by — then load. Every load must raise a typed error; a load that returns is silently wrong."""
    row = Row("bit flips (payloads, files, row fields)", backend(url))
    rng = random.Random(seed)
    fields = ["tokens_consolidated", "passes", "window_len", "seq", "reason", "thread_id", "meta", "parent_id",
              "sha256", "record_sha256", "fingerprint"]  # fmt: skip
    with timed(row), SnapshotStore(url, blob_dir=blob_dir, inline_limit=INLINE_LIMIT) as store:
        inline = _seed_snapshots(store, 9)
        files = [(s, d, w) for s, d, w in (
            (r.id, toy_state(40_000 + i, dim=128).digest(), [i])
            for i, r in enumerate(store.save(f"big-{i}", toy_state(40_000 + i, dim=128), [i]) for i in range(3))
        )]  # fmt: skip
        records = {sid: store.get(sid) for sid, _, _ in inline + files}
        all_ids = sorted(records)
        while row.operations < flips:
            kind = rng.choice(["payload", "file", "field"])
            sid, digest, win = rng.choice(files if kind == "file" else inline)
            restore = _flip(store, rng, sid, kind, rng.choice(fields), all_ids)
            if restore is None:  # the database itself refused that edit (a constraint): not a trial
                continue
            try:
                status, _ = row.call(_same(store, sid, digest, win, records[sid]))
                if status == "ok":
                    row.silent += 1  # the damage went unnoticed (whether or not the data happened to match)
            finally:
                restore()
        for sid, digest, win in inline + files:  # everything restored loads again
            if row.call(_same(store, sid, digest, win, records[sid])) != ("ok", True):
                row.notes.append(f"{sid} did not load after restoring it")
    return row


def _flip(
    store: SnapshotStore, rng: random.Random, sid: str, kind: str, field: str, ids: list[str]
) -> Callable[[], None] | None:
    """Damage ``sid`` and return the function that undoes it (None: the database refused the edit)."""
    if kind == "file":
        assert store.blobs is not None
        path = store.blobs.path(store.blobs.relpath(store.get(sid).sha256))
        data = path.read_bytes()
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(b))
        return lambda: path.write_bytes(data)
    with store.engine.begin() as c:
        row = c.execute(select(Snapshot.__table__).where(Snapshot.id == sid)).mappings().one()
    original = dict(row)
    if kind == "payload":
        b = bytearray(original["payload"])
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        new: dict[str, Any] = {"payload": bytes(b)}
    else:
        col = "metadata" if field == "meta" else field
        v = original[col]
        if col == "parent_id":  # another lineage: a real snapshot, so the foreign key holds
            new = {col: rng.choice([i for i in ids if i not in (sid, v)])}
        elif isinstance(v, int):
            new = {col: v ^ (1 << rng.randrange(1, 8))}
        elif isinstance(v, dict):
            new = {col: {**v, "sleep_count": int(v.get("sleep_count", 0)) + 1}}
        elif isinstance(v, str) and v:
            i = rng.randrange(len(v))
            new = {col: v[:i] + ("0" if v[i] != "0" else "1") + v[i + 1 :]}
        else:
            new = {col: "x"}
    try:
        with store.engine.begin() as c:
            c.execute(update(Snapshot.__table__).where(Snapshot.__table__.c.id == sid).values(**new))
    except Exception:  # e.g. a flipped seq colliding with another (unique): the database refused it
        return None

    def undo() -> None:
        with store.engine.begin() as c:
            c.execute(update(Snapshot.__table__).where(Snapshot.__table__.c.id == sid).values(**original))

    return undo


def truncation(url: str, blob_dir: str, tmp: Path, *, cuts: int, seed: int = 0) -> Row:
    """Truncate at random lengths: the SQLite database file (SQLite only), payload files, inline payloads and
    exported snapshot files. Opening, listing, loading and importing must raise typed errors or return exactly the
    saved data."""
    row = Row("truncation (database file, payloads, exports)", backend(url))
    rng = random.Random(seed)
    with timed(row):
        with SnapshotStore(url, blob_dir=blob_dir, inline_limit=INLINE_LIMIT) as store:
            saved = {f"agent-{i % 3}": (sid, d, w) for i, (sid, d, w) in enumerate(_seed_snapshots(store, 6))}
            big = store.save("big", toy_state(50_000, dim=128), [5])
            export = store.export_snapshot(saved["agent-0"][0])
            for _ in range(cuts):  # inline payloads and payload files
                sid = rng.choice([big.id, saved["agent-1"][0]])
                restore = _truncate_payload(store, rng, sid)
                try:
                    status, _ = row.call(lambda sid=sid: store.load(sid))
                    row.silent += status == "ok"
                finally:
                    restore()
                cut = export[: rng.randrange(len(export))]
                status, _ = row.call(lambda cut=cut: store.import_snapshot(cut, agent_id="imported"))
                row.silent += status == "ok"
            if backend(url) == "sqlite":
                with store.engine.connect() as c:
                    c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        if backend(url) == "sqlite":
            db = Path(url.removeprefix("sqlite:///"))
            data = db.read_bytes()
            for i in range(cuts):
                copy = tmp / f"cut-{i}.db"
                copy.write_bytes(data[: rng.randrange(len(data))])
                _open_damaged(f"sqlite:///{copy}", saved, row)
    return row


def _truncate_payload(store: SnapshotStore, rng: random.Random, sid: str) -> Callable[[], None]:
    rec = store.get(sid)
    if rec.storage == "file":
        assert store.blobs is not None
        path = store.blobs.path(store.blobs.relpath(rec.sha256))
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
        return lambda: path.write_bytes(data)
    with store.engine.begin() as c:
        data = c.execute(select(Snapshot.payload).where(Snapshot.id == sid)).scalar_one()
        c.execute(update(Snapshot).where(Snapshot.id == sid).values(payload=data[: rng.randrange(len(data))]))

    def undo() -> None:
        with store.engine.begin() as c:
            c.execute(update(Snapshot).where(Snapshot.id == sid).values(payload=data))

    return undo


def _open_damaged(url: str, saved: dict[str, tuple[str, str, list[int]]], row: Row) -> None:
    status, store = row.call(lambda: SnapshotStore(url, create=False))
    if status != "ok":
        return
    try:
        status, agents = row.call(store.agents)
        if status == "ok" and {a.id for a in agents} != set(saved) | {"big"}:
            row.silent += 1  # a listing that quietly lost agents
        for agent, (sid, digest, win) in saved.items():
            status, got = row.call(lambda agent=agent: store.latest(agent))
            if status == "ok" and (got.record.id, got.state.digest(), got.window) != (sid, digest, win):
                row.silent += 1
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- concurrent writers


def cas_writers(url: str, *, writers: int, saves: int, seed: int = 0) -> Row:
    """``writers`` threads, each with its own store, make ``saves`` compare-and-set saves of one agent (read the
    current id, save expecting it, retry on conflict). No update may be lost: every acknowledged save is in the
    agent's history, and the history is one chain in which each save's parent is the one it expected."""
    row = Row("concurrent compare-and-set writers", backend(url))
    with timed(row):
        with SnapshotStore(url) as s:
            first = s.save("cas", toy_state(60_000))
        acked: list[tuple[str, str]] = []  # (snapshot id, the id it expected)
        lock = threading.Lock()

        def work(w: int) -> None:
            rng = random.Random(seed * 100 + w)
            with SnapshotStore(url) as s:
                for i in range(saves):
                    while True:
                        row.operations += 1
                        cur = s.current_id("cas")
                        try:
                            rec = s.save("cas", toy_state(61_000 + w * 1000 + i), [w, i], expect_current=cur)
                        except SnapshotConflict:  # another writer won: the protocol working, retry on the new one
                            time.sleep(rng.uniform(0, 0.002))
                            continue
                        except AgentSleepError as e:
                            row.typed += 1
                            row.notes.append(f"{type(e).__name__}: {e}")
                            return
                        except Exception as e:
                            row.untyped += 1
                            row.notes.append(f"untyped {type(e).__name__}: {e}")
                            return
                        with lock:
                            acked.append((rec.id, cur))
                        break

        threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row.acknowledged = len(acked)
        with SnapshotStore(url) as s:
            history = s.history("cas")
            ids = {r.id for r in history}
            row.lost += sum(1 for sid, _ in acked if sid not in ids)
            parent_of = {r.id: r.parent_id for r in history}
            row.silent += sum(1 for sid, expected in acked if parent_of.get(sid) != expected)
            chain_ok = all(b.parent_id == a.id for a, b in itertools.pairwise(history))
            row.silent += 0 if chain_ok and history[0].id == first.id else 1
    return row


# ---------------------------------------------------------------------------------------------- bad input


def bad_inputs(url: str, tmp: Path) -> Row:
    """Every kind of bad argument the review tried, through the API and the CLI. Each must raise a typed error (the
    CLI: one ``error:`` line, non-zero exit) and change nothing; an accepted one is counted as silently wrong."""
    row = Row("bad inputs (API and CLI)", backend(url))
    with timed(row), SnapshotStore(url) as store:
        good = store.save("a", toy_state(1), [1, 2], metadata={"k": 1})
        before = [(r.id, r.record_sha256) for r in store.history("a")]
        st = toy_state(2)
        nan = toy_state(3)
        nan.ssm[0][0, 0, 0, 0] = math.nan
        inf = toy_state(3)
        inf.ssm[1][0, 1, 1, 1] = math.inf
        calls: list[Callable[[], object]] = [
            lambda: store.save("", st),
            lambda: store.save("x" * 129, st),
            lambda: store.save(5, st),  # type: ignore[arg-type]
            lambda: store.save("a\ud800", st),
            lambda: store.save("a\n", st),
            lambda: store.save(" a", st),
            lambda: store.save("a", "state"),  # type: ignore[arg-type]
            lambda: store.save("a", nan),
            lambda: store.save("a", inf),
            lambda: store.save("a", FastWeights(ssm=[t.double() for t in st.ssm], fingerprint=st.fingerprint)),
            lambda: store.save("a", FastWeights(ssm=[t.half() for t in st.ssm], fingerprint=st.fingerprint)),
            lambda: store.save("a", FastWeights(ssm=[torch.cat([t, t]) for t in st.ssm], fingerprint=st.fingerprint)),
            lambda: store.save("a", toy_state(2, heads=4)),
            lambda: store.save("a", toy_state(2, fingerprint="other")),
            lambda: store.save("a", st, [1.5]),
            lambda: store.save("a", st, [True]),
            lambda: store.save("a", st, [-1]),
            lambda: store.save("a", st, [2**64]),
            lambda: store.save("a", st, "abc"),  # type: ignore[arg-type]
            lambda: store.save("a", st, [0] * (1 << 20 | 1)),
            lambda: store.save("a", st, [1] * 40, max_window=33),
            lambda: store.save("a", st, passes=0),
            lambda: store.save("a", st, passes=2**31),
            lambda: store.save("a", st, passes=1.5),  # type: ignore[arg-type]
            lambda: store.save("a", st, tokens_consolidated=-1),
            lambda: store.save("a", st, tokens_consolidated=2**63),
            lambda: store.save("a", st, tokens_consolidated=10**30),
            lambda: store.save("a", st, reason="Bad Reason"),
            lambda: store.save("a", st, reason="x" * 40),
            lambda: store.save("a", st, thread_id="t\x00"),
            lambda: store.save("a", st, metadata={"x": object()}),
            lambda: store.save("a", st, metadata={"x": math.nan}),
            lambda: store.save("a", st, metadata={"x": "\udfff"}),
            lambda: store.save("a", st, metadata=[1]),  # type: ignore[arg-type]
            lambda: store.save("a", st, metadata={"x": "y" * (1 << 21)}),
            lambda: store.save("a", st, parent_id="\ud800"),
            lambda: store.save("a", st, parent_id="0" * 32),
            lambda: store.save("a", st, expect_current="0" * 32),
            lambda: store.save("a", st, expect_current=1),  # type: ignore[arg-type]
            lambda: store.load("nope"),
            lambda: store.load("\ud800" * 3),
            lambda: store.load("x" * 500),
            lambda: store.load(good.id, fingerprint="other"),
            lambda: store.load(good.id, shapes={"ssm.0": [1]}),
            lambda: store.latest("ghost"),
            lambda: store.history("ghost"),
            lambda: store.prune("a", keep=-1),
            lambda: store.prune("a", keep=2**70),
            lambda: store.fork(good.id, "a"),
            lambda: store.fork("nope", "b"),
            lambda: store.set_current("a", "nope"),
            lambda: store.delete_agent("ghost"),
            lambda: store.import_snapshot(b""),
            lambda: store.import_snapshot(b"\x00" * 64),
            lambda: store.import_snapshot(toy_state(1).to_bytes()),
            lambda: store.gc_blobs(grace_s=-1),
            lambda: store.current_id("ghost\n"),
            lambda: store.get(None),  # type: ignore[arg-type]
        ]
        if store.dialect == "postgresql":
            calls += [lambda: store.enqueue_sleep("ghost"), lambda: store.enqueue_sleep("a", passes=0)]
        else:
            calls += [lambda: store.enqueue_sleep("a")]
        for call in calls:
            status, _ = row.call(call)
            row.silent += status == "ok"
        row.silent += [(r.id, r.record_sha256) for r in store.history("a")] != before
        row.silent += [a.id for a in store.agents()] != ["a"]
    empty, garbage, nested = tmp / "empty.db", tmp / "garbage.db", tmp / "no" / "dir" / "x.db"
    empty.write_bytes(b"")
    garbage.write_bytes(b"not a database" * 100)
    cli_cases = [
        ["snapshots", "--url", f"sqlite:///{empty}", "list"],
        ["snapshots", "--url", f"sqlite:///{garbage}", "list"],
        ["snapshots", "--url", f"sqlite:///{nested}", "list"],
        ["snapshots", "--url", f"sqlite:///{tmp / 'missing.db'}", "list"],
        ["snapshots", "--url", "mysql://x/y", "list"],
        ["snapshots", "--url", url, "show", "nope"],
        ["snapshots", "--url", url, "show", "\udc80"],
        ["snapshots", "--url", url, "list", "ghost"],
        ["snapshots", "--url", url, "prune", "a", "--keep", "99999999999999999999999"],
        ["snapshots", "--url", url, "fork", good.id, "a"],
        ["snapshots", "--url", url, "export", good.id, "-o", str(tmp / "no" / "such" / "f.snap")],
        ["snapshots", "--url", url, "import", str(garbage)],
        ["snapshots", "--url", url, "delete-agent", "ghost", "--yes"],
        ["sleep-worker", "--checkpoint", str(tmp), "--url", f"sqlite:///{tmp / 'x.db'}"],
    ]
    for args in cli_cases:
        row.operations += 1
        res = CliRunner().invoke(cli_main, args)
        lines = res.stderr.splitlines()
        if res.exit_code == 0:
            row.silent += 1
        elif res.exception is not None and not isinstance(res.exception, SystemExit):
            row.untyped += 1
            row.notes.append(f"CLI {args[-1]!r}: {type(res.exception).__name__}")
        elif (len(lines) == 1 and lines[0].startswith("error: ")) or "Usage:" in res.output:
            row.typed += 1
        else:
            row.untyped += 1
            row.notes.append(f"CLI {args}: {res.output[-200:]!r}")
    row.silent += nested.parent.exists() or (tmp / "missing.db").exists()  # nothing created by a read
    return row


# ---------------------------------------------------------------------------------------------- runtime flows


def park_flow(url: str, model: SleepHybrid, *, agents: int, seed: int = 0) -> Row:
    """The documented park flow with default settings (no turn snapshots): turns, `park` (sleep queued for workers
    on Postgres, done in process on SQLite), a fresh host revives. Every token taken in must be in the revived agent
    (consolidated or in its window)."""
    row = Row("park flow (turns, park, revive)", backend(url))
    rng = random.Random(seed)
    L = model.config.window
    taken: dict[str, list[int]] = {}
    with timed(row), SnapshotStore(url) as store:
        pol = SleepPolicy(window=L, passes=2, debounce_seconds=0.0)
        with AgentHost(TorchEngine(model), store, pol) as host:
            for a in range(agents):
                aid = f"park-{a}"
                host.create(aid)
                taken[aid] = []
                for t in range(rng.randrange(1, 8)):
                    ids = turn_tokens(seed * 1000 + a * 10 + t, rng.randrange(1, 9))
                    res = host.turn(aid, ids, max_new_tokens=rng.randrange(0, 3))
                    taken[aid] += ids + list(res.tokens)
                    row.acknowledged += 1
                status, _ = row.call(lambda aid=aid: host.park(aid, sleep=rng.random() < 0.5))
        if store.dialect == "postgresql":
            from agentsleep.memory.worker import SleepWorker

            SleepWorker(TorchEngine(model), store, heartbeat_s=0.5, stalled_after_s=3.0).run(wait=False)
        with AgentHost(TorchEngine(model), store, pol) as fresh:
            for aid, tokens in taken.items():
                status, s = row.call(lambda aid=aid: fresh.revive(aid))
                if status != "ok":
                    row.lost += len(tokens)
                    continue
                row.lost += max(0, len(tokens) - (s.tokens_consolidated + len(s.window)))
                row.silent += s.window != tuple(tokens[len(tokens) - len(s.window) :])
    return row


def live(url: str, model: SleepHybrid, *, turns: int, workers: int, seed: int = 0) -> Row:
    """A live host and sleep workers writing one agent at once (tests/memory/live.py): lost = acknowledged turn
    tokens missing from the lineage; silent = an overwritten save or a counter going backwards."""
    row = Row(f"live host + {workers} sleep workers", backend(url))
    with timed(row):
        try:
            res = run_live(url, model, turns=turns, workers=workers, min_worker_sleeps=3, seconds_max=600, seed=seed)
        except AssertionError as e:
            row.silent += 1
            row.notes.append(str(e)[:200])
            return row
        row.operations = res.turns
        row.acknowledged = res.turns
        row.lost = res.lost_tokens
        row.notes.append(f"{res.worker_sleeps} worker consolidations kept, {res.host_merges} merged by the host")
    return row


def queue_exactly_once(url: str, checkpoint: str, *, workers: int, jobs: int, kills: int, seed: int = 0) -> Row:
    """Postgres: ``jobs`` agents each get one queued sleep; ``workers`` worker processes run them while ``kills`` of
    them are SIGKILLed at random moments (and replaced). Afterwards every job has succeeded and every agent holds
    exactly one consolidation: lost = a job not done, silent = an agent consolidated twice."""
    row = Row(f"sleep queue: {workers} workers x {jobs} jobs, {kills} SIGKILLs", backend(url))
    rng = random.Random(seed)
    model = SleepHybrid.from_pretrained(checkpoint)
    with timed(row), SnapshotStore(url) as store:
        for i in range(jobs):
            engine = TorchEngine(model)
            engine.create_agent(f"q{i}")
            engine.observe(f"q{i}", turn_tokens(seed + i, 3 + i % 9))
            save_memory(store, f"q{i}", engine.export_state(f"q{i}"), reason="turn", passes=1)
            store.enqueue_sleep(f"q{i}")
        row.acknowledged = jobs
        procs = [Proc(children.queue_worker, (url, checkpoint, f"w{i}", 0.0)) for i in range(workers)]
        deadline = time.monotonic() + 600
        done_kills = 0
        while time.monotonic() < deadline:
            states = _job_states(store)
            if not (states.get("todo", 0) or states.get("doing", 0)):
                break
            if done_kills < kills and rng.random() < 0.3:
                victim = rng.randrange(workers)
                procs[victim].kill()
                procs[victim] = Proc(children.queue_worker, (url, checkpoint, f"w{victim}-{done_kills}", 0.0))
                done_kills += 1
            time.sleep(rng.uniform(0.1, 0.5))
        for p in procs:
            p.kill()
        row.notes.append(f"{done_kills} SIGKILLs")
        row.operations = jobs
        states = _job_states(store)
        row.lost = jobs - states.get("succeeded", 0)
        per_agent = Counter(r.agent_id for a in range(jobs) for r in store.history(f"q{a}") if r.reason == "sleep")
        row.lost += sum(1 for a in range(jobs) if per_agent[f"q{a}"] == 0)
        row.silent = sum(1 for n in per_agent.values() if n > 1)
    return row


def _job_states(store: SnapshotStore) -> dict[str, int]:
    with store.engine.connect() as c:
        return dict(c.execute(text("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")).all())


def checkpoint_dir(tmp: Path) -> str:
    """A toy checkpoint the worker processes load (the model of `toy_model`)."""
    return str(toy_model().save_pretrained(tmp / "ckpt"))


def toy_model() -> SleepHybrid:
    return make_model(window=32, passes=2)


def sqlite_integrity(url: str) -> bool:
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def fresh_blob_dir(tmp: Path, name: str) -> str:
    d = tmp / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return str(d)


__all__: Sequence[str] = [
    "bad_inputs",
    "bit_flips",
    "blob_race",
    "cas_writers",
    "checkpoint_dir",
    "fresh_blob_dir",
    "live",
    "park_flow",
    "queue_exactly_once",
    "sigkill_shared_files",
    "sqlite_integrity",
    "toy_model",
    "truncation",
]
