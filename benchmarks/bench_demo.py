"""Claim: `agentsleep demo` (what `make demo` runs after set-up) finishes in ≤ 10 minutes on 2 CPU cores, offline.

Runs the demo exactly as a user would — a fresh `agentsleep demo` process with its defaults (retrieval and math
episodes for N=1, the best N and window truncation, each episode SIGKILLed once and revived) — and reports its wall
time against the 600 s budget, plus the CPU the machine had to spare (the 1-minute load average before and after).
With ``--offline`` (the default) the child's HTTP(S) proxies point at a closed local port and the Hugging Face
offline switches are set, so an attempt to reach the network fails loudly instead of succeeding silently.

Tests: tests/episodes/test_demo_cli.py. Run: `.venv/bin/python -m benchmarks.bench_demo [-- demo options]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import banner

BUDGET_S = 600.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench_demo", help="demo output folder (emptied first)")
    p.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("demo_args", nargs="*", help="extra `agentsleep demo` options (after --)")
    args = p.parse_args()
    banner(f"`agentsleep demo` wall time <= {BUDGET_S:.0f} s on 2 cores")
    exe = Path(sys.executable).with_name("agentsleep")
    cmd = [str(exe) if exe.exists() else "agentsleep", "demo", "--out", args.out, "--no-progress", *args.demo_args]
    env = dict(os.environ)
    if args.offline:
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            http_proxy="http://127.0.0.1:9",
            https_proxy="http://127.0.0.1:9",
        )
        env.update(HTTP_PROXY=env["http_proxy"], HTTPS_PROXY=env["https_proxy"], NO_PROXY="")
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"# cpus {os.cpu_count()}, load average before {os.getloadavg()[0]:.2f}")
    print("# running: " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout[-4000:])
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        raise SystemExit(f"demo failed with exit code {proc.returncode}")
    print(f"# load average after {os.getloadavg()[0]:.2f}")
    verdict = "OK" if wall <= BUDGET_S else "OVER BUDGET"
    print(f"demo wall time: {wall:.1f} s (budget {BUDGET_S:.0f} s, {100 * wall / BUDGET_S:.0f}%) -> {verdict}")


if __name__ == "__main__":
    main()
