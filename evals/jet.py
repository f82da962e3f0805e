"""GDN vs Jet memory layers at N = 1, 2, 4: the comparison the paper never ran (paper.md §8: "no ablation of the
fast-weight update rule"), at toy scale.

Trains (or loads) one model per (memory kind, N, seed) with `evals.model`'s machinery — the same recipe, seeds and data
order for both kinds; only the memory block's letter in ``layout`` differs (``ag`` vs ``aj``) — and writes
``<name>.md``, ``<name>.json`` and ``<name>.png`` into ``evals/results/``.

    python -m evals.jet --name depo_micro_jet --steps 5000 --jobs 2 -- --task depo --preset micro \\
        --curriculum '0:K=1;300:' --batch-size 32 --eval-every 250 --eval-size 256 --final-eval-size 2000

Arguments after ``--`` go to every `evals.model` run (task, recipe); ``--passes``, ``--seeds`` and ``--steps`` are
this script's own. Runs live in ``runs/evals/<name>_<kind>/`` (git-ignored); finished runs are loaded, not retrained.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from evals import model as harness
from evals.report import RERUN, command_line, command_section, write_report

log = logging.getLogger("evals.jet")

KINDS = {"g": "GDN", "j": "Jet (dynamic conv)"}


def kind_args(kind: str, args: argparse.Namespace, rest: list[str]) -> argparse.Namespace:
    """The `evals.model` arguments of one memory kind, post-processed as `evals.model.main` does."""
    argv = [
        *rest,
        "--model",
        f"layout=a{kind}",
        "--passes",
        *map(str, args.passes),
        "--seeds",
        *map(str, args.seeds),
        "--steps",
        str(args.steps),
        "--name",
        f"{args.name}_{kind}",
    ]
    a = harness.parser().parse_args(argv)
    a.task_set = harness.parse_overrides(a.task_set)
    a.model_set = harness.parse_overrides(a.model_set)
    a.curriculum_text = a.curriculum
    a.curriculum = harness.parse_curriculum(a.curriculum)
    a.baseline_curriculum = None
    a.lr_scale = harness._pairs(a.lr_scale)
    a.baseline_seeds = a.seeds[:1]
    return a


def report(args: argparse.Namespace, per_kind: dict[str, dict[str, Any]], command: str, first: argparse.Namespace):
    """Markdown with one row per (kind, N) and per-k exact match."""
    task = harness.make_task(harness.TrainConfig(task=first.task, preset=first.preset, task_overrides=first.task_set))
    any_eval = next(iter(next(iter(per_kind.values()))["variants"].values()))["seeds"][0]["eval"]
    ks = sorted(harness._k_metrics(any_eval, "exact_k"))
    lines = [
        f"# {args.name}: GDN vs Jet memory layers, N = {', '.join(map(str, args.passes))}",
        "",
        f"Task: `{task.describe()}`. Metric: `exact` on {first.final_eval_size} held-out examples (split `test`, seed "
        "0), teacher-forced argmax. Model: `a` + one memory block (`g` GDN or `j` Jet), d = 64; everything else equal.",
        "",
        *command_section(command, RERUN),
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()} ({os.cpu_count()} "
        f"CPUs, shared with other jobs; one thread per run, nice 10). Training: {args.steps} steps x batch "
        f"{first.batch_size}" + (f", curriculum `{first.curriculum_text}`" if first.curriculum else "") + ".",
        "",
        "| memory | N | params | `exact` mean ± std | per seed | "
        + " | ".join(f"k={k}" for k in ks)
        + " | train wall (s) |",
        "|---|---|---|---|---|" + "---|" * len(ks) + "---|",
    ]
    for kind, data in per_kind.items():
        for v in data["variants"].values():
            s = v["seeds"]
            per = ", ".join(f"{p['eval']['exact']:.3f}" for p in s)
            cells = [f"{np.mean([p['eval'].get(f'exact_k{k}', math.nan) for p in s]):.3f}" for k in ks]
            wall = float(np.mean([p["wall"] for p in s]))
            lines.append(
                f"| {KINDS[kind]} | {v['passes']} | {s[0]['params']:,} | **{v['mean']:.3f}** ± {v['std']:.3f} | "
                f"{per} | " + " | ".join(cells) + f" | {wall:.0f} |"
            )
    lines += ["", f"Plot: `{args.name}.png`. Raw numbers: `{args.name}.json`.", ""]
    if args.notes:
        lines += ["## Notes", "", Path(args.notes).read_text().strip(), ""]
    return "\n".join(lines)


def plot(args: argparse.Namespace, per_kind: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {n: c for n, c in zip(args.passes, plt.rcParams["axes.prop_cycle"].by_key()["color"])}
    styles = {"g": "-", "j": "--"}
    for kind, data in per_kind.items():
        for v in data["variants"].values():
            c, ls, label = colors[v["passes"]], styles[kind], f"{KINDS[kind]}, N={v['passes']}"
            curves = [np.array(p["curve"]) for p in v["seeds"] if p["curve"]]
            if curves:
                n = min(len(cv) for cv in curves)
                ax1.plot(curves[0][:n, 0], np.mean([cv[:n, 2] for cv in curves], 0), color=c, ls=ls, lw=2, label=label)
            first = v["seeds"][0]["eval"]
            ks = sorted(harness._k_metrics(first, "exact_k"))
            ys = [np.mean([p["eval"].get(f"exact_k{k}", math.nan) for p in v["seeds"]]) for k in ks]
            ax2.plot(ks, ys, "o" + ls, color=c, label=label)
    ax1.set_xlabel("training step (equal tokens across variants)")
    ax1.set_ylabel("held-out exact (mean over seeds)")
    ax1.set_title("accuracy vs training step")
    ax1.legend(fontsize=7)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("hop count k")
    ax2.set_ylabel("held-out exact (mean over seeds)")
    ax2.set_title("final accuracy vs hop count k")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{args.name}: solid GDN, dashed Jet")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=["g", "j"], choices=sorted(KINDS))
    p.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--name", required=True)
    p.add_argument("--notes", default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    per_args = {k: kind_args(k, args, rest) for k in args.kinds}
    runs = {k: harness.plan(a) for k, a in per_args.items()}
    if not args.report_only:  # one queue for both kinds: the longest runs (N = 4) of either kind first
        harness.execute([r for rs in runs.values() for r in rs], args.jobs)
    missing = [r.out for rs in runs.values() for r in rs if not r.done]
    if missing:
        raise SystemExit(f"{len(missing)} runs are not finished, e.g. {missing[0]}; run without --report-only")
    per_kind = {k: harness.collect(rs, "exact") for k, rs in runs.items()}
    shown = [a for a in argv if a != "--report-only"]
    command = command_line("evals.jet", shown)
    results = next(iter(per_args.values())).results_dir  # --results-dir after "--" (default evals/results)
    md = report(args, per_kind, command, next(iter(per_args.values())))
    write_report(results, args.name, {"command": command, "kinds": per_kind}, md, lambda png: plot(args, per_kind, png))
    return per_kind


if __name__ == "__main__":
    main()
