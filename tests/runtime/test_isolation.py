"""Isolation under load: 50 agents × 100 turns driven from 8 threads at once; no state crosses agents.

Agents come in twins (a and a + 25 hear the same stream, driven by different threads at different times): twins must
end with equal state hashes and different twins with different ones, and a sample of agents must end exactly where
they end when run alone, one after the other.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from agentsleep.memory import SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.runtime import TorchEngine

from .helpers import make_model, turn_tokens

AGENTS, TURNS, THREADS = 50, 100, 8
TWINS = AGENTS // 2
ALONE = (0, 7, 31, 49)  # agents also run alone, as the reference
L, N = 32, 2


def agent_turn(host: AgentHost, agent: int, t: int) -> tuple[int, ...]:
    stream = agent % TWINS  # twins share a stream; every other pair hears its own
    ids = turn_tokens(stream * 10_000 + t, 1 + (stream + t) % 4)
    reply = 2 if t % 5 == 0 else 0
    return host.turn(f"agent-{agent}", ids, max_new_tokens=reply, temperature=1.0, seed=stream * 1000 + t).tokens


def memory_hash(host: AgentHost, agent: int) -> tuple[str, tuple[int, ...], int]:
    mem = host.engine.export_state(f"agent-{agent}")
    return mem.state.digest(), mem.window, mem.sleep_count


def test_fifty_agents_from_many_threads_never_share_state():
    model = make_model(window=L, passes=N, layout="ag")
    policy = SleepPolicy(window=L, passes=N, soft_threshold=0.75, debounce_seconds=0.0)

    with AgentHost(TorchEngine(model), None, policy, background=False) as alone:
        expected, replies = {}, {}
        for a in ALONE:
            alone.create(f"agent-{a}")
            replies[a] = [agent_turn(alone, a, t) for t in range(TURNS)]
            expected[a] = memory_hash(alone, a)

    with AgentHost(TorchEngine(model), None, policy, background=False, max_workers=2) as crowd:
        for a in range(AGENTS):
            crowd.create(f"agent-{a}")
        got: dict[int, list[tuple[int, ...]]] = {a: [] for a in range(AGENTS)}
        threads_seen: set[str] = set()

        def drive(a: int) -> None:
            threads_seen.add(threading.current_thread().name)
            for t in range(TURNS):
                got[a].append(agent_turn(crowd, a, t))

        order = [a for pair in zip(range(TWINS), range(AGENTS - 1, TWINS - 1, -1)) for a in pair]  # twins far apart
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(drive, order))
        hashes = {a: memory_hash(crowd, a) for a in range(AGENTS)}
        stats = crowd.scheduler.stats()

    assert len(threads_seen) > 1
    assert stats.sync_sleeps > AGENTS and stats.failed == 0
    for a in ALONE:
        assert got[a] == replies[a] and hashes[a] == expected[a]
    for a in range(TWINS):
        assert got[a] == got[a + TWINS] and hashes[a] == hashes[a + TWINS]
    assert len({h[0] for h in hashes.values()}) == TWINS  # and different streams really give different memories
