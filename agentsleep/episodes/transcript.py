"""Readable transcripts of English episodes: the messages as the agent heard them, where it slept, the question, each
condition's answer and the expected one.

Sleep points are re-derived from the episode with the drivers' own rules (`agentsleep.episodes.drivers`) and the
replies the agent actually gave, so they are deterministic (a background sleep's timing never shows); `sleep_marks`
returns the count as well, and the report says whether it equals the sleeps the agent's session recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from agentsleep.episodes.types import Episode, EpisodeOutcome
from agentsleep.tasks.english import soft_limit


@dataclass(frozen=True)
class SleepMark:
    """Whether the agent slept right before a turn (and why), and whether it slept after it."""

    before: str | None  # None, "idle" (sleep_before: between hearing and being asked) or "full" (would not fit)
    after: bool  # the window reached the soft threshold after this turn (a background sleep)
    window_tokens: int  # tokens in the window once the turn and its reply are in


def sleep_marks(
    episode: Episode, replies: Sequence[Sequence[int]], window: int, soft_threshold: float
) -> tuple[list[SleepMark], int]:
    """Per turn, the sleeps the drivers' rules give with these replies; and their total."""
    limit = soft_limit(window, soft_threshold)
    marks, w, total = [], 0, 0
    for turn, reply in zip(episode.turns, replies):
        before = None
        if w and turn.sleep_before:
            before = "idle"
        elif w and w + len(turn.ids) + episode.reserve > window:
            before = "full"
        if before:
            total, w = total + 1, 0
        w += len(turn.ids) + len(reply)
        after = w >= limit
        marks.append(SleepMark(before, after, w))
        if after:
            total, w = total + 1, 0
    return marks, total


def _said(tokenizer: Tokenizer, episode: Episode, reply: Sequence[int]) -> str:
    body = [int(t) for t in episode.answer_of(reply) if t not in episode.stop_ids]
    return tokenizer.decode(body, skip_special_tokens=False) or "(nothing)"


def render(
    episode: Episode,
    outcomes: Mapping[str, EpisodeOutcome],
    tokenizer: Tokenizer,
    *,
    window: int,
    soft_threshold: float,
    sleeper: str,
) -> list[str]:
    """One episode as text lines (Markdown-safe inside a code block).

    Args:
        outcomes: condition name -> this episode's outcome under it (answers are shown in this order).
        sleeper: the condition whose sleep points are drawn (a sleeping one; they are shared by every N).
    """
    q = episode.questions[0]
    ref = outcomes[sleeper]
    marks, total = sleep_marks(episode, ref.replies, window, soft_threshold)
    lines = [f"{episode.id}: {q.group.replace('=', ' = ')}, expected answer: {q.answer}"]
    n = 0
    for turn, mark in zip(episode.turns, marks):
        if mark.before:
            n += 1
            why = "idle before the question" if mark.before == "idle" else "the next message would not fit"
            lines.append(f"      [sleep {n}: {why}; the window is consolidated into S and cleared]")
        text = tokenizer.decode(list(turn.ids), skip_special_tokens=False)
        tag = "   (small talk)" if turn.role == "distractor" else ""
        lines.append(f"  user: {text}{tag}")
        if turn.question is not None:
            for name, o in outcomes.items():
                said = _said(tokenizer, episode, o.replies[episode.turns.index(turn)])
                mark_ok = "right" if o.questions[turn.question].correct else "wrong"
                lines.append(f"  agent ({name}): {said}   [{mark_ok}]")
        elif mark.after:
            n += 1
            lines.append(f"      [sleep {n}: window {mark.window_tokens}/{window} tokens, past the soft threshold]")
    if total != ref.sleeps:
        lines.append(f"  (note: {ref.sleeps} sleeps recorded by the session, {total} re-derived here)")
    return lines


def pick(episodes: Sequence[Episode], by: Mapping[str, Mapping[str, EpisodeOutcome]], best: str, n1: str | None,
         k: int = 4) -> list[Episode]:  # fmt: skip
    """Up to ``k`` episodes worth reading: where the best N is right and N = 1 wrong, one of each question group,
    then the rest in order."""
    chosen: list[Episode] = []

    def right(cond: str | None, ep: Episode) -> bool:
        return cond is not None and ep.id in by.get(cond, {}) and by[cond][ep.id].questions[0].correct

    wins = [e for e in episodes if right(best, e) and n1 is not None and not right(n1, e)]
    groups: dict[str, Episode] = {}
    for e in episodes:
        groups.setdefault(e.questions[0].group, e)
    for e in [*wins[:1], *sorted(groups.values(), key=lambda e: e.questions[0].group), *episodes]:
        if e not in chosen and len(chosen) < k:
            chosen.append(e)
    return chosen


__all__ = ["SleepMark", "pick", "render", "sleep_marks"]
