"""Revival-test agent: runs the deterministic conversation of helpers.conversation_turn and prints, after each turn,
``turn <t> <snapshot_id> <reply ids...>`` — only once the turn's snapshot is committed. SIGKILLed by test_revive.py.

Usage: python revive_child.py CHECKPOINT_DIR DB_URL N_TURNS
"""

from __future__ import annotations

import sys

import torch
from helpers import REVIVAL_REPLY, conversation_turn, revival_policy  # this file's directory is sys.path[0]

from agentsleep.memory.host import AgentHost
from agentsleep.runtime import TorchEngine
from agentsleep.store import SnapshotStore


def main() -> None:
    ckpt, url, n_turns = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    engine = TorchEngine.from_pretrained(ckpt)
    store = SnapshotStore(url)
    with AgentHost(
        engine, store, revival_policy(engine.window, engine.passes), background=False, snapshot_turns=True
    ) as host:
        host.create("agent")
        for t in range(n_turns):
            res = host.turn("agent", conversation_turn(t), max_new_tokens=REVIVAL_REPLY)
            sys.stdout.write(f"turn {t} {res.snapshot_id} {' '.join(map(str, res.tokens))}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
