"""Model-level harness: does sleep (N > 1) beat the plain hybrid (N = 1) at equal training tokens?

Trains (or loads) one model per N and seed with the *same* seed and data order, plus baselines the paper never ran,
scores each on a fixed held-out set, and writes ``<name>.md`` (tables, the command that made them), ``<name>.json``
(every number) and ``<name>.png`` (accuracy vs training step per variant; final accuracy vs difficulty: Depo's k, or
the setting of this report) into ``evals/results/``.

    python -m evals.model --task rule110 --set W=16 --set t=4 --passes 1 2 4 --seeds 0 1 2 --steps 3000 \\
        --baselines --name rule110_w16_t4

Variants:

* ``sleep N=n``: the hybrid trained and scored with n passes per label-free window (Algorithm 1).
* ``full attention, whole cache`` (upper bound): attention-only blocks, one window holding the whole sequence.
* ``full attention, hard eviction``: attention-only blocks under the task's window; nothing crosses a window, so it
  should sit at chance (the paper argues this, never measures it).
* ``hybrid 2x depth, N=1``: the layout repeated twice, one pass — as deep as N=2 at wake time, to tell sleep apart from
  mere extra depth.

Runs go to ``runs/evals/<name>/`` (checkpoint directories; git-ignored); a finished run is loaded, not retrained, so
re-running the command rebuilds the report. Every run is deterministic given its seed (CPU, one thread), so re-running
from scratch reproduces the table except for wall times.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agentsleep.train.cli import parse_curriculum, parse_overrides
from agentsleep.train.trainer import TrainConfig, load_log, make_task, passes_label
from evals.report import RERUN, command_line, command_section, write_report

log = logging.getLogger("evals.model")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "evals" / "results"
RUNS = REPO / "runs" / "evals"
BASELINES = ("attn_full", "attn_evict", "hybrid_2x")


@dataclass
class Variant:
    """One row of the comparison: a name, the pass count, and TrainConfig overrides."""

    key: str  # directory-safe id
    label: str
    passes: int
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False


@dataclass
class Run:
    variant: Variant
    seed: int
    cfg: TrainConfig
    out: Path
    warm_from: Run | None = None  # a shared N=1 run this one continues from

    @property
    def done(self) -> bool:
        return (self.out / "eval.json").is_file() and _same_config(self.out, self.cfg)


def _same_config(out: Path, cfg: TrainConfig) -> bool:
    p = out / "train_config.json"  # fields added since a run finished take their defaults
    return p.is_file() and TrainConfig.model_validate_json(p.read_text()).model_dump() == cfg.model_dump()


# ---------------------------------------------------------------------------------------------------- planning


def variants(args: argparse.Namespace, base_layout: str) -> list[Variant]:
    out = []
    for n in args.passes:
        scale = args.lr_scale.get(n, 1.0)
        ov: dict[str, Any] = {"lr_muon": args.lr_muon * scale, "lr_adamw": args.lr_adamw * scale}
        if args.eval_passes:
            ov["eval_passes"] = args.eval_passes
        if args.passes_dist != "fixed" and n > args.passes_min:  # sampled N: n is N_max
            ov.update(
                passes_dist=args.passes_dist,
                passes_min=args.passes_min,
                passes_mean=args.passes_mean,
                passes_per=args.passes_per,
            )
            label = passes_label(TrainConfig(passes=n, **{k: v for k, v in ov.items() if k.startswith("passes_")}))
            out.append(Variant(f"n{n}-{args.passes_dist}", f"sleep N~{label}", n, ov))
            continue
        out.append(Variant(f"n{n}", f"sleep N={n}", n, ov))
    if args.baselines is not None:
        task = make_task(TrainConfig(task=args.task, preset=args.preset, task_overrides=args.task_set))
        attn = "a" * len(base_layout)
        lr = {"lr_muon": args.lr_muon, "lr_adamw": args.lr_adamw}
        if (
            args.baseline_curriculum is not None
        ):  # e.g. a longer k = 1 stage: a stronger upper bound, said in the report
            lr["curriculum"] = args.baseline_curriculum
        base = [
            Variant(
                "attn_full",
                "full attention, whole cache (upper bound)",
                1,
                {**lr, "model": {"layout": attn, "window": task.seq_len}},
                True,
            ),
            Variant("attn_evict", "full attention, hard eviction", 1, {**lr, "model": {"layout": attn}}, True),
            Variant("hybrid_2x", "hybrid 2x depth, N=1", 1, {**lr, "model": {"layout": base_layout * 2}}, True),
        ]
        kinds = args.baselines or args.baseline_kinds  # `--baselines NAME ...` or `--baseline-kinds NAME ...`
        out += [v for v in base if v.key in kinds]
    return out


def plan(args: argparse.Namespace) -> list[Run]:
    base = dict(
        task=args.task,
        preset=args.preset,
        task_overrides=args.task_set,
        model=args.model_set,
        steps=args.steps,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        warmup=args.warmup,
        clip=args.clip or None,
        curriculum=args.curriculum,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        final_eval_size=args.final_eval_size,
        save_every=args.save_every,
        compile=args.compile,
    )
    base_layout = args.model_set.get("layout", "agag")
    runs_dir = args.runs_dir / args.name
    runs: list[Run] = []
    warm_runs: dict[int, Run] = {}  # one shared warm start per seed
    for v in variants(args, base_layout):
        seeds = args.baseline_seeds if v.baseline else args.seeds
        for seed in seeds:
            fields = {**base, **v.overrides, "passes": v.passes, "seed": seed}
            fields["model"] = {**args.model_set, **v.overrides.get("model", {})}
            warm = None
            if args.warm_start and not v.baseline:
                # Shared start: the N=1 model after `warm_start` steps of the same data stream; every N continues it.
                wfields = {
                    **fields,
                    "passes": 1,
                    "steps": args.warm_start,
                    "lr_muon": args.lr_muon,
                    "lr_adamw": args.lr_adamw,
                }
                wout = runs_dir / f"warm-s{seed}"
                warm = warm_runs.setdefault(
                    seed, Run(Variant("warm", "shared N=1 warm start", 1), seed, TrainConfig(**wfields), wout)
                )
                fields.update(init_from=str(wout), start_step=args.warm_start, init_optimizer=True)
            runs.append(Run(v, seed, TrainConfig(**fields), runs_dir / f"{v.key}-s{seed}", warm))
    return runs


# ---------------------------------------------------------------------------------------------------- running


def launch(run: Run) -> subprocess.Popen:
    run.out.mkdir(parents=True, exist_ok=True)
    cfg_file = run.out / "requested_config.json"
    cfg_file.write_text(run.cfg.model_dump_json(indent=2) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "agentsleep.cli",
        "train",
        "--config",
        str(cfg_file),
        "--out",
        str(run.out),
        "--no-progress",
    ]
    log.info("start %s seed %d -> %s", run.variant.label, run.seed, run.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=(run.out / "train.out").open("w"), stderr=subprocess.STDOUT, env=env)


def execute(runs: list[Run], jobs: int) -> None:
    """Run what is not done yet, ``jobs`` processes at a time (one thread each); warm-start sources go first."""
    warm = {r.warm_from.out: r.warm_from for r in runs if r.warm_from is not None}
    stages = [list(warm.values()), runs]
    for stage in stages:
        todo = [r for r in stage if r is not None and not r.done]
        todo.sort(key=lambda r: -r.cfg.passes * len(r.cfg.model.get("layout", "agag")))  # longest first
        active: list[tuple[Run, subprocess.Popen]] = []
        while todo or active:
            while todo and len(active) < jobs:
                r = todo.pop(0)
                active.append((r, launch(r)))
            time.sleep(2)
            for r, p in list(active):
                if p.poll() is not None:
                    active.remove((r, p))
                    if p.returncode != 0:
                        raise SystemExit(f"training failed ({p.returncode}); see {r.out / 'train.out'}")
                    log.info("done %s seed %d", r.variant.label, r.seed)


# ---------------------------------------------------------------------------------------------------- reporting


def _curve(rows: list[dict[str, Any]], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, wall seconds, metric) of the eval rows of a run log (later rows win on repeated steps)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in rows:
        if "eval" in r and metric in r["eval"]:
            by_step[r["step"]] = r
    steps = sorted(by_step)
    return (
        np.array(steps),
        np.array([by_step[s]["wall"] for s in steps], dtype=float),
        np.array([by_step[s]["eval"][metric] for s in steps], dtype=float),
    )


def at_wall(rows: list[dict[str, Any]], metric: str, budget: float) -> float:
    """The metric at the last eval the run reached within ``budget`` seconds of training (equal wall time)."""
    _, wall, val = _curve(rows, metric)
    ok = wall <= budget * 1.0001
    return float(val[ok][-1]) if ok.any() else math.nan


def collect(runs: list[Run], metric: str) -> dict[str, Any]:
    """Every number of the report, per variant (mean / std / per seed)."""
    out: dict[str, Any] = {"variants": {}}
    n1_wall = {
        r.seed: json.loads((r.out / "resume" / "trainer_state.json").read_text())["wall"]
        for r in runs
        if r.variant.key == "n1"
    }
    for v in {r.variant.key: r.variant for r in runs}.values():
        vr = [r for r in runs if r.variant.key == v.key]
        per_seed = []
        for r in vr:
            ev = json.loads((r.out / "eval.json").read_text())
            st = json.loads((r.out / "resume" / "trainer_state.json").read_text())
            rows = load_log(r.out)
            cfgj = json.loads((r.out / "config.json").read_text())
            n_params = _param_count(r.out)
            per_seed.append(
                {
                    "seed": r.seed,
                    "eval": ev,
                    "tokens": st["tokens"],
                    "wall": st["wall"],
                    "params": n_params,
                    "layout": cfgj["layout"],
                    "window": cfgj["window"],
                    "at_n1_wall": at_wall(rows, metric, n1_wall[r.seed]) if r.seed in n1_wall else math.nan,
                    "curve": [[int(s), float(w), float(x)] for s, w, x in zip(*_curve(rows, metric))],
                }
            )
        vals = np.array([p["eval"][metric] for p in per_seed])
        out["variants"][v.key] = {
            "label": v.label,
            "passes": v.passes,
            "baseline": v.baseline,
            "seeds": per_seed,
            "mean": float(vals.mean()),
            "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        }
    return out


def _param_count(out: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()))


def _fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _k_metrics(ev: dict[str, float], prefix: str) -> dict[int, float]:
    return {int(k[len(prefix) :]): v for k, v in ev.items() if k.startswith(prefix) and k[len(prefix) :].isdigit()}


def markdown(args: argparse.Namespace, data: dict[str, Any], command: str) -> str:
    metric = args.metric
    task = make_task(TrainConfig(task=args.task, preset=args.preset, task_overrides=args.task_set))
    first = next(iter(data["variants"].values()))["seeds"][0]["eval"]
    lines = [
        f"# {args.name}: sleep passes vs the plain hybrid",
        "",
        f"Task: `{task.describe()}`. Metric: `{metric}` on {args.final_eval_size} held-out examples (split `test`, "
        f"seed 0), teacher-forced argmax (equal to greedy exact match, paper.md A25).",
        "",
        *command_section(command, RERUN),
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()} "
        f"({os.cpu_count()} CPUs, shared; one thread per run). Training: {args.steps} steps x batch {args.batch_size}"
        + (f", curriculum `{args.curriculum_text}`" if args.curriculum else "")
        + (f", N>1 warm-started from the shared N=1 model at step {args.warm_start}" if args.warm_start else "")
        + (f"; baselines: curriculum `{args.baseline_curriculum_text}`" if args.baseline_curriculum is not None else "")
        + ".",
        "",
        "## Equal training tokens (the paper's comparison), with equal wall time beside it",
        "",
        f"| variant | layout | window | params | `{metric}` mean ± std | per seed | per-label | tokens | "
        f"train wall (s) | tokens/s | `{metric}` at N=1's wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in data["variants"].values():
        s = v["seeds"]
        per = ", ".join(f"{p['eval'][metric]:.3f}" for p in s)
        pl = np.mean([p["eval"].get("per_label", math.nan) for p in s])
        tokens = int(np.mean([p["tokens"] for p in s]))
        wall = float(np.mean([p["wall"] for p in s]))
        atw = np.nanmean([p["at_n1_wall"] for p in s]) if any(not math.isnan(p["at_n1_wall"]) for p in s) else math.nan
        lines.append(
            f"| {v['label']} | `{s[0]['layout']}` | {s[0]['window']} | {s[0]['params']:,} | "
            f"**{v['mean']:.3f}** ± {v['std']:.3f} | {per} | {_fmt(float(pl))} | {tokens:,} | {wall:.0f} | "
            f"{tokens / max(wall, 1e-9):.0f} | {_fmt(float(atw))} |"
        )
    if "uniform_exact" in first:
        lines += [
            "",
            f"Chance on this eval set: uniform guessing exact = {first['uniform_exact']:.4f}; always predicting the "
            f"majority bit: exact = {first['majority_exact']:.4f}, per-label = {first['majority_label']:.4f} "
            f"(labels are imbalanced, P(1) = {first['label_p1']:.3f}).",
        ]
    ks = sorted(_k_metrics(first, "exact_k"))
    if ks:
        lines += [
            "",
            "## Per hop count k (exact match of the whole answer; answer-token CE in brackets where logged)",
            "",
            "| variant | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for v in data["variants"].values():
            cells = []
            for k in ks:
                ex = np.mean([p["eval"].get(f"exact_k{k}", math.nan) for p in v["seeds"]])
                ce = np.mean([p["eval"].get(f"ce_k{k}", math.nan) for p in v["seeds"]])
                cells.append(f"{ex:.3f}" if math.isnan(ce) else f"{ex:.3f} ({ce:.2f})")
            lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"Plot: `{args.name}.png`. Raw numbers: `{args.name}.json`.", ""]
    if args.notes:
        lines += ["## Notes", "", Path(args.notes).read_text().strip(), ""]
    return "\n".join(lines)


def plot(args: argparse.Namespace, data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = args.metric
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(data["variants"].values()):
        c = colors[i % len(colors)]
        curves = [np.array(p["curve"]) for p in v["seeds"] if p["curve"]]
        for cv in curves:
            ax1.plot(cv[:, 0], cv[:, 2], color=c, alpha=0.25, lw=0.8)
        if curves:
            n = min(len(cv) for cv in curves)
            mean = np.mean([cv[:n, 2] for cv in curves], axis=0)
            ax1.plot(curves[0][:n, 0], mean, color=c, lw=2, label=f"{v['label']} ({len(curves)} seeds)")
    for i, (start, ov) in enumerate(args.curriculum):
        if start > 0:
            ax1.axvline(start, color="black", ls="-.", lw=0.8, label="curriculum stage" if i <= 1 else None)
            ax1.text(
                start,
                0.12,
                " → " + (",".join(f"{k}={v}" for k, v in ov.items()) or "target task"),
                fontsize=7,
                va="bottom",
                transform=ax1.get_xaxis_transform(),
            )
    first = next(iter(data["variants"].values()))["seeds"][0]["eval"]
    for key, style in (("majority_exact", ":"), ("uniform_exact", "--")):
        if metric == "exact" and key in first:
            ax1.axhline(first[key], color="grey", ls=style, lw=1, label=key.replace("_", " "))
    ax1.set_xlabel(f"training step (x {args.batch_size} sequences; equal tokens across variants)")
    ax1.set_ylabel(f"held-out {metric}")
    ax1.set_title("accuracy on the target task vs training step")
    ax1.legend(fontsize=7, loc="center left")
    ks = sorted(_k_metrics(first, "exact_k"))
    if ks:  # Depo: accuracy vs hop count k per variant
        for i, v in enumerate(data["variants"].values()):
            ys = [np.mean([p["eval"].get(f"exact_k{k}", math.nan) for p in v["seeds"]]) for k in ks]
            ax2.plot(ks, ys, "o-", color=colors[i % len(colors)], label=v["label"])
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("hop count k")
        ax2.set_title("accuracy vs difficulty k (final)")
    else:  # one difficulty setting per report: final accuracy per variant, seeds as dots
        labels = list(data["variants"].values())
        for i, v in enumerate(labels):
            ys = [p["eval"][metric] for p in v["seeds"]]
            ax2.bar(i, np.mean(ys), color=colors[i % len(colors)], alpha=0.6)
            ax2.plot([i] * len(ys), ys, "k.", ms=5)
        names = [v["label"].replace(", ", "\n").replace(" (", "\n(") for v in labels]
        ax2.set_xticks(range(len(labels)), names, fontsize=6.5)
        ax2.set_title(f"final {metric} at {args.difficulty_label} (dots: seeds)")
    ax2.set_ylabel(f"held-out {metric}")
    ax2.legend(fontsize=7) if ks else None
    fig.suptitle(args.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- entry point


def _pairs(items: list[str]) -> dict[int, float]:
    out = {}
    for it in items:
        n, _, f = it.partition("=")
        out[int(n)] = float(f)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.model", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="rule110")
    p.add_argument("--preset", default="toy")
    p.add_argument("--set", dest="task_set", action="append", default=[], help="task knob KEY=VALUE")
    p.add_argument("--model", dest="model_set", action="append", default=[], help="HybridConfig KEY=VALUE")
    p.add_argument("--passes", type=int, nargs="*", default=[1, 2, 4], help="sleep variants (none: baselines only)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=list(BASELINES),
        default=None,
        help="add the baselines (see module docstring): all three when none is named",
    )
    p.add_argument("--baseline-seeds", type=int, nargs="+", default=None, help="default: the first seed")
    p.add_argument(
        "--baseline-kinds",
        nargs="+",
        default=["attn_full", "attn_evict", "hybrid_2x"],
        choices=["attn_full", "attn_evict", "hybrid_2x"],
        help="which baselines --baselines adds",
    )
    p.add_argument(
        "--baseline-curriculum", default=None, help="the baselines' own curriculum (default: the sleep variants')"
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    p.add_argument("--lr-muon", type=float, default=2e-3)
    p.add_argument("--lr-adamw", type=float, default=2e-3)
    p.add_argument("--lr-scale", nargs="*", default=[], help="per-N LR multipliers, e.g. 4=0.5")
    p.add_argument(
        "--passes-dist",
        default="fixed",
        choices=["fixed", "uniform", "log_uniform", "lognormal_poisson"],
        help="sampled-N training: every --passes value is N_max of a draw over passes-min..N_max",
    )
    p.add_argument("--passes-min", type=int, default=1)
    p.add_argument("--passes-mean", type=float, default=None, help="lognormal_poisson: mean N")
    p.add_argument("--passes-per", default="window", choices=["window", "step"])
    p.add_argument("--eval-passes", type=int, nargs="*", default=[], help="also score sleep variants at these N")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--curriculum", default=None, help='e.g. "0:t=1;300:t=2;600:" (identical for every variant)')
    p.add_argument("--warm-start", type=int, default=0, help="N>1 start from the shared N=1 model at this step")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-size", type=int, default=1024)
    p.add_argument("--final-eval-size", type=int, default=4096)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--metric", default="exact")
    p.add_argument("--jobs", type=int, default=2, help="training processes side by side (one thread each)")
    p.add_argument("--name", required=True, help="results file stem under evals/results/")
    p.add_argument("--runs-dir", type=Path, default=RUNS)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--notes", default=None, help="a Markdown file appended to the report")
    p.add_argument("--report-only", action="store_true", help="do not train; report the finished runs")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.task_set = parse_overrides(args.task_set)
    args.model_set = parse_overrides(args.model_set)
    args.curriculum_text = args.curriculum
    args.curriculum = parse_curriculum(args.curriculum)
    args.baseline_curriculum_text = args.baseline_curriculum
    if args.baseline_curriculum is not None:
        args.baseline_curriculum = parse_curriculum(args.baseline_curriculum)
    args.lr_scale = _pairs(args.lr_scale)
    args.baseline_seeds = args.baseline_seeds or args.seeds[:1]
    args.difficulty_label = ", ".join(f"{k}={v}" for k, v in args.task_set.items()) or args.preset
    runs = plan(args)
    if not args.report_only:
        execute(runs, args.jobs)
    missing = [r.out for r in runs if not r.done]
    if missing:
        raise SystemExit(f"{len(missing)} runs are not finished, e.g. {missing[0]}; run without --report-only")
    data = collect(runs, args.metric)
    shown = [a for a in argv if a != "--report-only"]
    command = command_line("evals.model", shown)
    data["command"] = command
    write_report(args.results_dir, args.name, data, markdown(args, data, command), lambda png: plot(args, data, png))
    return data


if __name__ == "__main__":
    main()
