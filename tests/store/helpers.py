"""Toy states and workers shared by the store tests (importable by spawned processes, so no pytest here)."""

from __future__ import annotations

import multiprocessing as mp
import random

import torch

from agentsleep.model.state import FastWeights
from agentsleep.store import SnapshotStore

TOY_FP = "toy-abc"

# Worker processes are forked from a forkserver that has imported torch and the store once, so each one starts in
# milliseconds; like spawn (and unlike fork) they inherit no connections or threads from the test process.
MP = mp.get_context("forkserver")
MP.set_forkserver_preload(["torch", "agentsleep.store"])


def toy_state(seed: int, *, fingerprint: str = TOY_FP, heads: int = 2, dim: int = 64, layers: int = 2) -> FastWeights:
    """The toy model's state: 2 GDN layers, 2 heads, 64×64 float32 (≈ 64 KiB), random but seeded."""
    g = torch.Generator().manual_seed(seed)
    return FastWeights(
        ssm=[torch.randn(1, heads, dim, dim, generator=g) for _ in range(layers)], fingerprint=fingerprint
    )


def marked_state(agent: int, worker: int, step: int) -> FastWeights:
    """A self-describing state: its first three values name (agent, worker, step) and the rest is seeded by them,
    so any reader can tell whose state it got and recompute exactly what it must equal."""
    st = toy_state(agent * 1_000_003 + worker * 1_009 + step)
    st.ssm[0][0, 0, 0, :3] = torch.tensor([agent, worker, step], dtype=torch.float32)
    return st


def check_marked(state: FastWeights, expected_agent: int) -> tuple[int, int]:
    """Assert ``state`` is exactly a `marked_state` of ``expected_agent``; returns its (worker, step)."""
    agent, worker, step = (int(x) for x in state.ssm[0][0, 0, 0, :3].tolist())
    assert agent == expected_agent, f"load of agent {expected_agent} returned agent {agent}'s state"
    assert state.digest() == marked_state(agent, worker, step).digest(), f"state of agent {agent} is not as saved"
    return worker, step


def agent_name(i: int) -> str:
    return f"conc-{i:03d}"


def hammer(target: str | SnapshotStore, worker: int, n_agents: int, seed: int) -> list[tuple[str, int, str, str]]:
    """Save one marked state for every agent (in a worker-specific order), loading a random agent after each save.

    ``target`` is a URL (the worker opens its own store, as a spawned process must) or a store shared with other
    threads. Returns (agent, seq, snapshot id, digest) per save.
    """
    torch.set_num_threads(1)
    rng = random.Random(seed * 7919 + worker)
    order = list(range(n_agents))
    rng.shuffle(order)
    saved: list[tuple[str, int, str, str]] = []
    store = SnapshotStore(target) if isinstance(target, str) else target
    try:
        for step, a in enumerate(order):
            st = marked_state(a, worker, step)
            rec = store.save(agent_name(a), st, window=[a, worker, step], reason="manual")
            assert rec.agent_id == agent_name(a)
            saved.append((rec.agent_id, rec.seq, rec.id, st.digest()))
            other = rng.randrange(n_agents)
            try:
                got = store.latest(agent_name(other))
            except KeyError:  # UnknownAgent: nobody has saved that agent yet
                continue
            assert got.record.agent_id == agent_name(other)
            w, s = check_marked(got.state, other)
            assert got.window == [other, w, s], "window belongs to another save than the state"
    finally:
        if isinstance(target, str):
            store.close()
    return saved


def loaded_higher_layers() -> list[str]:
    """Modules of layers above the store that are loaded in this process after importing the store and its CLI."""
    import sys

    import agentsleep.store.cli  # noqa: F401  # the CLI must not pull in engines either

    higher = ("agentsleep.runtime", "agentsleep.serving", "agentsleep.memory", "agentsleep.integrations", "vllm")
    return sorted(m for m in sys.modules if m.startswith(higher))
