"""Crash-test writer: saves snapshots in a loop and reports ``agent seq snapshot_id digest`` after each commit.

Used by tests/store/test_crash.py as a forkserver child (`run`, reporting through a pipe), so that each killed writer
costs a fork rather than a fresh interpreter importing torch. Also runnable by hand, printing to stdout:
``python tests/store/crash_writer.py URL SEED [N_AGENTS]``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch

from agentsleep.model.state import FastWeights
from agentsleep.store import SnapshotStore


def write_forever(url: str, seed: int, emit: Callable[[bytes], None], n_agents: int = 4) -> None:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    store = SnapshotStore(url, migrate=False)  # the test migrated already; a kill mid-migration is not the point
    # A first save of a private agent compiles SQLAlchemy's statements (~0.4 s cold, seconds on a loaded machine),
    # so the kills, timed from "ready", land among real saves rather than before the first one.
    store.save(f"warmup-{seed}", FastWeights(ssm=[torch.zeros(1, 2, 64, 64)] * 2, fingerprint="toy-abc"))
    emit(b"ready")
    i = 0
    while True:
        agent = f"crash-{rng.randrange(n_agents)}"
        g = torch.Generator().manual_seed(seed * 1_000_000 + i)
        state = FastWeights(ssm=[torch.randn(1, 2, 64, 64, generator=g) for _ in range(2)], fingerprint="toy-abc")
        rec = store.save(agent, state, window=list(range(i % 37)), tokens_consolidated=i)
        # reported only after save() returned, i.e. after COMMIT: every reported line must survive the kill
        emit(f"{agent} {rec.seq} {rec.id} {state.digest()}".encode())
        i += 1


def run(url: str, seed: int, conn: Connection) -> None:
    """Forkserver entry point. One message per line; each is far below PIPE_BUF, so a kill never splits one."""
    write_forever(url, seed, conn.send_bytes)


def main() -> None:
    def emit(line: bytes) -> None:
        sys.stdout.buffer.write(line + b"\n")
        sys.stdout.buffer.flush()

    write_forever(sys.argv[1], int(sys.argv[2]), emit, int(sys.argv[3]) if len(sys.argv) > 3 else 4)


if __name__ == "__main__":
    main()
