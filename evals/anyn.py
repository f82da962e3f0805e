"""One model for every sleep depth: exact accuracy vs the N used at inference, for sampled-N ("any-N") models beside
models trained at one fixed N.

Every checkpoint is scored with ``agentsleep eval``'s own scorer (`score_checkpoint`) at each inference N on the
held-out set its training run was scored on (split ``test``, seed 0, ``--size`` examples), and the report names the
command that made it::

    python -m evals.anyn --name rule110_w16_t2_anyN_vs_n --passes 1 2 4 8 --size 4096 \\
        --anyn runs/evals/rule110_w16_t2_anyN/n8-uniform-s{0,1,2} \\
        --fixed checkpoints/rule110-w16-t2-n1 checkpoints/rule110-w16-t2-n2 checkpoints/rule110-w16-t2-n4 \\
        --fixed-results evals/results/rule110_w16_t2_curriculum.json

``--fixed-results`` (a `python -m evals.model` JSON of the fixed-N runs on the same data and eval set) adds the
3-seed mean of each fixed-N variant at its own N: the "best fixed-N model" the any-N goal is measured against.
Writes ``<name>.md``, ``<name>.json`` and ``<name>.png`` into ``evals/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agentsleep.train.eval_cli import read_config, score_checkpoint
from evals.report import command_line, command_section, write_report

log = logging.getLogger("evals.anyn")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "evals" / "results"
SCORES = REPO / "runs" / "evals" / "scores"  # git-ignored memo of checkpoint scores (see `cached_score`)
GOAL_POINTS = 0.02  # issue 17: within 2 points of the best fixed-N model at every N ≥ 2


def describe(path: Path) -> dict[str, Any]:
    """Training facts of a checkpoint: N (or its distribution), seed, task description."""
    from agentsleep.train.eval_cli import checkpoint_task
    from agentsleep.train.trainer import TrainConfig, passes_label

    cfg = read_config(path)
    tc = TrainConfig.model_validate((cfg.get("agentsleep") or {}).get("train_config") or {})
    return {
        "path": str(path),
        "seed": tc.seed,
        "passes": tc.passes,
        "trained_n": passes_label(tc),
        "sampled": tc.sampled_passes,
        "steps": tc.steps,
        "task": checkpoint_task(path, config=cfg).describe(),
    }


def cached_score(
    path: Path, n: int | str, size: int, cache_dir: Path | None = SCORES, *, seed: int = 0, **auto: Any
) -> dict[str, float]:
    """`score_checkpoint` at one N (or "auto") on held-out split `test` with ``seed``, memoised under
    runs/evals/scores/ by the weights' hash and the settings, so re-running a report (or the adaptive sweep) does not
    re-score what it already scored."""
    h = hashlib.sha256((path / "model.safetensors").read_bytes())
    h.update((path / "config.json").read_bytes())
    h.update(json.dumps([n, size, sorted(auto.items())] + ([seed] if seed else [])).encode())
    cache = cache_dir / f"{h.hexdigest()[:24]}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    scores = _trainer_scores(path, n, size) if not auto and seed == 0 else None
    if scores is None:
        log.info("scoring %s at N=%s seed %d %s", path, n, seed, auto or "")
        scores = score_checkpoint(path, [n], size=size, seed=seed, **auto)[n]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(scores))
    return scores


def _trainer_scores(path: Path, n: int | str, size: int) -> dict[str, float] | None:
    """The trainer's own final scores at N, when its held-out set is this one (same size, seed 0): the same
    `evaluate` call on the same weights and batch, so there is nothing to recompute."""
    from agentsleep.train.trainer import TrainConfig

    ev_file, cfg_file = path / "eval.json", path / "train_config.json"
    if not (ev_file.is_file() and cfg_file.is_file()):
        return None
    cfg = TrainConfig.model_validate_json(cfg_file.read_text())
    if cfg.final_eval_size != size or cfg.eval_seed != 0:
        return None
    ev = json.loads(ev_file.read_text())
    if str(n) in ev.get("by_passes", {}):
        return ev["by_passes"][str(n)]
    if n == ev.get("passes"):
        return {k: v for k, v in ev.items() if k not in ("step", "passes", "by_passes")}
    return None


def score_all(paths: list[Path], passes: list[int | str], size: int, cache_dir: Path | None) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        info = describe(p)
        scores = {str(n): cached_score(p, n, size, cache_dir) for n in passes}
        out.append({**info, "scores": scores})
    return out


def group(models: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Checkpoints by training N (the seeds of one recipe), in input order; by N and steps where the steps differ
    (the same recipe trained longer is another row)."""
    by_steps = len({m.get("steps") for m in models}) > 1
    out: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        out.setdefault(m["trained_n"] + (f", {m['steps']} steps" if by_steps else ""), []).append(m)
    return out


def mean_std(vals: list[float]) -> tuple[float, float]:
    a = np.array(vals, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fixed_reference(path: Path | None, metric: str) -> dict[int, dict[str, Any]]:
    """Per fixed N: the mean/std/per-seed of a committed `evals.model` run at its own N (sleep variants only)."""
    if path is None:
        return {}
    data = json.loads(path.read_text())
    out = {}
    for v in data["variants"].values():
        if v["baseline"]:
            continue
        vals = [s["eval"][metric] for s in v["seeds"]]
        out[int(v["passes"])] = {"mean": float(np.mean(vals)), "per_seed": vals, "source": path.name}
    return out


def markdown(args: argparse.Namespace, data: dict[str, Any], command: str) -> str:
    metric, ns = args.metric, [str(n) for n in args.passes]
    anyn, fixed, ref = group(data["anyn"]), group(data["fixed"]), data["fixed_reference"]
    task = (data["anyn"] or data["fixed"])[0]["task"]
    lines = [
        f"# {args.name}: one model for every sleep depth (any-N) vs one model per N",
        "",
        f"Task: `{task}`. Metric: `{metric}` on {args.size} held-out examples (split `test`, seed 0: the set every run "
        "below was scored on at the end of training), teacher-forced argmax.",
        "",
        *command_section(command),
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on 2 shared CPU cores (one thread).",
        "",
        f"## `{metric}` vs inference N (rows: how the model was trained)",
        "",
        "| model | trained N | seeds | " + " | ".join(f"N = {n}" for n in ns) + " |",
        "|---|---|---|" + "---|" * len(ns),
    ]
    for label, ms in [*anyn.items(), *fixed.items()]:
        cells = []
        for n in ns:
            vals = [m["scores"][n][metric] for m in ms]
            mu, sd = mean_std(vals)
            cells.append(f"**{mu:.3f}** ± {sd:.3f}" if len(ms) > 1 else f"{mu:.3f}")
        kind = "any-N" if ms[0]["sampled"] else "fixed N"
        seeds = ", ".join(str(m["seed"]) for m in ms)
        lines.append(f"| {kind} (`{Path(ms[0]['path']).name}`) | {label} | {seeds} | " + " | ".join(cells) + " |")
    if ref:
        lines += [
            "",
            f"Fixed-N models at their own N, 3 seeds (`{next(iter(ref.values()))['source']}`): "
            + "; ".join(
                f"N = {n}: {r['mean']:.3f} ({', '.join(f'{x:.3f}' for x in r['per_seed'])})"
                for n, r in sorted(ref.items())
            )
            + ".",
        ]
    lines += ["", "## The goal (issue 17)", "", *goal_lines(data, args)]
    ks = sorted(
        {k for m in data["anyn"] for k in m["scores"][ns[0]] if k.startswith("exact_k")}, key=lambda k: int(k[7:])
    )
    if ks:
        lines += [
            "",
            "## Per hop count k (mean over seeds)",
            "",
            "| model | N | " + " | ".join(f"k = {k[7:]}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        for label, ms in [*anyn.items(), *fixed.items()]:
            for n in ns:
                cells = [f"{np.mean([m['scores'][n].get(k, math.nan) for m in ms]):.3f}" for k in ks]
                lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Plot: `{args.name}.png`. Raw numbers: `{args.name}.json`.", ""]
    if args.notes:
        lines += ["## Notes", "", Path(args.notes).read_text().strip(), ""]
    return "\n".join(lines)


def goal_lines(data: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Is the any-N model within 2 points of the fixed-N models at every N ≥ 2, and non-decreasing in N?

    Two readings of "the best fixed-N model", both reported: the fixed-N model trained for that N (3-seed mean of
    ``--fixed-results``, where one exists), and the best fixed-N model of all, each at its own N (the strict one)."""
    metric, ns = args.metric, [str(n) for n in args.passes]
    ref = data["fixed_reference"]
    best_n, best = max(((n, r["mean"]) for n, r in ref.items()), key=lambda x: x[1], default=(None, math.nan))
    out = []
    for label, ms in group(data["anyn"]).items():
        means = [float(np.mean([m["scores"][n][metric] for m in ms])) for n in ns]
        mono = all(b >= a - 1e-9 for a, b in itertools.pairwise(means))
        drops = [
            f"N = {ns[i + 1]} ({means[i + 1]:.3f} < {means[i]:.3f})"
            for i in range(len(ns) - 1)
            if means[i + 1] < means[i]
        ]
        seeds = f"{len(ms)} seed" + ("s" if len(ms) != 1 else "")
        out.append(
            f"* `{label}` ({seeds}): non-decreasing in N: **{'yes' if mono else 'no'}**"
            + (f" — drops at {', '.join(drops)}" if drops else "")
            + "."
        )
        for n, mu in zip(ns, means):
            if int(n) < 2:
                continue
            parts = []
            own = ref.get(int(n))
            if own is not None:
                gap = mu - own["mean"]
                parts.append(
                    f"vs the fixed N = {n} model ({own['mean']:.3f}): {gap:+.3f} "
                    f"(**{'met' if gap >= -GOAL_POINTS else 'missed'}**)"
                )
            if best_n is not None:
                gap = mu - best
                parts.append(
                    f"vs the best fixed-N model, N = {best_n} at its own N ({best:.3f}): {gap:+.3f} "
                    f"(**{'met' if gap >= -GOAL_POINTS else 'missed'}**)"
                )
            out.append(f"  * N = {n}: {mu:.3f}; " + "; ".join(parts) + ".")
    return out


def plot(args: argparse.Namespace, data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, ns = args.metric, [str(n) for n in args.passes]
    xs = [int(n) for n in ns]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = [*group(data["anyn"]).items(), *group(data["fixed"]).items()]
    for i, (label, ms) in enumerate(rows):
        c = colors[i % len(colors)]
        vals = np.array([[m["scores"][n][metric] for n in ns] for m in ms])  # [seeds, N]
        sampled = ms[0]["sampled"]
        ax.plot(
            xs,
            vals.mean(0),
            "o-" if sampled else "s--",
            color=c,
            lw=2.2 if sampled else 1.2,
            label=f"{'any-N' if sampled else 'fixed'} N={label} ({len(ms)} seed{'s' * (len(ms) > 1)})",
        )
        if len(ms) > 1:
            for v in vals:
                ax.plot(xs, v, ".", color=c, alpha=0.5)
    ref = sorted(data["fixed_reference"].items())
    if ref:  # the fixed-N recipes at their own N, mean ± std over their seeds
        sd = [np.std(r["per_seed"], ddof=1) for _, r in ref]
        ax.errorbar([n for n, _ in ref], [r["mean"] for _, r in ref], yerr=sd, fmt="kD", ms=6, capsize=3,
                    label="fixed N, at its own N (mean ± std over seeds)", zorder=5)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("sleep passes N at inference")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_ylim(0, 1.02)
    ax.set_title(args.name, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.anyn", description=__doc__.split("\n\n")[0])
    p.add_argument("--anyn", nargs="+", type=Path, default=[], help="sampled-N checkpoint directories (seeds)")
    p.add_argument("--fixed", nargs="*", type=Path, default=[], help="fixed-N checkpoint directories")
    p.add_argument("--fixed-results", type=Path, default=None, help="evals.model JSON of the fixed-N runs")
    p.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--size", type=int, default=4096, help="held-out examples (the runs' final eval size)")
    p.add_argument("--metric", default="exact")
    p.add_argument("--name", required=True)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--scores-dir", type=Path, default=SCORES, help="memo of checkpoint scores (git-ignored)")
    p.add_argument("--notes", default=None, help="a Markdown file appended to the report")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    passes: list[int | str] = list(args.passes)
    data: dict[str, Any] = {
        "anyn": score_all(args.anyn, passes, args.size, args.scores_dir),
        "fixed": score_all(args.fixed, passes, args.size, args.scores_dir),
        "fixed_reference": fixed_reference(args.fixed_results, args.metric),
        "passes": args.passes,
        "size": args.size,
    }
    command = command_line("evals.anyn", argv)
    data["command"] = command
    write_report(args.results_dir, args.name, data, markdown(args, data, command), lambda png: plot(args, data, png))
    return data


if __name__ == "__main__":
    main()
