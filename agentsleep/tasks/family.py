"""Family relationships in English, from reasoning-gym's ``family_relationships`` generator (spec/tasks.md §4.1).

Each example is one reasoning-gym entry: a short story about a family (``Jacob is married to Lisa. They have
children called Olivia and Atlas.``) and a question about two of its members (``What is Lisa to Atlas?``), answered
with one word (``mother``) and scored by reasoning-gym's own ``score_answer``. The story's sentences arrive as
messages, optionally mixed with distractor small talk (`agentsleep.tasks.english.CHATTER`), laid out on windows of L
tokens exactly as an agent sleeps between messages (`english.lay_out`); the question opens a window of its own, so
every fact it needs survives only in the fast weights S::

    | Robert is married to Anna . They have a child called Mia . <pad> ... |      window 0   (N passes)
    | Mia is married to Owen . The train was late again . <pad> ...        |      window 1   (N passes)
    | They have children called Zoe and Kai . <pad> ...                    |      window 2   (N passes)
    | What is Anna to Zoe ? grandmother <eos> <pad> ...                     |      label window (one pass)

Hops: the number of family relations (married-to, parent-of) the answer composes — spouse, parent and child 1; sibling,
grandparent and in-law 2; aunt, uncle, niece and nephew 3 (reasoning-gym asks those only in families of more than
8). The held-out splits cycle through the available hop counts, so each is measured on the same number of questions;
training keeps reasoning-gym's own mix (about 70% one-hop at family sizes 4-8). Metrics: ``exact`` and ``exact_k{h}``.

The size knob is ``max_family_size`` (with ``min_family_size``, reasoning-gym's own knobs: more people, more couples,
more sentences), with ``L`` and ``chatter`` (up to that many distractor messages per story) deciding how many windows
the facts fill.

Seeds: example j of (split, seed) seeds reasoning-gym with a 64-bit integer drawn from its own
`numpy.random.SeedSequence` stream (reasoning-gym seeds ``random.Random(seed + index)``, so consecutive plain seeds
would overlap across splits). Train and val skip the stories of the canonical test set. The question's instruction
tail (``Respond only with the word ...``) is dropped: the model answers with one word by construction.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
from typing import Any, Literal, cast

import numpy as np
from pydantic import Field, model_validator

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.tasks.base import (
    BOS,
    EOS,
    PAD,
    UNK,
    Batch,
    Split,
    TaskConfig,
    answer_words,
    check_split,
    exact_by,
    example_rng,
    right_padded,
    seed_sequence,
)
from agentsleep.tasks.english import CHATTER, derived_seed, encode_strict, lay_out, words_of

DATASET = "family_relationships"
PINNED_VERSION = "0.1.25"  # the story and question templates below are this release's
MAX_DRAWS = 2_000  # reasoning-gym entries tried per example before giving up with a ConfigError

# The words of reasoning-gym 0.1.25's story and question templates (the names and relation words come from the
# package itself, see `_package_words`). A release that writes other words fails loudly in `encode_strict`.
TEMPLATE_TEXT = (
    "is married to.",
    "They have a child called.",
    "They have children called, and.",
    "What is to?",
    "How is related to?",
    "What relation is to?",
)

HOPS: dict[str, int] = {
    **dict.fromkeys(("husband", "wife", "mother", "father", "son", "daughter"), 1),
    **dict.fromkeys(("brother", "sister", "grandmother", "grandfather", "mother-in-law", "father-in-law"), 2),
    **dict.fromkeys(("aunt", "uncle", "niece", "nephew"), 3),
}

_SENTENCE_END = re.compile(r"(?<=\.)\s+")
_QUESTION = re.compile(r"^[^?]*\?")


def _require_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ConfigError("the English tasks need reasoning-gym: pip install 'agentsleep[test]'") from exc
    return reasoning_gym


@functools.cache
def _package_words() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(male names, female names, relation words) as reasoning-gym defines them."""
    _require_gym()
    from reasoning_gym.graphs.family_relationships import FamilyRelationshipsConfig, Relationship

    cfg = FamilyRelationshipsConfig()
    return tuple(cfg.male_names), tuple(cfg.female_names), tuple(r.value for r in Relationship)


def package_version() -> str:
    try:
        return importlib.metadata.version("reasoning-gym")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError("reasoning-gym is not installed; pip install 'agentsleep[test]'") from exc


class FamilyConfig(TaskConfig):
    """Family stories from reasoning-gym, word-level tokens, laid out as an agent hears them. Defaults: reasoning-gym's
    own family sizes and names; the ``toy`` preset is the CPU-trained setting."""

    task_name = "family"
    task_id = 6

    window_size: int = Field(16, ge=8, alias="L", description="L: the window, in words and punctuation marks")
    min_family_size: int = Field(4, ge=3, description="reasoning-gym's knob: people per family ~ U{min..max}")
    max_family_size: int = Field(8, ge=3, description="the size knob: more people, couples, sentences (> 8: 3 hops)")
    chatter: int = Field(2, ge=0, description="distractor small-talk messages per story ~ U{0..chatter}")
    names_per_gender: int = Field(
        0, ge=0, description="draw names from the first n of reasoning-gym's male and female lists (0: all of them)"
    )
    reserve: int = Field(2, ge=0, description="reply tokens kept free when packing (the agent's reply reserve)")
    soft_threshold: float = Field(0.8, gt=0.0, le=1.0, description="a window closes once this full (SleepPolicy)")
    question_hops: tuple[int, ...] = Field(
        (), description="train only on questions of these hop counts (empty: reasoning-gym's natural mix)"
    )
    test_size: int = Field(2000, ge=0, description="size of the canonical test set whose stories train/val avoid")
    test_seed: int = Field(0, ge=0, description="seed of the canonical test set")
    dedup: bool = Field(True, description="train/val skip test stories; the test split has no duplicates")

    @model_validator(mode="after")
    def _ranges(self) -> FamilyConfig:
        if self.min_family_size > self.max_family_size:
            raise ValueError(f"min_family_size {self.min_family_size} > max_family_size {self.max_family_size}")
        male, female, _ = _package_words()
        if self.names_per_gender > min(len(male), len(female)):
            raise ValueError(f"names_per_gender must be at most {min(len(male), len(female))}")
        if self.names_per_gender and self.names_per_gender * 2 < self.max_family_size:
            raise ValueError(f"{self.names_per_gender} names per gender cannot name families of {self.max_family_size}")
        if self.chatter > len(CHATTER):
            raise ValueError(f"chatter must be at most {len(CHATTER)} (distinct lines), got {self.chatter}")
        bad = [h for h in self.question_hops if h not in self.available_hops]
        if bad:
            raise ValueError(f"question_hops {bad} cannot occur with families of at most {self.max_family_size}")
        return self

    def names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(male, female) names the stories use."""
        male, female, _ = _package_words()
        n = self.names_per_gender
        return (male[:n], female[:n]) if n else (male, female)

    @property
    def available_hops(self) -> tuple[int, ...]:
        """Hop counts reasoning-gym can ask at this family size (aunts, uncles, nieces, nephews need > 8 people)."""
        return (1, 2, 3) if self.max_family_size > 8 else (1, 2)

    def tokenizer_mode(self) -> Literal["english"]:  # type: ignore[override]
        return "english"

    def build_vocab(self) -> list[str]:
        _, _, relations = _package_words()
        male, female = self.names()
        words = words_of([*TEMPLATE_TEXT, *CHATTER])
        out: dict[str, None] = dict.fromkeys([PAD, BOS, EOS, UNK, *words, *relations, *male, *female])
        return list(out)

    @property
    def window(self) -> int:
        return self.window_size

    @property
    def max_windows(self) -> int:
        """A bound on a row's windows: every sentence in a window of its own, plus the question window."""
        return 2 * self.max_family_size + self.chatter + 1

    @property
    def seq_len(self) -> int:
        return self.max_windows * self.window_size

    @property
    def eos_id(self) -> int:
        return self.token_index()[EOS]

    def encode(self, text: str) -> list[int]:
        """Ids of English text; `InvalidInput` naming any word this task's vocabulary lacks."""
        return encode_strict(self.token_index(), text, "family")

    def describe(self) -> str:
        return (
            f"family: reasoning-gym {DATASET}, family size {self.min_family_size}-{self.max_family_size}, "
            f"chatter 0-{self.chatter}, names {self.names_per_gender or 'all'} per gender, L={self.window}, "
            f"vocab {self.vocab_size}"
        )


PRESETS: dict[str, FamilyConfig] = {
    # What the shipped checkpoints were trained on (docs/english.md): two couples, 16 names, 2-4 story windows.
    "toy": FamilyConfig(max_family_size=6, names_per_gender=8),
    # Bigger families: uncles, aunts, nieces and nephews (3 hops), more couples, more windows.
    "large": FamilyConfig(min_family_size=6, max_family_size=11, L=24),
    "paper": FamilyConfig(min_family_size=6, max_family_size=11, L=64, chatter=8),
}


# --------------------------------------------------------------------------------------------------- generation


def _entry(cfg: FamilyConfig, seed: int) -> dict[str, Any]:
    gym = _require_gym()
    male, female = cfg.names()
    ds = gym.create_dataset(
        DATASET,
        size=1,
        seed=seed,
        min_family_size=cfg.min_family_size,
        max_family_size=cfg.max_family_size,
        male_names=list(male),
        female_names=list(female),
    )
    return cast(dict[str, Any], ds[0])


def parse_entry(entry: dict[str, Any]) -> tuple[list[str], str]:
    """A reasoning-gym entry's story sentences and its question (the instruction tail dropped)."""
    story, sep, asked = entry["question"].partition("\n\n")
    match = _QUESTION.match(asked.strip())
    if not sep or match is None:
        version = package_version()
        raise InvalidInput(f"unexpected {DATASET} entry layout (reasoning-gym {version}): {entry['question']!r}")
    return [s for s in _SENTENCE_END.split(story.strip()) if s], match.group(0)


def story_key(sentences: list[str], question: str) -> str:
    return hashlib.sha1(("\n".join(sentences) + "\x00" + question).encode()).hexdigest()[:20]


def _draw(cfg: FamilyConfig, split: Split, seed: int, j: int, want: tuple[int, ...], exclude: frozenset[str]) -> dict:
    """Example j: the first reasoning-gym entry of its stream whose hop count is wanted and story is allowed."""
    for draw in range(MAX_DRAWS):
        rg_seed = derived_seed(seed_sequence(cfg.task_id, split, seed, j, 2, draw))
        entry = _entry(cfg, rg_seed)
        relation = entry["answer"]
        if relation not in HOPS:
            raise InvalidInput(f"reasoning-gym answered {relation!r}, a relation this task does not know")
        if want and HOPS[relation] not in want:
            continue
        sentences, question = parse_entry(entry)
        key = story_key(sentences, question)
        if key in exclude:
            continue
        return {"entry": entry, "rg_seed": rg_seed, "sentences": sentences, "question": question, "key": key}
    raise ConfigError(f"family: no acceptable question with hops {want} in {MAX_DRAWS} draws; widen the family size")


def _wanted_hops(cfg: FamilyConfig, split: Split, j: int) -> tuple[int, ...]:
    if split == "train":
        return cfg.question_hops
    hops = cfg.question_hops or cfg.available_hops
    return (hops[j % len(hops)],)  # val/test: balanced over the hop counts


_TEST_KEYS: dict[str, frozenset[str]] = {}


def test_keys(cfg: FamilyConfig) -> frozenset[str]:
    """Story hashes of the canonical test set (``test_size`` examples at ``test_seed``), cached per config."""
    ck = cfg.model_dump_json()
    if ck not in _TEST_KEYS:
        seen: set[str] = set()
        for j in range(cfg.test_size):  # the same draws as generate("test", ...): no duplicate story
            seen.add(_draw(cfg, "test", cfg.test_seed, j, _wanted_hops(cfg, "test", j), frozenset(seen))["key"])
        _TEST_KEYS[ck] = frozenset(seen)
    return _TEST_KEYS[ck]


def messages(cfg: FamilyConfig, sentences: list[str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """The story's sentences as (text, role) messages with distractor chatter inserted between families' blocks.

    Chatter goes only before a "... is married to ..." sentence or at the end, never between a couple and the
    "They have ..." sentence whose "They" refers to it.
    """
    blocks: list[list[str]] = []
    for s in sentences:
        if s.startswith("They ") and blocks:
            blocks[-1].append(s)
        else:
            blocks.append([s])
    n_chat = int(rng.integers(0, cfg.chatter + 1))
    lines = rng.choice(len(CHATTER), size=n_chat, replace=False).tolist() if n_chat else []
    slots = sorted(int(rng.integers(0, len(blocks) + 1)) for _ in lines)  # a chatter line before block `slot`
    out: list[tuple[str, str]] = []
    it = iter(zip(slots, lines))
    nxt = next(it, None)
    for b in range(len(blocks) + 1):
        while nxt is not None and nxt[0] == b:
            out.append((CHATTER[nxt[1]], "distractor"))
            nxt = next(it, None)
        if b < len(blocks):
            out += [(s, "fact") for s in blocks[b]]
    return out


def generate(split: Split, n: int, seed: int, config: FamilyConfig | None = None, **overrides: Any) -> Batch:
    """``n`` family questions: story messages on windows, then a question window with the one-word answer."""
    check_split(split)
    if n < 0:
        raise InvalidInput(f"n must be >= 0, got {n}")
    cfg = cast(FamilyConfig, (config or FamilyConfig()).with_overrides(**overrides))
    exclude = test_keys(cfg) if cfg.dedup and split != "test" else frozenset()
    seen: set[str] = set()
    rows, metas = [], []
    for j in range(n):
        ex = _draw(cfg, split, seed, j, _wanted_hops(cfg, split, j), exclude | (seen if split == "test" else set()))
        seen.add(ex["key"])
        rng = example_rng(cfg.task_id, split, seed, j, 1)
        msgs = messages(cfg, ex["sentences"], rng)
        turns = [cfg.encode(text) for text, _ in msgs]
        question = cfg.encode(ex["question"])
        relation = ex["entry"]["answer"]
        answer = [*cfg.encode(relation), cfg.eos_id]
        tokens, mask, groups = lay_out(
            turns,
            question,
            answer,
            window=cfg.window,
            reserve=cfg.reserve,
            soft_threshold=cfg.soft_threshold,
            pad_id=cfg.pad_id,
        )
        rows.append((tokens, mask))
        md = ex["entry"]["metadata"]
        metas.append(
            {
                "k": HOPS[relation],
                "relation": relation,
                "answer": relation,
                "question": ex["question"],
                "messages": [{"text": t, "role": r} for t, r in msgs],
                "windows": groups,
                "n_windows": len(groups) + 1,
                "person1": md["person1"],
                "person2": md["person2"],
                "family_size": md["family_size"],
                "rg_seed": ex["rg_seed"],
                "key": ex["key"],
                "text": " ".join(t for t, _ in msgs) + " " + ex["question"] + " " + relation,
            }
        )
    return right_padded(rows, metas, cfg)


# --------------------------------------------------------------------------------------------------- scoring


@functools.cache
def _scorer() -> Any:
    return _require_gym().create_dataset(DATASET, size=1, seed=0)


def score_answer(answer: str | None, relation: str) -> float:
    """reasoning-gym's own score of an answer to a question whose answer is ``relation`` (1.0 = correct)."""
    return float(_scorer().score_answer(answer, {"answer": relation}))


def predicted_answers(predictions: Any, batch: Batch, config: FamilyConfig) -> list[str]:
    """Each row's answer as greedy decoding would give it: the argmax words at the answer positions, up to the first
    predicted ``<eos>`` (a missing ``<eos>`` keeps the next word, so the answer is wrong, as a reply would be)."""
    return [" ".join(words) for words in answer_words(predictions, batch, config.vocab())]


def score(predictions: Any, batch: Batch, config: FamilyConfig | None = None) -> dict[str, float]:
    """``exact`` (reasoning-gym's ``score_answer`` == 1.0) overall and ``exact_k{h}`` per hop count."""
    if len(batch) == 0:
        raise InvalidInput("cannot score an empty batch")
    cfg = config or FamilyConfig()
    answers = predicted_answers(predictions, batch, cfg)
    correct = np.array([score_answer(a, m["answer"]) == 1.0 for a, m in zip(answers, batch.meta)])
    return exact_by(correct, batch)


__all__ = [
    "DATASET",
    "HOPS",
    "PINNED_VERSION",
    "PRESETS",
    "FamilyConfig",
    "generate",
    "messages",
    "package_version",
    "parse_entry",
    "predicted_answers",
    "score",
    "score_answer",
]
