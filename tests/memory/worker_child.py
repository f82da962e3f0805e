"""A sleep-worker process for the kill tests: ``python -m tests.memory.worker_child URL CHECKPOINT SLOW_S NAME``.

Its model's sleep first waits ``SLOW_S`` seconds (so a test can SIGKILL it mid-sleep); heartbeats every 0.3 s. Prints
``ready`` once its worker loop runs and one line per finished job attempt.
"""

from __future__ import annotations

import sys
import time

import torch

from agentsleep.memory.worker import SleepWorker
from agentsleep.runtime import TorchEngine
from agentsleep.store import SnapshotStore

HEARTBEAT_S = 0.3
STALLED_AFTER_S = 2.0


def main(url: str, checkpoint: str, slow_s: float, name: str) -> None:
    torch.set_num_threads(1)
    engine = TorchEngine.from_pretrained(checkpoint)
    real = engine.model.sleep_window

    def slow(cache, passes=None):  # type: ignore[no-untyped-def]
        print(f"sleeping {name}", flush=True)
        time.sleep(slow_s)
        return real(cache, passes)

    engine.model.sleep_window = slow  # type: ignore[method-assign]
    with SnapshotStore(url) as store:
        worker = SleepWorker(
            engine, store, worker_id=name, heartbeat_s=HEARTBEAT_S, stalled_after_s=STALLED_AFTER_S, poll_s=0.2
        )
        print("ready", flush=True)
        worker.run(on_job=lambda r: print(r.line(), flush=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
