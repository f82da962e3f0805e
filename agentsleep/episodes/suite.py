"""The episode suite: which checkpoints, which episodes, which conditions — run them and write the report.

Shared by ``agentsleep demo`` (AgentHost driver, a few episodes) and ``python -m evals.episodes`` (LangChain driver,
the committed results). A *block* is one episode set (e.g. retrieval with decoys) with its conditions:

* ``sleep N=1`` and ``sleep N=<best>`` — each its own trained checkpoint, run with its own N;
* ``window truncation`` — the best-N checkpoint with S reset to zeros at every sleep (old messages simply dropped);
* ``full attention`` — an attention-only checkpoint reading the whole episode in one window, when one is shipped
  whose window holds the episode.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from agentsleep.episodes.build import depo_episodes, english_episodes, gsm_episodes, stateful_gsm_episodes
from agentsleep.episodes.drivers import Condition
from agentsleep.episodes.harness import DriverFactory, Mode, run_condition
from agentsleep.episodes.report import Score, constant_baseline, markdown_table, paired, plot, score, write_json
from agentsleep.episodes.types import ENGLISH_KINDS, Episode, EpisodeOutcome
from agentsleep.errors import CheckpointError, ConfigError
from agentsleep.tasks.base import TaskConfig
from agentsleep.tasks.depo import DepoConfig
from agentsleep.tasks.family import FamilyConfig
from agentsleep.tasks.gsm import GSMSymbolicConfig
from agentsleep.tasks.gsm_english import GSMEnglishConfig
from agentsleep.train.eval_cli import checkpoint_task, read_config

logger = logging.getLogger(__name__)

KINDS = ("family", "gsm_english", "retrieval", "retrieval_nodecoy", "math_last", "math_first", "stateful_gsm")


# --------------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory says about itself (config.json, and eval.json when the trainer wrote one)."""

    path: Path
    task: str
    task_config: TaskConfig
    passes: int
    layout: str
    window: int
    exact: float | None  # held-out exact match at the end of training

    @property
    def full_attention(self) -> bool:
        return "g" not in self.layout

    def matches(self, **knobs: Any) -> bool:
        """Whether the task config has these knob values (e.g. ``question_position="last"``)."""
        return all(getattr(self.task_config, k, None) == v for k, v in knobs.items())

    @property
    def question_position(self) -> str | None:
        return getattr(self.task_config, "question_position", None)


def read_checkpoint(path: str | Path) -> CheckpointInfo | None:
    """The checkpoint's facts, or None if ``path`` is not a task checkpoint written by ``agentsleep train``."""
    p = Path(path)
    try:
        cfg = read_config(p)
        task = checkpoint_task(p, config=cfg)
    except CheckpointError:
        return None
    if not (p / "tokenizer.json").is_file():
        return None
    exact = None
    if (p / "eval.json").is_file():
        exact = json.loads((p / "eval.json").read_text()).get("exact")
    model = cfg.get("model", cfg)
    return CheckpointInfo(
        path=p,
        task=task.name,
        task_config=task.config,
        passes=int(model.get("passes", 1)),
        layout=str(model.get("layout", "agag")),
        window=int(model.get("window", 0)),
        exact=exact,
    )


def find_checkpoints(*roots: str | Path) -> list[CheckpointInfo]:
    """Every task checkpoint directly under (or two levels below) the given roots, sorted by path."""
    found: dict[Path, CheckpointInfo] = {}
    for root in roots:
        r = Path(root)
        for cfg in [*r.glob("config.json"), *r.glob("*/config.json"), *r.glob("*/*/config.json")]:
            info = read_checkpoint(cfg.parent)
            if info is not None:
                found[cfg.parent.resolve()] = info
    return [found[k] for k in sorted(found)]


def pick_pair(
    infos: Sequence[CheckpointInfo], task: str, **match: Any
) -> tuple[CheckpointInfo | None, CheckpointInfo | None]:
    """(N=1, best N>1) hybrids for a task whose config matches ``match``; best = highest held-out exact, then N."""
    pool = [i for i in infos if i.task == task and not i.full_attention and i.matches(**match)]
    more = sorted((i for i in pool if i.passes > 1), key=lambda i: (i.exact or 0.0, i.passes))
    best = more[-1] if more else None
    n1 = [i for i in pool if i.passes == 1]
    if best is not None:  # the N=1 twin of the best N (same stack), not e.g. a deeper N=1 baseline
        n1 = [i for i in n1 if (i.layout, i.window) == (best.layout, best.window)] or n1
    return (max(n1, key=lambda i: i.exact or 0.0) if n1 else None), best


def pick_full_attention(infos: Sequence[CheckpointInfo], task: str, tokens: int, **match: Any) -> CheckpointInfo | None:
    """An attention-only checkpoint of the task (config matching ``match``) whose window holds ``tokens``."""
    ok = [i for i in infos if i.task == task and i.full_attention and i.window >= tokens and i.matches(**match)]
    return max(ok, key=lambda i: i.exact or 0.0) if ok else None


# --------------------------------------------------------------------------------------------------- blocks


@dataclass
class Block:
    """One episode set and the conditions it runs under."""

    key: str
    title: str
    about: str  # what it is and how it maps to the paper
    episodes: list[Episode]
    conditions: list[Condition]
    notes: list[str] = field(default_factory=list)
    outcomes: list[EpisodeOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def turns(self) -> int:
        return sum(len(e.turns) for e in self.episodes)


ABOUT = {
    "family": (
        "reasoning-gym `family_relationships` in plain English: the story arrives one sentence per message "
        "(`Robert is married to Anna.`, `They have a child called Mia.`), with small-talk distractor messages among "
        "them; the agent sleeps whenever its window fills, and once more before the question (`What is Anna to "
        "Zoe?`), so every fact it needs survives only in S. The answer is one word, scored by reasoning-gym's own "
        "`score_answer`; questions are grouped by the number of family relations they compose (hops)."
    ),
    "gsm_english": (
        "reasoning-gym `gsm_symbolic` in plain English, the stateful split of Lin et al. 2025: every sentence but "
        "the last arrives as a message (with small talk among them), a sleep, then the last sentence as the "
        "question; the answer is a number, scored by reasoning-gym's own `score_answer`, grouped by the number of "
        "context sentences."
    ),
    "retrieval": (
        "Depo k-hop retrieval (paper §6.2) as a conversation: the edges of a hidden cycle arrive a few per turn, "
        "interleaved with distractor turns carrying the edges of a decoy cycle over other names (hidden + decoy = "
        "the node count the model was trained on); the agent sleeps before the questions, so the graph survives only "
        "in S; `HOP_k name ANS` questions start on hidden nodes, the answer is a name (exact match per k)."
    ),
    "retrieval_nodecoy": (
        "The same with the checkpoint's own test cycles (n = n_max) and no distractor turns: the training "
        "distribution, delivered over turns."
    ),
    "math_last": (
        "GSM-Infinite-style symbolic math (paper §6.3) as a conversation: assignment statements arrive one to three "
        "per turn (undetermined noise statements are the distractors); the question and the answer cue come last, "
        "in the live window, so the agent had to consolidate every fact without knowing the question."
    ),
    "math_first": (
        "The paper's layout: the question opens the episode (it survives only in S), the statements follow, the last "
        "turn is the answer cue."
    ),
    "stateful_gsm": (
        "reasoning-gym `gsm_symbolic` (an external generator and scorer) in the stateful split of Lin et al. 2025: "
        "every sentence but the last is context, then a sleep, then the question. The text is English, which a "
        "from-scratch symbolic checkpoint cannot read (words become `<unk>`; digits survive): a harness and plumbing "
        "check, scored by reasoning-gym's own `score_answer`."
    ),
}


def _conditions(n1: CheckpointInfo | None, best: CheckpointInfo | None, full: CheckpointInfo | None) -> list[Condition]:
    out = []
    if n1 is not None:
        out.append(Condition(name="sleep N=1", checkpoint=str(n1.path)))
    if best is not None:
        out.append(Condition(name=f"sleep N={best.passes}", checkpoint=str(best.path)))
    ref = best or n1
    if ref is not None:
        out.append(
            Condition(name=f"window truncation (N={ref.passes} weights)", checkpoint=str(ref.path), truncate=True)
        )
    if full is not None:
        out.append(Condition(name="full attention, whole episode", checkpoint=str(full.path), full_history=True))
    return out


def _gym_notes(episodes: Sequence[Episode]) -> list[str]:
    """What must accompany a reasoning-gym result (spec §4.1): version, seed, entry indices, the harness self-test."""
    from agentsleep.tasks.stateful_gsm import StatefulGSM

    if not episodes:
        return []
    meta = episodes[0].meta
    check = StatefulGSM(size=int(meta["rg_size"]), seed=int(meta["seed"])).self_test()
    used = [int(e.meta["rg_index"]) for e in episodes]
    return [
        f"reasoning-gym {meta['version']} (pinned {meta['pinned_version']}), dataset `{meta['dataset']}`, seed "
        f"{meta['seed']}, difficulty {meta['difficulty']}, size {meta['rg_size']}; entries used: {used}",
        "harness self-test with reasoning-gym's own scorer: `answer_value` scores 1.0 on every entry: "
        f"{check['answer_value_scores_1']}; `None` scores 0.0: {check['none_scores_0']}",
    ]


def plan(
    infos: Sequence[CheckpointInfo],
    kinds: Sequence[str],
    n: int,
    seed: int = 0,
    *,
    hidden: int | None = None,
    decoys: int | None = None,
    stateful_size: int | None = None,
) -> list[Block]:
    """The blocks to run; a kind without the checkpoints it needs becomes a block with a note and no conditions."""
    blocks = []
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"unknown episode kind {kind!r}; known: {', '.join(KINDS)}")
        if kind in ENGLISH_KINDS:
            n1, best = pick_pair(infos, kind)
            ref = best or n1
            if ref is None:
                blocks.append(Block(kind, kind, ABOUT[kind], [], [], [f"no {kind} checkpoint found"]))
                continue
            ecfg = cast(FamilyConfig | GSMEnglishConfig, ref.task_config)
            eps = english_episodes(ecfg, n, seed)
            title = (
                f"Family relationships in English (reasoning-gym, families of {ecfg.min_family_size}–"
                f"{ecfg.max_family_size}, L={ecfg.window})"
                if kind == "family"
                else f"GSM in English (reasoning-gym stateful split, L={ecfg.window})"
            )
        elif kind.startswith("retrieval"):
            n1, best = pick_pair(infos, "depo")
            ref = best or n1
            if ref is None:
                blocks.append(Block(kind, kind, ABOUT[kind], [], [], ["no Depo checkpoint found"]))
                continue
            cfg = cast(DepoConfig, ref.task_config)
            eps = (
                depo_episodes(cfg, n, seed, hidden=hidden, decoys=decoys)
                if kind == "retrieval"
                else depo_episodes(cfg, n, seed, hidden=cfg.n_max, decoys=0)
            )
            h, d = eps[0].meta["hidden"], eps[0].meta["decoys"]
            title = f"Retrieval (Depo, hidden {h} + decoy {d} nodes, L={cfg.window})"
        elif kind.startswith("math"):
            position = "last" if kind == "math_last" else "first"
            n1, best = pick_pair(infos, "gsm_symbolic", question_position=position)
            ref = best or n1
            if ref is None:
                blocks.append(
                    Block(kind, kind, ABOUT[kind], [], [], [f"no GSM checkpoint trained question-{position}"])
                )
                continue
            cfg = cast(GSMSymbolicConfig, ref.task_config)
            eps = gsm_episodes(cfg, n, seed)
            title = f"Math (GSM symbolic, question {position}, ops {cfg.ops[0]}–{cfg.ops[1]}, L={cfg.window})"
        else:
            n1, best = pick_pair(infos, "gsm_symbolic", question_position="last")
            if best is None and n1 is None:
                n1, best = pick_pair(infos, "gsm_symbolic")
            ref = best or n1
            if ref is None:
                blocks.append(Block(kind, kind, ABOUT[kind], [], [], ["no GSM symbolic checkpoint found"]))
                continue
            cfg = cast(GSMSymbolicConfig, ref.task_config)
            eps = stateful_gsm_episodes(cfg, stateful_size or max(2 * n, 4), seed + 1)[:n]
            title = "reasoning-gym stateful GSM (English; plumbing check)"
            gym_notes = _gym_notes(eps)
        layout_match = {"question_position": ref.question_position} if ref.question_position else {}
        full = pick_full_attention(infos, ref.task, max(e.max_tokens for e in eps), **layout_match)
        block = Block(kind, title, ABOUT[kind], eps, _conditions(n1, best, full))
        if kind == "stateful_gsm":
            block.notes += gym_notes
        if n1 is None or best is None:
            block.notes.append("only one N of this checkpoint family was found")
        if full is None:
            block.notes.append(
                "full-attention baseline: no attention-only checkpoint of this task whose window holds the whole "
                f"episode ({max(e.max_tokens for e in eps)} tokens) was available"
            )
        blocks.append(block)
    return blocks


def run_blocks(
    blocks: Sequence[Block],
    factory: str | DriverFactory,
    workdir: Path,
    *,
    seed: int = 0,
    kill: bool = True,
    mode: Mode = "forkserver",
    progress: Callable[[Block, Condition], Callable[[], None] | None] | None = None,
) -> None:
    """Run every block under every condition (fills ``block.outcomes``)."""
    for block in blocks:
        t0 = time.perf_counter()
        for cond in block.conditions:
            tick = progress(block, cond) if progress is not None else None
            slug = f"{block.key}-{cond.name}".replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
            block.outcomes += run_condition(
                block.episodes, cond, factory, workdir / slug, seed=seed, kill=kill, mode=mode, on_turn=tick
            )
        block.seconds = time.perf_counter() - t0


def block_scores(block: Block) -> list[Score]:
    return score(block.outcomes)


def revive_failures(blocks: Sequence[Block]) -> list[str]:
    """Episodes whose killed-and-revived replies differ from the uninterrupted run's (must be none)."""
    return [f"{o.condition}: {o.episode}" for b in blocks for o in b.outcomes if o.revive_equal is False]


def baseline_line(block: Block) -> str:
    """The block's trivial baseline: the best constant answer (math) or a uniformly guessed node (retrieval)."""
    if block.key.startswith("retrieval"):
        nodes = block.episodes[0].meta["hidden"] + block.episodes[0].meta["decoys"]
        return f"Chance (a uniformly guessed node of the episode): {100 / nodes:.1f}%"
    ans, frac = constant_baseline(block.episodes)
    return f"Constant-answer baseline (always `{ans}`): {100 * frac:.1f}%"


def transcripts(block: Block, k: int = 4) -> list[str]:
    """A few readable transcripts of an English block (Markdown): messages, sleeps, question, every answer."""
    from tokenizers import Tokenizer

    from agentsleep.episodes.transcript import pick, render

    sleepers = [c for c in block.conditions if not c.truncate and not c.full_history]
    if not block.outcomes or not sleepers:
        return []
    best = next((c for c in sleepers if c.name != "sleep N=1"), sleepers[0])
    n1 = next((c.name for c in sleepers if c.name == "sleep N=1"), None)
    by: dict[str, dict[str, EpisodeOutcome]] = {}
    for o in block.outcomes:
        by.setdefault(o.condition, {})[o.episode] = o
    tokenizer = Tokenizer.from_file(str(Path(best.checkpoint) / "tokenizer.json"))
    window = int(json.loads((Path(best.checkpoint) / "config.json").read_text())["window"])
    lines = [
        "### Transcripts",
        "",
        f"What the agent heard, where it slept ({best.name}'s sleeps; every N sleeps at the same points), the "
        "question, and each condition's answer (scored by reasoning-gym). Replies are the killed-and-revived runs'.",
        "",
    ]
    for ep in pick(block.episodes, by, best.name, n1, k):
        outs = {c.name: by[c.name][ep.id] for c in block.conditions if ep.id in by.get(c.name, {})}
        body = render(ep, outs, tokenizer, window=window, soft_threshold=best.soft_threshold, sleeper=best.name)
        lines += ["```text", *body, "```", ""]
    return lines


def summary_table(blocks: Sequence[Block]) -> list[str]:
    """One line per block: accuracy of each kind of condition, side by side."""
    cols = ["sleep N=1", "sleep best N", "window truncation", "full attention", "trivial baseline"]
    lines = ["| block | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for b in blocks:
        if not b.outcomes:
            lines.append(f"| {b.key} | " + " | ".join(["not run"] * (len(cols) - 1)) + " | – |")
            continue
        by = {s.condition: s for s in block_scores(b)}
        cells = []
        for kind in cols[:-1]:
            conds = [
                c
                for c in b.conditions
                if (kind == "sleep N=1" and c.name == "sleep N=1")
                or (kind == "sleep best N" and c.name.startswith("sleep N=") and c.name != "sleep N=1")
                or (kind == "window truncation" and c.truncate)
                or (kind == "full attention" and c.full_history)
            ]
            if not conds:
                cells.append("n/a")
                continue
            s = by[conds[0].name]
            lo, hi = s.interval
            label = f" ({conds[0].name.removeprefix('sleep ')})" if kind == "sleep best N" else ""
            cells.append(f"{100 * s.accuracy:.1f} [{100 * lo:.0f}–{100 * hi:.0f}]{label}")
        cells.append(baseline_line(b).split(": ")[-1])
        lines.append(f"| {b.key} | " + " | ".join(cells) + " |")
    return ["## Summary (accuracy %, 95% CI)", "", *lines, ""]


def write_report(
    blocks: Sequence[Block],
    out_dir: Path,
    name: str,
    *,
    command: str,
    driver: str,
    facts: dict[str, Any] | None = None,
) -> Path:
    """``<name>.md`` (tables, plots, the command), ``<name>.json`` (every outcome) and one PNG per block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Long-horizon agent episodes ({driver})",
        "",
        f"Made by: `{command}`",
        "",
    ]
    for k, v in (facts or {}).items():
        lines.append(f"- {k}: {v}")
    lines += [
        "",
        "Accuracy is exact match of the answer per question; brackets are 95% Wilson intervals. Every episode was "
        "also run with its process SIGKILLed after a random turn and revived from the store in a fresh process; the "
        "last column counts those runs whose replies equal the uninterrupted run's, turn for turn (and how many kills "
        "landed while a background sleep was scheduled or running). Scores are the revived runs'.",
        "",
    ]
    lines += summary_table(blocks)
    all_outcomes = []
    for b in blocks:
        lines += [f"## {b.title}", "", b.about, ""]
        for note in b.notes:
            lines.append(f"- Note: {note}")
        if b.notes:
            lines.append("")
        if not b.outcomes:
            continue
        scores = block_scores(b)
        lines += [markdown_table(scores), ""]
        lines.append(baseline_line(b) + ".")
        for cond in b.conditions[1:]:
            first = b.conditions[0].name
            wins, losses, p = paired(b.outcomes, cond.name, first)
            lines.append(
                f"Paired with {first} on the same questions: {cond.name} right where it is wrong {wins}, the reverse "
                f"{losses} (exact sign test p = {p:.2g})."
            )
            if not cond.truncate:
                continue
            for other in b.conditions:
                if not other.truncate and not other.full_history and other.name != first:
                    wins, losses, p = paired(b.outcomes, other.name, cond.name)
                    lines.append(
                        f"Paired with {cond.name}: {other.name} right where it is wrong {wins}, the reverse {losses} "
                        f"(p = {p:.2g})."
                    )
        conds = {c.name: c for c in b.conditions}
        lines += ["", "Checkpoints: " + "; ".join(f"{n} = `{conds[n].checkpoint}`" for n in conds), ""]
        png = plot(scores, b.title, out_dir / f"{name}_{b.key}.png")
        lines += [f"![{b.title}]({png.name})", "", f"Wall time for this block: {b.seconds:.0f} s.", ""]
        if b.key in ENGLISH_KINDS:
            lines += transcripts(b)
        all_outcomes += b.outcomes
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    write_json(
        out_dir / f"{name}.json",
        {
            "command": command,
            "driver": driver,
            **(facts or {}),
            "blocks": [
                {
                    "key": b.key,
                    "title": b.title,
                    "notes": b.notes,
                    "conditions": [c.model_dump(mode="json") for c in b.conditions],
                    "episodes": [e.id for e in b.episodes],
                    "seconds": round(b.seconds, 1),
                    "scores": [
                        {
                            "condition": s.condition,
                            "accuracy": None if math.isnan(s.accuracy) else s.accuracy,
                            "ci95": s.interval,
                            "correct": s.correct,
                            "questions": s.questions,
                            "groups": s.groups,
                            "kills": s.kills,
                            "revive_equal": s.revive_equal,
                            "in_flight": s.in_flight,
                            "sleeps_per_episode": s.sleeps,
                        }
                        for s in block_scores(b)
                    ],
                }
                for b in blocks
            ],
        },
        all_outcomes,
    )
    return path


__all__ = [
    "ABOUT",
    "KINDS",
    "Block",
    "CheckpointInfo",
    "block_scores",
    "find_checkpoints",
    "pick_full_attention",
    "pick_pair",
    "plan",
    "read_checkpoint",
    "revive_failures",
    "run_blocks",
    "transcripts",
    "write_report",
]
