"""Claim: saving and reviving an agent's memory is cheap — save + load of the toy model's state (2 GDN layers,
2 heads, 64×64 float32 ≈ 64 KiB, plus a 256-token window) has p95 ≤ 20 ms on SQLite (WAL, synchronous=FULL).

Also measures Postgres (psycopg 3) and the ratio Postgres/SQLite, and, with ``--large``, the payload-location decision
(inline blob column vs content-addressed files) for a 16 MiB state. Behaviour is tested in tests/store/test_api.py.

Each iteration is ``store.save(agent, state, window)`` followed by ``store.latest(agent)`` (the revive path: sha256
check, container parse, tensor load), timed separately, on a store opened once. Postgres runs in a scratch schema
that is dropped afterwards.

    python benchmarks/bench_store.py                       # SQLite + Postgres (if reachable), toy state
    python benchmarks/bench_store.py --large --n 100       # + 16 MiB states, inline vs files
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy import create_engine, make_url, text

from agentsleep.model.state import FastWeights
from agentsleep.store import SnapshotStore

DEFAULT_PG = "postgresql+psycopg://agentsleep:agentsleep@127.0.0.1:5432/agentsleep"


@dataclass
class Result:
    backend: str
    payload: str
    storage: str
    save_ms: list[float]
    load_ms: list[float]
    cpu_ms: list[float]  # this process's CPU time per save+load: what the store costs apart from waiting on I/O

    @property
    def both_ms(self) -> list[float]:
        return [a + b for a, b in zip(self.save_ms, self.load_ms)]


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def make_state(layers: int, heads: int, dim: int, seed: int) -> FastWeights:
    g = torch.Generator().manual_seed(seed)
    return FastWeights(ssm=[torch.randn(1, heads, dim, dim, generator=g) for _ in range(layers)], fingerprint="bench")


def run(store: SnapshotStore, *, label: str, payload: str, storage: str, shape: tuple[int, int, int], n: int) -> Result:
    layers, heads, dim = shape
    window = list(range(256))
    states = [make_state(layers, heads, dim, seed) for seed in range(8)]  # rotate so nothing is cached by content
    agent = f"bench-{uuid.uuid4().hex[:8]}"
    save_ms: list[float] = []
    load_ms: list[float] = []
    cpu_ms: list[float] = []
    warmup = max(3, n // 10)
    for i in range(n + warmup):
        st = states[i % len(states)]
        c0, t0 = time.process_time(), time.perf_counter()
        store.save(agent, st, window)
        t1 = time.perf_counter()
        got = store.latest(agent)
        t2, c2 = time.perf_counter(), time.process_time()
        if got.window != window:
            raise SystemExit("benchmark sanity check failed: wrong window loaded")
        if i >= warmup:
            save_ms.append((t1 - t0) * 1e3)
            load_ms.append((t2 - t1) * 1e3)
            cpu_ms.append((c2 - c0) * 1e3)
    store.delete_agent(agent)
    return Result(label, payload, storage, save_ms, load_ms, cpu_ms)


def pg_scratch(url: str) -> tuple[str, str] | None:
    """Create a scratch schema; return (URL using it, schema name), or None if the server is unreachable."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        eng = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        eng.dispose()
    except Exception as e:  # any connection problem: report and carry on with SQLite only
        print(f"# Postgres unreachable at {make_url(url).render_as_string()}: {str(e).splitlines()[0]}")
        return None
    scoped = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return scoped.render_as_string(hide_password=False), schema


def drop_schema(url: str, schema: str) -> None:
    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    eng.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="timed iterations per configuration (default 300)")
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get("AGENTSLEEP_TEST_POSTGRES_URL", DEFAULT_PG),
        help="Postgres server (a scratch schema is created and dropped); default $AGENTSLEEP_TEST_POSTGRES_URL or "
        "the URL scripts/postgres.sh prints",
    )
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    ap.add_argument("--large", action="store_true", help="also 16 MiB states, inline blob vs content-addressed files")
    ap.add_argument("--dir", default=None, help="where the SQLite file and blob dir go (default: a temp dir)")
    args = ap.parse_args()

    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    print("# command:", shlex.join([sys.executable, *sys.argv]))
    # other jobs on a shared machine move fsync-bound timings a lot; report how busy it was
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load}, n={args.n}")

    toy = (2, 2, 64)  # ≈ 64 KiB
    large = (16, 16, 128)  # 16 layers × 16 heads × 128×128 float32 = 16 MiB, a ~1B-parameter hybrid's state
    results: list[Result] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmpd = Path(tmp)
        for sync in ("FULL", "NORMAL"):
            with SnapshotStore(f"sqlite:///{tmpd / f'bench-{sync}.db'}", sqlite_synchronous=sync) as s:
                results.append(
                    run(s, label=f"sqlite ({sync})", payload="toy 64 KiB", storage="inline", shape=toy, n=args.n)
                )
        if args.large:
            n_large = max(10, args.n // 5)
            with SnapshotStore(f"sqlite:///{tmpd / 'bench-large.db'}") as s:
                results.append(
                    run(s, label="sqlite (FULL)", payload="16 MiB", storage="inline", shape=large, n=n_large)
                )
            with SnapshotStore(f"sqlite:///{tmpd / 'bench-files.db'}", blob_dir=str(tmpd / "blobs")) as s:
                results.append(run(s, label="sqlite (FULL)", payload="16 MiB", storage="file", shape=large, n=n_large))
                results.append(
                    run(
                        s,
                        label="sqlite (FULL)",
                        payload="toy 64 KiB",
                        storage="inline (blob_dir set)",
                        shape=toy,
                        n=args.n,
                    )
                )
        pg = None if args.no_postgres else pg_scratch(args.postgres_url)
        if pg is not None:
            url, schema = pg
            try:
                with SnapshotStore(url) as s:
                    results.append(
                        run(s, label="postgres", payload="toy 64 KiB", storage="inline", shape=toy, n=args.n)
                    )
                if args.large:
                    with SnapshotStore(url) as s:
                        results.append(
                            run(
                                s,
                                label="postgres",
                                payload="16 MiB",
                                storage="inline",
                                shape=large,
                                n=max(10, args.n // 5),
                            )
                        )
                    with SnapshotStore(url, blob_dir=str(tmpd / "pg-blobs")) as s:
                        results.append(
                            run(
                                s,
                                label="postgres",
                                payload="16 MiB",
                                storage="file",
                                shape=large,
                                n=max(10, args.n // 5),
                            )
                        )
            finally:
                drop_schema(args.postgres_url, schema)

    cols = ["backend", "payload", "storage", "n", "save p50", "save p95", "load p50", "load p95"]
    print("| " + " | ".join([*cols, "save+load p50", "save+load p95", "CPU p50"]) + " |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [pct(x, q) for x in (r.save_ms, r.load_ms, r.both_ms) for q in (50, 95)] + [pct(r.cpu_ms, 50)]
        print(
            f"| {r.backend} | {r.payload} | {r.storage} | {len(r.save_ms)} | "
            + " | ".join(f"{c:.2f} ms" for c in cells)
            + " |"
        )
    base = next(r for r in results if r.backend == "sqlite (FULL)" and r.payload.startswith("toy"))
    pg_toy = next((r for r in results if r.backend == "postgres" and r.payload.startswith("toy")), None)
    print(f"# load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    p95 = pct(base.both_ms, 95)
    print(f"# claim: SQLite (FULL) toy save+load p95 = {p95:.2f} ms ({'meets' if p95 <= 20 else 'MISSES'} ≤ 20 ms)")
    if pg_toy is not None:
        print(
            "# ratio Postgres/SQLite (toy, save+load): "
            f"p50 {pct(pg_toy.both_ms, 50) / pct(base.both_ms, 50):.2f}×, "
            f"p95 {pct(pg_toy.both_ms, 95) / pct(base.both_ms, 95):.2f}×"
        )


if __name__ == "__main__":
    main()
