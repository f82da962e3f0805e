"""Concurrency: 100 agents saved and loaded by several threads and several processes at once.

Three threads share one `SnapshotStore`; two worker processes (forkserver) open their own. Every worker saves one
self-describing state (`helpers.marked_state`) for every agent, so each agent gets one save from every worker at the
same time, and after each save it loads a random agent's current snapshot and checks that it is exactly a state
saved for *that* agent. Afterwards every agent has sequence numbers 1..W (no duplicates, no gaps) and every snapshot
loads to exactly the state its writer saved.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from agentsleep.store import SnapshotStore

from .helpers import MP, agent_name, check_marked, hammer

N_AGENTS = 100
N_THREADS = 3
N_PROCESSES = 2


def test_threads_and_processes_never_mix_up_agents(store_url: str) -> None:
    shared = SnapshotStore(store_url)  # migrates before the workers race; the threads share this one instance
    with MP.Pool(N_PROCESSES) as pool:  # forkserver: fresh processes, no inherited connections
        procs = [pool.apply_async(hammer, (store_url, N_THREADS + p, N_AGENTS, 7)) for p in range(N_PROCESSES)]
        with ThreadPoolExecutor(N_THREADS) as ex:
            threads = [ex.submit(hammer, shared, w, N_AGENTS, 7) for w in range(N_THREADS)]
            results = [f.result(timeout=300) for f in threads]
        results += [r.get(timeout=300) for r in procs]
    shared.close()

    workers = N_THREADS + N_PROCESSES
    saved = [row for res in results for row in res]
    assert len(saved) == workers * N_AGENTS
    by_agent: dict[str, list[int]] = defaultdict(list)
    for agent, seq, _, _ in saved:
        by_agent[agent].append(seq)
    assert set(by_agent) == {agent_name(i) for i in range(N_AGENTS)}
    for agent, seqs in by_agent.items():
        assert sorted(seqs) == list(range(1, workers + 1)), f"{agent}: sequence numbers {sorted(seqs)}"

    with SnapshotStore(store_url) as store:
        for agent, seq, sid, digest in saved:
            got = store.load(sid)
            assert (got.record.agent_id, got.record.seq) == (agent, seq)
            assert got.state.digest() == digest
        for i in range(N_AGENTS):
            latest = store.latest(agent_name(i))
            assert latest.record.seq == workers  # the last committed save is the current one
            check_marked(latest.state, i)
            assert [r.seq for r in store.history(agent_name(i))] == list(range(1, workers + 1))
