"""``python -m evals.episodes``: the long-horizon agent episodes through the LangChain stack; writes the results.

    python -m evals.episodes --checkpoints checkpoints --episodes 30 --math-episodes 60 --name episodes

Every episode runs twice per condition (uninterrupted, and SIGKILLed after a random turn then revived in a fresh
process); the report's scores are the revived runs', and it says how many equal the uninterrupted ones (all must).
Writes ``<results-dir>/<name>.md`` (tables + the command), ``<name>.json`` (every outcome) and one PNG per block.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

from agentsleep.episodes.report import format_table, text_table
from agentsleep.episodes.suite import (
    KINDS,
    block_scores,
    find_checkpoints,
    plan,
    revive_failures,
    run_blocks,
    write_report,
)
from agentsleep.episodes.types import ENGLISH_KINDS

log = logging.getLogger("evals.episodes")
REPO = Path(__file__).resolve().parents[2]
DRIVERS = {
    "langchain": "evals.episodes.langchain_driver:langchain_driver",
    "host": "agentsleep.episodes.drivers:host_driver",
}
DRIVER_LABEL = {
    "langchain": "LangChain: create_agent + SleepMemory + ChatSleepHybrid(TorchEngine) + SqliteSaver + SQLite store",
    "host": "AgentHost: TorchEngine + SQLite SnapshotStore + SleepPolicy + SleepScheduler",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evals.episodes", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=["checkpoints"], help="directories holding task checkpoints")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--episodes", type=int, default=30, help="retrieval episodes per block (4 questions each)")
    p.add_argument("--math-episodes", type=int, default=60, help="math episodes per block (1 question each)")
    p.add_argument("--stateful-episodes", type=int, default=20, help="reasoning-gym episodes")
    p.add_argument("--english-episodes", type=int, default=60, help="episodes per English block (family, gsm_english)")
    p.add_argument("--hidden", type=int, default=None, help="hidden-cycle nodes (default: 5/8 of n_max)")
    p.add_argument("--decoys", type=int, default=None, help="decoy-cycle nodes (default: n_max - hidden)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--driver", choices=sorted(DRIVERS), default="langchain")
    p.add_argument("--spawn", action="store_true", help="fresh interpreters instead of children of a fork server")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--name", default="episodes")
    p.add_argument("--results-dir", default=str(REPO / "evals" / "results"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "episodes" / "work"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one migration notice per store opened: noise here
    t0 = time.perf_counter()
    infos = find_checkpoints(*args.checkpoints)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    blocks = []
    for kind in kinds:
        n = args.episodes if kind.startswith("retrieval") else args.math_episodes
        n = args.stateful_episodes if kind == "stateful_gsm" else n
        n = args.english_episodes if kind in ENGLISH_KINDS else n
        blocks += plan(infos, [kind], n, args.seed, hidden=args.hidden, decoys=args.decoys)

    def progress(block: object, cond: object) -> None:
        log.info("%s | %s", getattr(block, "key", "?"), getattr(cond, "name", "?"))

    run_blocks(
        [b for b in blocks if b.conditions],
        DRIVERS[args.driver],
        Path(args.work_dir),
        seed=args.seed,
        kill=not args.no_kill,
        mode="spawn" if args.spawn else "forkserver",
        progress=progress,
    )
    argv_used = sys.argv[1:] if argv is None else argv
    command = "python -m evals.episodes " + shlex.join(argv_used)
    facts = {
        "driver": DRIVER_LABEL[args.driver],
        "seed": args.seed,
        "episodes per block": ", ".join(f"{b.key} {len(b.episodes)}" for b in blocks),
        "child processes": "spawn (python -m agentsleep.episodes.worker)" if args.spawn else "forkserver",
        "machine": f"{platform.machine()}, {platform.python_version()}, torch 1 thread per process",
        "total wall time": f"{time.perf_counter() - t0:.0f} s",
    }
    report = write_report(
        blocks, Path(args.results_dir), args.name, command=command.strip(), driver=args.driver, facts=facts
    )
    for b in blocks:
        if b.outcomes:
            print(f"\n{b.title}\n{format_table(text_table(block_scores(b)))}")
    print(f"\nwrote {report}")
    bad = revive_failures(blocks)
    if bad:
        log.error("revived runs differ from the uninterrupted ones: %s", bad)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
