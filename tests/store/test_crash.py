"""Crash safety with real process kills: writers are SIGKILLed at random moments; nothing committed is lost.

Writer processes (crash_writer.py) run side by side on the same agents; each reports ``agent seq snapshot_id digest``
only after `save` returned, i.e. after COMMIT. Each is killed with SIGKILL at its own random moment, round after
round. At the end every reported snapshot must load with exactly that state, every agent's current snapshot must load
and verify, and sequence numbers must be unique and increasing.

Writers are forked from a forkserver that has already imported torch and the store, so a kill-and-restart costs
milliseconds instead of a fresh interpreter; each writer is still its own OS process with its own connections.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from multiprocessing.connection import Connection

import pytest
from sqlalchemy import text

from agentsleep.store import SnapshotStore

from . import crash_writer
from .helpers import MP

ROUNDS = 4  # each round runs WRITERS writers side by side and kills each at its own random moment
WRITERS = 2
KILLS = ROUNDS * WRITERS


class _Writer:
    def __init__(self, url: str, seed: int) -> None:
        recv, send = MP.Pipe(duplex=False)
        self.proc = MP.Process(target=crash_writer.run, args=(url, seed, send), daemon=True)
        self.proc.start()
        send.close()  # ours; the child holds its own copy, so recv sees EOF once the child is dead
        self.lines: list[bytes] = []
        self.reader = threading.Thread(target=self._read, args=(recv,))
        self.reader.start()

    def _read(self, recv: Connection) -> None:
        try:
            while True:
                self.lines.append(recv.recv_bytes())
        except (EOFError, OSError):
            pass
        finally:
            recv.close()

    def ready(self) -> bool:
        if self.proc.exitcode is not None:
            pytest.fail(f"crash writer exited early with code {self.proc.exitcode}")
        return bool(self.lines)

    def kill(self) -> list[bytes]:
        """SIGKILL; return what it reported (each line a committed save)."""
        self.proc.kill()
        self.proc.join()
        self.reader.join()
        assert self.proc.exitcode == -signal.SIGKILL
        assert self.lines[0] == b"ready"
        return self.lines[1:]


def _round(url: str, seeds: list[int], delays: list[float]) -> list[list[bytes]]:
    writers = [_Writer(url, s) for s in seeds]
    deadline = time.monotonic() + 120
    while not all(w.ready() for w in writers):
        if time.monotonic() > deadline:
            for w in writers:
                w.kill()
            pytest.fail("crash writers did not start within 120 s")
        time.sleep(0.005)
    t0 = time.monotonic()
    out: list[list[bytes]] = [[] for _ in writers]
    for i in sorted(range(len(writers)), key=lambda i: delays[i]):
        time.sleep(max(0.0, t0 + delays[i] - time.monotonic()))
        out[i] = writers[i].kill()
    return out


def test_sigkill_during_saves_loses_nothing_committed(store_url: str) -> None:
    rng = random.Random(20240601)
    SnapshotStore(store_url).close()  # migrate once up front; the writers open with migrate=False
    committed: dict[str, tuple[str, int, str]] = {}  # snapshot id -> (agent, seq, digest)
    per_kill: list[int] = []
    for r in range(ROUNDS):
        seeds = [r * WRITERS + w + 1 for w in range(WRITERS)]
        for lines in _round(store_url, seeds, [rng.uniform(0.05, 0.8) for _ in seeds]):
            per_kill.append(len(lines))
            for ln in lines:
                agent, seq, sid, digest = ln.decode().split()
                committed[sid] = (agent, int(seq), digest)
    assert sum(per_kill) >= KILLS, f"the writer barely ran before the kills: {per_kill}"

    with SnapshotStore(store_url) as store:
        if store.dialect == "sqlite":
            with store.engine.connect() as c:
                assert c.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        # every printed (committed) snapshot is there, byte for byte
        for sid, (agent, seq, digest) in committed.items():
            got = store.load(sid)
            assert (got.record.agent_id, got.record.seq) == (agent, seq)
            assert got.state.digest() == digest
        # every agent's current snapshot loads and verifies, and is at least as new as anything printed for it
        agents = store.agents()
        assert {a.id for a in agents} >= {a for a, _, _ in committed.values()}
        for a in agents:
            hist = store.history(a.id)
            seqs = [r.seq for r in hist]
            assert seqs == sorted(set(seqs)) and seqs[-1] == a.last_seq
            latest = store.latest(a.id)  # verifies sha256 and the container checksums
            assert latest.record.seq == a.last_seq
            printed = [s for ag, s, _ in committed.values() if ag == a.id]
            assert latest.record.seq >= max(printed, default=0)
            # at most one unprinted save per kill can exist (committed, killed before printing)
            assert len(hist) - len(printed) <= KILLS
