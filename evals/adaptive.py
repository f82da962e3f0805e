"""Adaptive sleep depth: accuracy vs the mean number of passes a sleep uses, for any-N models.

Each checkpoint is scored (``agentsleep eval``'s scorer) at every fixed N in ``--fixed-passes`` and with
``passes="auto"`` (`agentsleep.model.adaptive`) for each stopping rule and tolerance; the mean passes are averaged
over every slept window of every held-out example. The goal of issue 17: ≥ 30% fewer passes than N_max at ≤ 1 point
of accuracy lost against the same model slept N_max times::

    python -m evals.adaptive --name rule110_w16_t2_anyN_adaptive --size 1024 --max-passes 8 \\
        --models runs/evals/rule110_w16_t2_anyN_1500/n8-uniform-s{0,1,2} --fixed-passes 2 4 5 8 \\
        --state-tols 0.1 0.07 0.05 0.035 --kl-tols 0.03 0.01 --select-seed 1

``--select-seed S`` also scores every setting on a second held-out set and chooses the tolerance there, so the
reported numbers are not those of the set it was tuned on.

Writes ``<name>.md``, ``<name>.json`` and ``<name>.png`` into ``evals/results/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from evals.anyn import RESULTS, SCORES, cached_score, describe, mean_std
from evals.report import command_line, command_section, write_report

log = logging.getLogger("evals.adaptive")

GOAL_SAVING, GOAL_LOSS = 0.30, 0.01  # issue 17: ≥ 30% fewer passes than N_max at ≤ 1 point of accuracy lost


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = []
    for path in args.models:
        info = describe(path)
        fixed = {n: cached_score(path, n, args.size, args.scores_dir) for n in args.fixed_passes}
        auto = []
        for criterion, tols in (("state", args.state_tols), ("kl", args.kl_tols)):
            for tol in tols:
                s = cached_score(
                    path, "auto", args.size, args.scores_dir, max_passes=args.max_passes, tol=tol, criterion=criterion
                )
                auto.append({"criterion": criterion, "tol": tol, "scores": s})
        entry = {**info, "fixed": {str(n): s for n, s in fixed.items()}, "auto": auto}
        if args.select_seed is not None:  # the same settings on a second held-out set, to choose tol on
            sel = {"seed": args.select_seed, "fixed": cached_score(path, args.max_passes, args.size, args.scores_dir,
                                                                   seed=args.select_seed)}  # fmt: skip
            sel["auto"] = [
                cached_score(path, "auto", args.size, args.scores_dir, seed=args.select_seed,
                             max_passes=args.max_passes, tol=a["tol"], criterion=a["criterion"])
                for a in auto
            ]  # fmt: skip
            entry["select"] = sel
        models.append(entry)
    return {"models": models, "max_passes": args.max_passes, "size": args.size, "select_seed": args.select_seed}


def held_out_choice(data: dict[str, Any], metric: str, criterion: str | None = None) -> dict[str, Any] | None:
    """The auto setting chosen on the selection set (split `test`, seed ``select_seed``): the most passes saved
    among the settings that meet the goal there (ties: less accuracy lost), restricted to ``criterion`` if given;
    with its numbers on that set and on the reported set. None if nothing was scored for selection or nothing met
    the goal there."""
    ms = data["models"]
    if data.get("select_seed") is None or not all("select" in m for m in ms):
        return None
    nmax = data["max_passes"]
    ref_sel = float(np.mean([m["select"]["fixed"][metric] for m in ms]))
    test_rows = {(r["criterion"], r["tol"]): r for r in table_rows(data, metric)}
    best = None
    for i, a in enumerate(ms[0]["auto"]):
        if criterion is not None and a["criterion"] != criterion:
            continue
        acc = float(np.mean([m["select"]["auto"][i][metric] for m in ms]))
        used = float(np.mean([m["select"]["auto"][i]["mean_passes"] for m in ms]))
        saving, loss = 1 - used / nmax, ref_sel - acc
        if (
            saving >= GOAL_SAVING
            and loss <= GOAL_LOSS
            and (best is None or (saving, -loss) > (best["select_saving"], -best["select_loss_pts"]))
        ):
            best = {"criterion": a["criterion"], "tol": a["tol"], "select_acc": acc, "select_saving": saving,
                    "select_loss_pts": loss}  # fmt: skip
    if best is not None:
        best["test"] = test_rows[(best["criterion"], best["tol"])]
    return best


def table_rows(data: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One row per setting: mean/std over models of the metric and of the passes used."""
    ms = data["models"]
    nmax = data["max_passes"]
    ref = float(np.mean([m["fixed"][str(nmax)][metric] for m in ms]))
    rows = []
    for n in ms[0]["fixed"]:
        acc = mean_std([m["fixed"][n][metric] for m in ms])
        rows.append({"setting": f"fixed N = {n}", "criterion": "fixed", "tol": None, "acc": acc,
                     "passes": (float(n), 0.0), "loss_pts": ref - acc[0]})  # fmt: skip
    for i, a in enumerate(ms[0]["auto"]):
        acc = mean_std([m["auto"][i]["scores"][metric] for m in ms])
        used = mean_std([m["auto"][i]["scores"]["mean_passes"] for m in ms])
        rows.append({"setting": f"auto, {a['criterion']} < {a['tol']:g}", "criterion": a["criterion"],
                     "tol": a["tol"], "acc": acc, "passes": used, "loss_pts": ref - acc[0]})  # fmt: skip
    for r in rows:
        r["saving"] = 1 - r["passes"][0] / nmax
        r["goal"] = r["saving"] >= GOAL_SAVING and r["loss_pts"] <= GOAL_LOSS
    return rows


def markdown(args: argparse.Namespace, data: dict[str, Any], command: str) -> str:
    metric, nmax = args.metric, data["max_passes"]
    ms = data["models"]
    rows = table_rows(data, metric)
    names = ", ".join(f"`{Path(m['path']).name}` (seed {m['seed']}, trained N~{m['trained_n']})" for m in ms)
    lines = [
        f"# {args.name}: adaptive sleep depth (stop when S has converged)",
        "",
        f"Models: {names}. "
        f"Task: `{ms[0]['task']}`. Metric: `{metric}` on {args.size} held-out examples (split `test`, seed 0). "
        f"Passes: mean over every slept window of every example; N_max = {nmax}.",
        "",
        *command_section(command),
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on 2 shared CPU cores (one thread).",
        "",
        f"| setting | `{metric}` mean ± std | mean passes | passes saved vs N_max | accuracy lost vs N = {nmax} "
        "(points) | goal (≥ 30% saved, ≤ 1 point lost) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['acc'][0]:.3f} ± {r['acc'][1]:.3f} | {r['passes'][0]:.2f} | {r['saving']:.0%} | "
            f"{100 * r['loss_pts']:+.1f} | {'**met**' if r['goal'] else '—'} |"
        )
    if data.get("select_seed") is not None:
        lines += [
            "",
            "## The tolerance chosen on a separate held-out set",
            "",
            f"Each setting was also scored on {args.size} other held-out examples (split `test`, seed "
            f"{data['select_seed']}); there, the setting with the most passes saved among those meeting the goal is "
            "chosen, and its numbers above (seed 0) are the unbiased ones.",
            "",
            "| rule | chosen setting | on the selection set: saved, points lost | on the reported set: saved, "
            "points lost | goal on the reported set |",
            "|---|---|---|---|---|",
        ]
        for label, crit in (("any criterion", None), ("relative change of S (the default rule)", "state")):
            c = held_out_choice(data, metric, crit)
            if c is None:
                lines.append(f"| {label} | none met the goal on the selection set | — | — | — |")
                continue
            t = c["test"]
            lines.append(
                f"| {label} | {c['criterion']} < {c['tol']:g} | {c['select_saving']:.0%}, "
                f"{100 * c['select_loss_pts']:+.1f} | {t['saving']:.0%}, {100 * t['loss_pts']:+.1f} | "
                f"{'**met**' if t['goal'] else 'missed'} |"
            )
    lines += ["", f"Plot: `{args.name}.png`. Raw numbers (per model): `{args.name}.json`.", ""]
    if args.notes:
        lines += ["## Notes", "", Path(args.notes).read_text().strip(), ""]
    return "\n".join(lines)


def plot(args: argparse.Namespace, data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(data, args.metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fixed = [r for r in rows if r["criterion"] == "fixed"]
    ax.errorbar([r["passes"][0] for r in fixed], [r["acc"][0] for r in fixed], yerr=[r["acc"][1] for r in fixed],
                fmt="s--", color="grey", label="fixed N (the same any-N models)")  # fmt: skip
    for crit, marker, color in (("state", "o-", "C0"), ("kl", "^-", "C3")):
        rs = sorted((r for r in rows if r["criterion"] == crit), key=lambda r: r["passes"][0])
        if not rs:
            continue
        ax.errorbar([r["passes"][0] for r in rs], [r["acc"][0] for r in rs], xerr=[r["passes"][1] for r in rs],
                    yerr=[r["acc"][1] for r in rs], fmt=marker, color=color,
                    label=f"auto: {'relative change of S' if crit == 'state' else 'prediction KL'} < tol")  # fmt: skip
        for r in rs:
            ax.annotate(f"{r['tol']:g}", (r["passes"][0], r["acc"][0]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points", color=color)  # fmt: skip
    nmax = data["max_passes"]
    ax.axvline((1 - GOAL_SAVING) * nmax, color="black", ls=":", lw=0.8, label="30% fewer passes than N_max")
    ax.set_xlabel("mean sleep passes per window")
    ax.set_ylabel(f"held-out {args.metric}")
    ax.set_title(args.name, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.adaptive", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", type=Path, required=True, help="any-N checkpoint directories (seeds)")
    p.add_argument("--max-passes", type=int, default=8)
    p.add_argument("--fixed-passes", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--state-tols", type=float, nargs="*", default=[0.3, 0.1, 0.03, 0.01])
    p.add_argument("--kl-tols", type=float, nargs="*", default=[0.1, 0.01, 0.001])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--metric", default="exact")
    p.add_argument("--name", required=True)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--scores-dir", type=Path, default=SCORES, help="memo of checkpoint scores (git-ignored)")
    p.add_argument(
        "--select-seed",
        type=int,
        default=None,
        help="also score every setting on held-out seed S and choose the tolerance there (reported on seed 0)",
    )
    p.add_argument("--notes", default=None)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.max_passes not in args.fixed_passes:
        args.fixed_passes = [*args.fixed_passes, args.max_passes]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = run(args)
    command = command_line("evals.adaptive", argv)
    data["command"] = command
    write_report(args.results_dir, args.name, data, markdown(args, data, command), lambda png: plot(args, data, png))
    return data


if __name__ == "__main__":
    main()
