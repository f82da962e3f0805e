"""Score tables (with 95% Wilson intervals), a Markdown report and PNG plots from episode outcomes."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentsleep.episodes.types import Episode, EpisodeOutcome, wilson


@dataclass
class Score:
    """Accuracy of one condition on one episode set, overall and per question group."""

    condition: str
    episodes: int = 0
    correct: int = 0
    questions: int = 0
    groups: dict[str, list[int]] = field(default_factory=dict)  # group -> [correct, total]
    sleeps: float = 0.0  # mean sleeps per episode
    kills: int = 0
    in_flight: int = 0  # kills ordered while a background sleep was scheduled or running
    revive_equal: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.questions)

    def group_accuracy(self, group: str) -> tuple[float, tuple[float, float], int]:
        c, n = self.groups.get(group, [0, 0])
        return (c / n if n else float("nan")), wilson(c, n), n


def score(outcomes: Sequence[EpisodeOutcome]) -> list[Score]:
    """One `Score` per condition, in first-seen order."""
    by: dict[str, Score] = {}
    sleeps: dict[str, list[int]] = defaultdict(list)
    for o in outcomes:
        s = by.setdefault(o.condition, Score(o.condition))
        s.episodes += 1
        sleeps[o.condition].append(o.sleeps)
        for q in o.questions:
            s.questions += 1
            s.correct += q.correct
            g = s.groups.setdefault(q.group, [0, 0])
            g[0] += q.correct
            g[1] += 1
        if o.killed_at is not None:
            s.kills += 1
            s.in_flight += bool(o.killed_in_flight)
            s.revive_equal += bool(o.revive_equal)
    for name, s in by.items():
        s.sleeps = sum(sleeps[name]) / len(sleeps[name])
    return list(by.values())


def _group_key(g: str) -> tuple[str, float]:
    name, _, value = g.partition("=")
    try:
        return name, float(value)
    except ValueError:
        return g, math.inf


def groups_of(scores: Sequence[Score]) -> list[str]:
    return sorted({g for s in scores for g in s.groups}, key=_group_key)


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}"


def paired(outcomes: Sequence[EpisodeOutcome], a: str, b: str) -> tuple[int, int, float]:
    """Same questions, two conditions: (a right where b is wrong, b right where a is wrong, two-sided sign-test p).

    The exact binomial test on the discordant pairs (McNemar's exact form): small counts need no approximation.
    """
    marks: dict[str, dict[tuple[str, int], bool]] = {a: {}, b: {}}
    for o in outcomes:
        if o.condition in marks:
            for i, q in enumerate(o.questions):
                marks[o.condition][(o.episode, i)] = q.correct
    keys = marks[a].keys() & marks[b].keys()
    wins = sum(marks[a][k] and not marks[b][k] for k in keys)
    losses = sum(marks[b][k] and not marks[a][k] for k in keys)
    n, k = wins + losses, min(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return wins, losses, p


def constant_baseline(episodes: Sequence[Episode]) -> tuple[str, float]:
    """The best constant answer and its accuracy on these episodes (the majority-answer baseline)."""
    answers = Counter(q.answer for ep in episodes for q in ep.questions)
    if not answers:
        return "", float("nan")
    best, n = answers.most_common(1)[0]
    return best, n / sum(answers.values())


def markdown_table(scores: Sequence[Score]) -> str:
    """Rows: conditions. Columns: accuracy [95% CI], per group, episodes, kills with revive == uninterrupted."""
    groups = groups_of(scores)
    head = ["condition", "accuracy % [95% CI]", *[f"{g} %" for g in groups], "episodes", "questions", "sleeps/ep"]
    head += ["killed → revived (equal / in-flight sleep)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in scores:
        lo, hi = s.interval
        row = [s.condition, f"**{_pct(s.accuracy)}** [{_pct(lo)}, {_pct(hi)}]"]
        for g in groups:
            acc, _, n = s.group_accuracy(g)
            row.append(f"{_pct(acc)} (n={n})" if n else "–")
        row += [str(s.episodes), str(s.questions), f"{s.sleeps:.1f}"]
        row.append(f"{s.kills} ({s.revive_equal} / {s.in_flight})" if s.kills else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def text_table(scores: Sequence[Score]) -> list[list[str]]:
    """The same table as plain cells (for a terminal)."""
    groups = groups_of(scores)
    rows = [["condition", "acc %", "95% CI", *groups, "eps", "revive=="]]
    for s in scores:
        lo, hi = s.interval
        cells = [s.condition, _pct(s.accuracy), f"{_pct(lo)}–{_pct(hi)}"]
        cells += [_pct(s.group_accuracy(g)[0]) for g in groups]
        cells += [str(s.episodes), f"{s.revive_equal}/{s.kills}" if s.kills else "–"]
        rows.append(cells)
    return rows


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Cells as aligned plain text (first row: header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(scores: Sequence[Score], title: str, path: Path) -> Path:
    """Grouped bars: accuracy per question group (k or op) per condition, with 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups_of(scores) or ["all"]
    width = 0.8 / max(1, len(scores))
    fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(groups), 3.6), dpi=110)
    for i, s in enumerate(scores):
        xs, ys, err = [], [], [[], []]
        for j, g in enumerate(groups):
            acc, (lo, hi), n = s.group_accuracy(g)
            if not n:
                continue
            xs.append(j + (i - (len(scores) - 1) / 2) * width)
            ys.append(acc)
            err[0].append(max(0.0, acc - lo))  # rounding can put the Wilson bound a hair past the estimate
            err[1].append(max(0.0, hi - acc))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=s.condition)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact match")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(path: Path, payload: dict[str, Any], outcomes: Sequence[EpisodeOutcome]) -> Path:
    """Every outcome (replies, grades, kills) plus the run's facts, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**payload, "outcomes": [o.model_dump(mode="json") for o in outcomes]}
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


__all__ = [
    "Score",
    "constant_baseline",
    "format_table",
    "groups_of",
    "markdown_table",
    "plot",
    "score",
    "text_table",
    "write_json",
]
