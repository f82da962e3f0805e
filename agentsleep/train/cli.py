"""``agentsleep train``: one Algorithm-1 training run into a checkpoint directory."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from agentsleep.errors import AgentSleepError, InvalidInput

log = logging.getLogger(__name__)


def _value(text: str) -> Any:
    """``16`` → 16, ``0.5`` → 0.5, ``true`` → True, ``agag`` → "agag"."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("W=16", "t=8")`` → ``{"W": 16, "t": 8}``."""
    out: dict[str, Any] = {}
    for item in items:
        for part in filter(None, item.split(",")):
            key, sep, val = part.partition("=")
            if not sep or not key:
                raise InvalidInput(f"expected KEY=VALUE, got {part!r}")
            out[key.strip()] = _value(val.strip())
    return out


def parse_loop(text: str) -> list[int]:
    """``"2:6"`` → ``[2, 6]``: the block range [start, end) that sleep passes 2..N repeat."""
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise InvalidInput(f"--loop takes START:END block indices, e.g. 2:6; got {text!r}")
    return [int(start), int(end)]


def parse_curriculum(text: str | None) -> list[tuple[int, dict[str, Any]]]:
    """``"0:t=1;300:t=2;600:"`` → ``[(0, {"t": 1}), (300, {"t": 2}), (600, {})]`` (an empty stage = the target)."""
    if not text:
        return []
    stages = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        start, sep, rest = chunk.partition(":")
        if not sep or not start.strip().isdigit():
            raise InvalidInput(f"curriculum stages look like STEP:KEY=VALUE[,KEY=VALUE]; got {chunk!r}")
        stages.append((int(start), parse_overrides([rest]) if rest.strip() else {}))
    return sorted(stages, key=lambda s: s[0])


@click.command("train")
@click.option("--task", default="rule110", show_default=True, help="Registered task (rule110, depo, gsm_symbolic…).")
@click.option("--preset", default="toy", show_default=True, help="Task preset.")
@click.option("--set", "task_set", multiple=True, help="Task knob, e.g. --set W=16 --set t=8.")
@click.option("--model", "model_set", multiple=True, help="HybridConfig override, e.g. --model layout=agag.")
@click.option(
    "--passes", "-N", default=1, show_default=True, help="Sleep passes N over label-free windows (N_max if sampled)."
)
@click.option(
    "--passes-dist",
    type=click.Choice(["fixed", "uniform", "log-uniform", "lognormal-poisson"]),
    default="fixed",
    show_default=True,
    help="Sampled-N training: draw N per window from U{passes-min..N}, P(N=n) ∝ 1/n (log-uniform) or Geiping et "
    "al.'s log-normal Poisson.",
)
@click.option("--passes-min", default=1, show_default=True, help="Smallest N drawn by --passes-dist.")
@click.option("--passes-mean", type=float, default=None, help="lognormal-poisson: mean N [(min + N) / 2].")
@click.option("--passes-sigma", default=0.5, show_default=True, help="lognormal-poisson: sigma of log lambda.")
@click.option(
    "--passes-per",
    type=click.Choice(["window", "step"]),
    default="window",
    show_default=True,
    help="One N draw per label-free window, or one per step.",
)
@click.option("--eval-passes", multiple=True, type=int, help="Also score the final model at this N (repeatable).")
@click.option("--steps", default=2000, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["muon", "adamw"]), default="muon", show_default=True)
@click.option("--lr-muon", default=2e-3, show_default=True)
@click.option("--lr-adamw", default=2e-3, show_default=True)
@click.option("--warmup", default=100, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--clip", default=1.0, show_default=True, help="Grad-norm clip (0 = off).")
@click.option("--seed", default=0, show_default=True, help="Init seed (and data order unless --data-seed).")
@click.option("--data-seed", type=int, default=None)
@click.option("--curriculum", default=None, help='Task stages, e.g. "0:t=1;300:t=2;600:" (same for every N).')
@click.option("--eval-every", default=250, show_default=True)
@click.option("--eval-size", default=1024, show_default=True)
@click.option("--final-eval-size", default=4096, show_default=True)
@click.option("--save-every", default=500, show_default=True)
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None, help="Warm start.")
@click.option("--init-optimizer/--no-init-optimizer", default=False, help="Also take --init-from's optimizer state.")
@click.option("--start-step", default=0, show_default=True, help="With --init-from: continue its data stream here.")
@click.option(
    "--gate-init",
    type=click.Choice(["slow", "model"]),
    default="slow",
    show_default=True,
    help="GDN decay init (see docs/training.md).",
)
@click.option("--detach-every", type=int, default=None, help="Truncated BPTT: detach S every k windows.")
@click.option("--checkpointing/--no-checkpointing", default=False, help="Activation checkpointing per (window, pass).")
@click.option("--compile/--no-compile", "compile_", default=False, help="torch.compile every block.")
@click.option("--threads", default=1, show_default=True)
@click.option(
    "--device", default="auto", show_default=True, help="auto (the rank's GPU if any, else CPU), cpu, cuda, cuda:N."
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="bfloat16: autocast activations; weights, optimizer state and S stay float32.",
)
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard the model with FSDP2 instead of DDP.")
@click.option(
    "--stage",
    type=click.IntRange(0, 2),
    default=0,
    show_default=True,
    help="Two-stage recipe (paper §6): 1 = memory layers only, hard eviction; 2 = everything, sliding eviction.",
)
@click.option(
    "--trainable",
    default=None,
    help="What learns: all, memory (GDN/Jet mixers), or glob patterns (default: all; stage 1: memory).",
)
@click.option(
    "--loop",
    "loop_range",
    default=None,
    help="Blocks START:END repeated in sleep passes 2..N (paper §2.5; default: the whole stack).",
)
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Chat fine-tuning: a JSONL file of {'messages': [...]} (with --init-from a checkpoint with a chat template).",
)
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), default=None, help="Held-out chat JSONL.")
@click.option("--log-every", type=int, default=None, help="Steps between log rows [eval-every].")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A train_config.json to start from (explicit options override it).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory.")
@click.option("--no-resume", is_flag=True, help="Start over even if --out holds a resumable run.")
@click.option("--progress/--no-progress", default=True)
@click.pass_context
def train(ctx: click.Context, **opts: Any) -> None:
    """Train a sleep hybrid with Algorithm 1 (N passes per label-free window) and write a checkpoint directory:
    config.json, model.safetensors, tokenizer.json, train_config.json, eval.json, log.jsonl.

    Example: agentsleep train --task rule110 --set W=16 --set t=8 --passes 4 --steps 3000 --out runs/r110-n4

    Sampled N (one model for every sleep depth): --passes 8 --passes-dist uniform draws N ~ U{1..8} per window.
    """
    from agentsleep.train.trainer import TrainConfig
    from agentsleep.train.trainer import train as run

    try:
        cfg = TrainConfig(**_fields(ctx, opts))
        result = run(cfg, opts["out"], resume=not opts["no_resume"], progress=opts["progress"])
    except (AgentSleepError, ValueError, OSError) as e:  # pydantic's ValidationError is a ValueError
        click.echo("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), err=True)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports for all
        return
    scores = {k: round(v, 4) for k, v in result["eval"].items() if isinstance(v, float)}
    click.echo(
        json.dumps(
            {
                "out": opts["out"],
                "step": result["step"],
                "tokens": result["tokens"],
                "wall_s": round(result["wall"], 1),
                "eval": scores,
            }
        )
    )


def _fields(ctx: click.Context, opts: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields: the --config file (if any), overridden by every option given explicitly."""
    explicit = {k for k in opts if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    fields: dict[str, Any] = {}
    if opts["config_file"]:
        fields = json.loads(Path(opts["config_file"]).read_text())
    mapping = {
        "task": opts["task"],
        "preset": opts["preset"],
        "task_overrides": parse_overrides(opts["task_set"]),
        "model": parse_overrides(opts["model_set"]),
        "curriculum": parse_curriculum(opts["curriculum"]),
        "passes": opts["passes"],
        "passes_dist": opts["passes_dist"].replace("-", "_"),
        "passes_min": opts["passes_min"],
        "passes_mean": opts["passes_mean"],
        "passes_sigma": opts["passes_sigma"],
        "passes_per": opts["passes_per"],
        "eval_passes": list(opts["eval_passes"]),
        "steps": opts["steps"],
        "batch_size": opts["batch_size"],
        "optimizer": opts["optimizer"],
        "lr_muon": opts["lr_muon"],
        "lr_adamw": opts["lr_adamw"],
        "warmup": opts["warmup"],
        "schedule": opts["schedule"],
        "clip": opts["clip"] or None,
        "seed": opts["seed"],
        "data_seed": opts["data_seed"],
        "eval_every": opts["eval_every"],
        "eval_size": opts["eval_size"],
        "final_eval_size": opts["final_eval_size"],
        "save_every": opts["save_every"],
        "init_from": opts["init_from"],
        "init_optimizer": opts["init_optimizer"],
        "start_step": opts["start_step"],
        "gate_init": opts["gate_init"],
        "detach_every": opts["detach_every"],
        "activation_checkpointing": opts["checkpointing"],
        "compile": opts["compile_"],
        "threads": opts["threads"],
        "device": opts["device"],
        "precision": opts["precision"],
        "fsdp": opts["fsdp"],
        "stage": opts["stage"],
        "data": opts["data"],
        "eval_data": opts["eval_data"],
        "log_every": opts["log_every"],
    }
    if opts["trainable"] is not None:  # unset: the stage's default (TrainConfig)
        mapping["trainable"] = opts["trainable"]

    option_of = {
        "task_overrides": "task_set",
        "model": "model_set",
        "activation_checkpointing": "checkpointing",
        "compile": "compile_",
    }
    for key, val in mapping.items():
        if not opts["config_file"] or option_of.get(key, key) in explicit or key not in fields:
            fields[key] = val
    if opts["loop_range"] is not None:
        fields["model"] = {**(fields.get("model") or {}), "loop": parse_loop(opts["loop_range"])}
    return fields
