"""``agentsleep demo``: short long-horizon episodes on the shipped checkpoints, with kills and revives, and a report."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import click

DEFAULT_KINDS = "family"
TRANSCRIPTS_SHOWN = 2  # transcripts printed to the terminal per English block (the report has more)


def _command(ctx: click.Context) -> str:
    """The command line that reproduces this run: ``agentsleep demo`` plus the options given explicitly."""
    words = ["agentsleep", "demo"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or ctx.get_parameter_source(param.name) in (  # type: ignore[arg-type]
            click.core.ParameterSource.DEFAULT,
            None,
        ):
            continue
        value = ctx.params[param.name]  # type: ignore[index]
        if param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts or param.opts)[0]
            words.append(flag)
            continue
        for v in value if param.multiple else [value]:
            words += [param.opts[0], str(v)]
    return shlex.join(words)


@click.command("demo")
@click.option(
    "--checkpoints",
    "roots",
    multiple=True,
    default=("checkpoints",),
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the trained checkpoints are (searched two levels deep; repeatable).",
)
@click.option("--out", default="results/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--episodes", "n", default=10, show_default=True, help="Retrieval episodes (4 questions each).")
@click.option(
    "--math-episodes",
    "n_math",
    type=int,
    default=None,
    help="Math episodes (1 question each)  [default: 3 x --episodes]",
)
@click.option(
    "--english-episodes",
    "n_english",
    default=30,
    show_default=True,
    help="Episodes of the English kinds (family, gsm_english; 1 question each).",
)
@click.option("--seed", default=0, show_default=True, help="Episode and kill-turn seed.")
@click.option(
    "--kinds",
    default=DEFAULT_KINDS,
    show_default=True,
    help="Comma-separated: family, gsm_english, retrieval, retrieval_nodecoy, math_last, math_first, stateful_gsm.",
)
@click.option("--kill/--no-kill", default=True, show_default=True, help="SIGKILL each episode once and revive it.")
@click.option(
    "--spawn",
    is_flag=True,
    help="Fresh interpreters (python -m …) per child process instead of a fork server.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(
    roots: tuple[str, ...],
    out: str,
    n: int,
    n_math: int | None,
    n_english: int,
    seed: int,
    kinds: str,
    kill: bool,
    spawn: bool,
    progress: bool,
) -> None:
    """Run short agent episodes in plain English (family stories from reasoning-gym: facts over many messages among
    small talk, sleeps, then a question) for N=1, the best N, window truncation and full attention; print a score
    table and transcripts, and write a Markdown report with transcripts and PNG plots under --out. Other kinds
    (Depo retrieval, symbolic math) are the research episodes (--kinds).

    Every episode's agent lives in a child process with a SQLite snapshot store; the process is SIGKILLed after a
    random turn (sometimes while a background sleep runs) and a fresh process revives the agent from the store and
    finishes the episode. The replies must equal an uninterrupted run's, or the demo exits with status 1.
    """
    from tqdm.auto import tqdm

    from agentsleep.episodes.report import format_table, text_table
    from agentsleep.episodes.suite import (
        block_scores,
        find_checkpoints,
        plan,
        revive_failures,
        run_blocks,
        transcripts,
        write_report,
    )
    from agentsleep.episodes.types import ENGLISH_KINDS

    t_start = time.perf_counter()
    infos = find_checkpoints(*roots)
    if not infos:
        raise click.ClickException(f"no trained checkpoints under {', '.join(roots)}; pass --checkpoints DIR")
    wanted = [k.strip() for k in kinds.split(",") if k.strip()]
    n_math = 3 * n if n_math is None else n_math

    def count(kind: str) -> int:
        if kind in ENGLISH_KINDS:
            return n_english
        return n if kind.startswith("retrieval") else n_math

    blocks = [plan(infos, [k], count(k), seed)[0] for k in wanted]
    for i, b in enumerate(blocks):  # a math checkpoint of the other layout is better than none
        if b.key.startswith("math") and not b.conditions:
            other = "math_first" if b.key == "math_last" else "math_last"
            alt = plan(infos, [other], n_math, seed)[0]
            if alt.conditions:
                alt.notes.insert(0, f"no checkpoint for {b.key}; ran {other} instead")
                blocks[i] = alt
    for b in blocks:
        msg = f"{b.title}: {len(b.episodes)} episodes x {len(b.conditions)} conditions"
        click.echo(msg + "".join(f"\n  note: {x}" for x in b.notes))
    bars: list[Any] = []

    def bar(block: Any, cond: Any) -> Any:
        for old in bars:
            old.close()  # one bar at a time: each shows its own condition's wall time
        total = block.turns * (2 if kill else 1)  # uninterrupted run + killed-and-revived run
        b = tqdm(total=total, desc=f"{block.key} | {cond.name}", unit="turn", disable=not progress, leave=True)
        bars[:] = [b]
        return lambda: b.update(1)

    out_dir = Path(out)
    run_blocks(
        [b for b in blocks if b.conditions],
        "agentsleep.episodes.drivers:host_driver",
        out_dir / "work",
        seed=seed,
        kill=kill,
        mode="spawn" if spawn else "forkserver",
        progress=bar,
    )
    for b in bars:
        b.close()
    for b in blocks:
        if not b.outcomes:
            continue
        click.echo(f"\n{b.title}")
        click.echo(format_table(text_table(block_scores(b))))
        kills = [o for o in b.outcomes if o.killed_at is not None]
        if kills:
            flying = sum(bool(o.killed_in_flight) for o in kills)
            equal = sum(bool(o.revive_equal) for o in kills)
            click.echo(
                f"  {len(kills)} SIGKILLs ({flying} with a background sleep in flight), {equal} revived runs equal "
                f"to the uninterrupted ones; {sum(o.sleeps for o in b.outcomes)} sleeps in all"
            )
        if b.key in ENGLISH_KINDS:
            shown = [line for line in transcripts(b, TRANSCRIPTS_SHOWN) if line.startswith(("  ", b.key))]
            click.echo("\n" + "\n".join(shown))
    report = write_report(
        blocks,
        out_dir,
        "report",
        command=_command(click.get_current_context()),
        driver="AgentHost: TorchEngine + SQLite SnapshotStore + SleepPolicy + SleepScheduler",
        facts={
            "episodes": ", ".join(f"{b.key} {len(b.episodes)}" for b in blocks),
            "seed": seed,
            "kill and revive": kill,
            "child processes": "spawn (python -m agentsleep.episodes.worker)" if spawn else "forkserver",
        },
    )
    wall = time.perf_counter() - t_start
    click.echo(f"\nreport: {report} (+ PNG plots and report.json beside it); wall time {wall:.0f} s")
    bad = revive_failures(blocks)
    if bad:
        click.echo(f"revived runs differ from the uninterrupted ones: {bad}", err=True)
        raise SystemExit(1)
