"""What an episode is: turns in the model's own token language, the questions among them, and how answers score.

An `Episode` is pure data (JSON round-trips it exactly), so the same object runs through every driver — the embedded
`AgentHost` stack here, the LangChain stack in ``evals/episodes`` — and through a fresh process after a kill.

A turn is one user message. Its ids are a span of the task's token stream; rendered with a content-only chat template
the window sees exactly those ids, i.e. the layout the checkpoint was trained on. A turn with ``reply == 0`` is a fact
the agent only takes in; a turn with ``reply > 0`` asks a question and the agent answers with at most that many tokens,
stopping at any of the episode's ``stop_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agentsleep.errors import InvalidInput

Kind = Literal["depo", "gsm", "stateful_gsm", "family", "gsm_english"]
ENGLISH_KINDS: tuple[str, ...] = ("family", "gsm_english")  # readable episodes, scored by reasoning-gym


class Turn(BaseModel):
    """One user message of an episode."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ids: tuple[int, ...] = Field(min_length=1, description="the message's token ids (content only)")
    reply: int = Field(0, ge=0, description="reply tokens at most; 0 = a fact to take in, no reply")
    question: int | None = Field(None, ge=0, description="index into Episode.questions when this turn asks one")
    sleep_before: bool = Field(False, description="the agent sleeps before this turn (it was idle: between tasks)")
    role: str = Field("fact", description="fact | distractor | question (for reports)")


class Question(BaseModel):
    """What a question turn expects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    expected: tuple[int, ...] = Field(description="the answer's token ids, stop token included")
    group: str = Field(description="the report bucket, e.g. 'k=4' or 'op=3'")
    answer: str = Field(description="the answer as text (for reports)")
    meta: dict[str, Any] = Field(default_factory=dict)


class Episode(BaseModel):
    """A long-horizon agent episode: facts over many turns, questions after they were evicted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="unique and stable: also the agent id and the LangGraph thread id")
    kind: Kind
    variant: str = Field(description="e.g. 'decoys', 'no_decoys', 'question_last', 'question_first'")
    turns: tuple[Turn, ...]
    questions: tuple[Question, ...]
    stop_ids: tuple[int, ...] = Field(description="a reply ends at any of these ids (kept in the window)")
    stop_text: str = Field(description="the same stop as a string of the decoded reply (LangChain's `stop`)")
    reserve: int = Field(ge=0, description="room kept for a reply when deciding whether a turn fits the window")
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Tokens the user sends over the episode (replies excluded)."""
        return sum(len(t.ids) for t in self.turns)

    @property
    def max_tokens(self) -> int:
        """Everything the window would hold if nothing were ever evicted (user tokens + reply budgets)."""
        return self.n_tokens + sum(t.reply for t in self.turns)

    def question_turns(self) -> list[int]:
        return [i for i, t in enumerate(self.turns) if t.question is not None]

    def answer_of(self, reply: Sequence[int]) -> tuple[int, ...]:
        """The answer a reply gives: its tokens up to and including the first stop id."""
        out: list[int] = []
        for tok in reply:
            out.append(int(tok))
            if tok in self.stop_ids:
                break
        return tuple(out)

    def grade(self, replies: Sequence[Sequence[int] | None]) -> list[bool]:
        """Per question, whether the reply to its turn gives the expected answer (exact token match).

        Args:
            replies: one entry per turn (None or empty for turns without a reply).
        """
        if len(replies) != len(self.turns):
            raise InvalidInput(f"{len(replies)} replies for {len(self.turns)} turns")
        out = [False] * len(self.questions)
        for turn, reply in zip(self.turns, replies):
            if turn.question is not None:
                out[turn.question] = (
                    reply is not None and self.answer_of(reply) == self.questions[turn.question].expected
                )
        return out


class QuestionOutcome(BaseModel):
    """One graded question."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group: str
    correct: bool
    answer: str  # what the agent said (decoded)
    expected: str


class EpisodeOutcome(BaseModel):
    """One episode under one condition: every reply, every grade, what sleeping and the kill did."""

    model_config = ConfigDict(extra="forbid")

    episode: str
    condition: str
    replies: list[list[int]]  # one per turn
    questions: list[QuestionOutcome]
    sleeps: int = 0
    killed_at: int | None = None  # the turn after which the process was SIGKILLed (None: uninterrupted)
    killed_in_flight: bool | None = None  # a background sleep was scheduled or running when the kill was ordered
    revive_equal: bool | None = None  # replies equal the uninterrupted run's (None: not compared)
    seconds: float = 0.0

    @property
    def n_correct(self) -> int:
        return sum(q.correct for q in self.questions)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (good at small n and at 0 or n successes)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (rounding would leave 1e-17 off)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


__all__ = ["ENGLISH_KINDS", "Episode", "EpisodeOutcome", "Kind", "Question", "QuestionOutcome", "Turn", "wilson"]
