"""``agentsleep eval``: score a trained checkpoint on its task's held-out set, for one or several sleep passes N.

The checkpoint's ``config.json`` names its task and task config (``agentsleep train`` writes them), so the held-out
set is the one the trainer scored (split ``test``, seed 0) unless asked otherwise. Scoring the same weights with
several N is the cheap half of the paper's N comparison; a model trained at each N is ``python -m evals.model``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from agentsleep.errors import AgentSleepError, CheckpointError, InvalidInput
from agentsleep.tasks import TASKS, Task

EXIT_USAGE = 2
AUTO = "auto"
DEFAULT_TOL = 0.05  # relative change of S between passes; docs/training.md (adaptive sleep) for how it was chosen


def read_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict.

    Raises:
        CheckpointError: missing, unreadable, not UTF-8, not JSON, or not an object.
    """
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not a readable checkpoint config ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    return cfg


def checkpoint_task(path: str | Path, *, config: dict[str, Any] | None = None, **overrides: Any) -> Task:
    """The task a checkpoint was trained on (``config.json["agentsleep"]``), with knobs optionally overridden.

    ``config``: the already-parsed ``config.json`` (default: read it from ``path``).

    Raises:
        CheckpointError: no readable config.json, or it names no registered task or an invalid task config.
    """
    cfg = read_config(path) if config is None else config
    extra = cfg.get("agentsleep") or {}
    name, task_cfg = (extra.get("task"), extra.get("task_config")) if isinstance(extra, dict) else (None, None)
    if name not in TASKS or not isinstance(task_cfg, dict):
        raise CheckpointError(f"{path}: config.json names no registered task (was it written by `agentsleep train`?)")
    spec = TASKS[name]
    try:
        stored = spec.config_cls.model_validate(task_cfg)
    except ValueError as e:  # pydantic's ValidationError
        raise CheckpointError(f"{path}: config.json holds an invalid {name} task config: {e}") from e
    return Task(spec, stored.with_overrides(**overrides))


def score_checkpoint(
    path: str | Path,
    passes: list[int | str] | None = None,
    *,
    size: int = 2048,
    seed: int = 0,
    max_passes: int | None = None,
    tol: float = DEFAULT_TOL,
    criterion: str = "state",
    **overrides: Any,
) -> dict[int | str, dict[str, float]]:
    """Held-out scores of the checkpoint per N (default: the checkpoint's own N).

    ``passes`` may hold ``"auto"``: adaptive sleep (`agentsleep.model.adaptive`) with at most ``max_passes`` passes
    (default: the checkpoint's N) and stopping rule ``criterion < tol``; its scores add ``mean_passes``.
    """
    from agentsleep.model.adaptive import AutoPasses
    from agentsleep.model.hybrid import SleepHybrid
    from agentsleep.train.trainer import evaluate

    task = checkpoint_task(path, **overrides)
    model = SleepHybrid.from_pretrained(path)
    if task.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: task vocabulary {task.vocab_size} > model vocabulary")
    batch = task.generate("test", size, seed)
    out: dict[int | str, dict[str, float]] = {}
    for n in passes or [model.config.passes]:
        if n == AUTO:
            spec = AutoPasses(max_passes or model.config.passes, tol, criterion)  # type: ignore[arg-type]
            out[AUTO] = evaluate(model, task, batch, spec)
        elif isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            out[n] = evaluate(model, task, batch, n)
        else:
            raise InvalidInput(f"passes must be integers ≥ 1 or {AUTO!r}, got {n!r}")
    return out


class PassesParam(click.ParamType):
    """An integer N ≥ 1, or ``auto``."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is neither an integer ≥ 1 nor 'auto'", param, ctx)


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--passes",
    "-N",
    multiple=True,
    type=PassesParam(),
    help="Sleep passes N (repeatable), or 'auto': adaptive sleep [checkpoint's N].",
)
@click.option(
    "--max-passes", type=click.IntRange(min=1), default=None, help="With -N auto: most passes per window [model's N]."
)
@click.option("--tol", type=click.FloatRange(min=0), default=DEFAULT_TOL, show_default=True, help="With -N auto.")
@click.option(
    "--criterion",
    type=click.Choice(["state", "kl"]),
    default="state",
    show_default=True,
    help="With -N auto: stop when S changes by < tol (relative), or when successive passes' predictions agree "
    "(KL < tol nats).",
)
@click.option("--size", default=2048, show_default=True, type=click.IntRange(min=1), help="Held-out examples.")
@click.option("--seed", default=0, show_default=True, help="Seed of the held-out set (split 'test').")
@click.option("--set", "task_set", multiple=True, help="Task knob override, e.g. --set t=4 (a harder test set).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object {N: scores} instead of a table.")
def eval_checkpoint(
    checkpoint: str,
    passes: tuple[int | str, ...],
    max_passes: int | None,
    tol: float,
    criterion: str,
    size: int,
    seed: int,
    task_set: tuple[str, ...],
    as_json: bool,
) -> None:
    """Score CHECKPOINT on its task's held-out set (exact match and the task's other metrics) for each N.

    Example: agentsleep eval checkpoints/rule110-w16-t2-n2 -N 1 -N 2 -N 4

    Adaptive sleep: agentsleep eval checkpoints/rule110-w16-t2-anyN -N auto --max-passes 8 --tol 0.05
    """
    from agentsleep.train.cli import parse_overrides

    try:
        scores = score_checkpoint(
            checkpoint,
            list(passes),
            size=size,
            seed=seed,
            max_passes=max_passes,
            tol=tol,
            criterion=criterion,
            **parse_overrides(task_set),
        )
    except (AgentSleepError, ValueError) as e:  # pydantic's ValidationError is a ValueError: a bad --set
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({str(n): s for n, s in scores.items()}))
        return
    keys = sorted({k for s in scores.values() for k in s}, key=lambda k: (k != "exact", k))
    rows = [["N", *keys]] + [[str(n), *(f"{s.get(k, float('nan')):.4f}" for k in keys)] for n, s in scores.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.rjust(w) for c, w in zip(r, widths)))
