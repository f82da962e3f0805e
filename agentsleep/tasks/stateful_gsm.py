"""Stateful GSM-Symbolic episodes from reasoning-gym: an external check nobody on the team wrote (spec §4.1).

Each reasoning-gym ``gsm_symbolic`` entry becomes an episode: every sentence but the last is context (fed first,
then slept on and evicted, so it survives only in S), the last sentence is the question (Lin et al. 2025,
*Sleep-time Compute*, arXiv 2504.13171). Answers are scored with the dataset's own ``score_answer``; accuracy is the
share of entries scoring exactly 1.0. Record `package_version`, the seed and the entry indices with every result.

reasoning-gym is a test/eval extra (``pip install agentsleep[test]``), imported only when used.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from typing import Any

from agentsleep.errors import ConfigError, InvalidInput

DATASET = "gsm_symbolic"
PINNED_VERSION = "0.1.25"  # templates and scorers can change between releases (spec §4.1)
INSTRUCTION = " Give the result as your final answer. Do not include units."
# A sentence ends at . ! or ? followed by whitespace; decimals ("2.5") have no space after the point. A period after a
# title or an initial ("Dr. Patel", "J. Smith") ends no sentence: such a piece is joined to the next one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TITLES = r"Mr|Mrs|Ms|Mx|Dr|Prof|Sr|Jr|St|Mt|Capt|Gen|Lt|Sgt|Rev|Hon|vs|etc|e\.g|i\.e|[A-Z]"
_NOT_AN_END = re.compile(rf"(?:^|\s)(?:{_TITLES})\.$")


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences at . ! ? followed by whitespace, except after titles, initials and e.g./i.e."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(text.strip()):
        if not piece:
            continue
        if out and _NOT_AN_END.search(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def package_version() -> str:
    try:
        return importlib.metadata.version("reasoning-gym")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError("reasoning-gym is not installed; pip install 'agentsleep[test]'") from exc


@dataclass(frozen=True)
class Episode:
    """One stateful problem: ``context`` sentences first, then ``question`` (plus an answer cue), then score."""

    index: int  # the entry's index in the dataset
    context: tuple[str, ...]
    question: str
    answer: str
    entry: dict[str, Any]  # the raw reasoning-gym entry, needed by score_answer

    @property
    def context_text(self) -> str:
        return " ".join(self.context)


def split_entry(index: int, entry: dict[str, Any]) -> Episode | None:
    """Strip the appended instruction, split into sentences; None for a single-sentence entry (spec §4.1 steps 1-2)."""
    text = entry["question"]
    if text.endswith(INSTRUCTION):
        text = text[: -len(INSTRUCTION)]
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return None
    return Episode(index, tuple(sentences[:-1]), sentences[-1], str(entry["answer"]), entry)


class StatefulGSM:
    """Episodes from ``reasoning_gym.create_dataset("gsm_symbolic", size, seed)``, scored by the dataset itself.

    Args:
        size: entries to draw (single-sentence ones are skipped, so there may be fewer episodes).
        seed: the dataset seed.
        difficulty: reasoning-gym's ``difficulty`` knob.
    """

    def __init__(self, size: int = 200, seed: int = 1, difficulty: float = 1.0) -> None:
        if size < 1:
            raise InvalidInput(f"size must be >= 1, got {size}")
        try:
            import reasoning_gym
        except ImportError as exc:
            raise ConfigError("reasoning-gym is not installed; pip install 'agentsleep[test]'") from exc
        self.version = package_version()
        self.seed = seed
        self.difficulty = difficulty
        self.dataset = reasoning_gym.create_dataset(DATASET, size=size, seed=seed, difficulty=difficulty)
        episodes = (split_entry(i, self.dataset[i]) for i in range(size))
        self.episodes: list[Episode] = [e for e in episodes if e is not None]

    @property
    def indices(self) -> list[int]:
        return [e.index for e in self.episodes]

    def score(self, episode: Episode, answer: str | None) -> float:
        """The dataset's own score: 1.0 correct, 0.01 wrong, 0.0 for None (reasoning-gym 0.1.25)."""
        return float(self.dataset.score_answer(answer, episode.entry))

    def accuracy(self, answers: list[str | None]) -> float:
        """Share of episodes whose answer scores exactly 1.0 (answers in `episodes` order)."""
        if len(answers) != len(self.episodes):
            raise InvalidInput(f"{len(answers)} answers for {len(self.episodes)} episodes")
        return sum(self.score(e, a) == 1.0 for e, a in zip(self.episodes, answers)) / len(self.episodes)

    def self_test(self) -> dict[str, Any]:
        """Harness check (spec §4.1): the true ``answer_value`` scores 1.0 on every episode and None scores 0.0."""
        truth = [str(e.entry["metadata"]["answer_value"]) for e in self.episodes]
        ok_true = all(self.score(e, a) == 1.0 for e, a in zip(self.episodes, truth))
        ok_none = all(self.score(e, None) == 0.0 for e in self.episodes)
        return {"passed": ok_true and ok_none, "answer_value_scores_1": ok_true, "none_scores_0": ok_none}

    def record(self) -> dict[str, Any]:
        """What must accompany every result: package version, seed, difficulty, entry indices."""
        return {
            "dataset": DATASET,
            "package": "reasoning-gym",
            "version": self.version,
            "pinned_version": PINNED_VERSION,
            "seed": self.seed,
            "difficulty": self.difficulty,
            "indices": self.indices,
        }
