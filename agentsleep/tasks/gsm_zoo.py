"""Realistic GSM-Infinite-style problems, "zoo" template, forward mode (`spec/tasks.md` §3.4).

Written from the spec only (GSM-Infinite has no licence; see `gsm`); the construction is iGSM's (Ye et al., arXiv
2407.20311). All entity lists and phrasings below are ours. Layout (spec §3.5), question first::

    <header note> Question: How many adult owls live in Cedar Marsh? Problem: <sentence> <sentence> … Answer: 12<eos>

Quantities: instance parameters I(loc, animal) (one defining sentence each) and implicit totals Tot(loc) (the sum of
the loc's instance parameters; no sentence defines them, the header states the convention). A quantity's op cost is
its number of direct inputs (a constant counts as one; a total's cost is its number of addends); a problem's op is
the sum of the costs of the question and of everything it depends on. Length noise: sentences about distractor
(location, animal) pairs that read core quantities; nothing depends on them.

Tokens: a word-level vocabulary over the generator's closed word set (words and punctuation split apart, every digit
its own token) for from-scratch toys. A pretrained model re-tokenises ``meta["text"]``. Only the medium level
(2-entity relations) is implemented; the hard level and reverse mode (spec §3.4 optional items) are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, cast

import numpy as np
from pydantic import Field, model_validator
from tokenizers import Tokenizer

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.tasks.base import BOS, EOS, PAD, UNK, Batch, Split, build_tokenizer
from agentsleep.tasks.gsm import Core, GSMConfig, core_key, generate_rows
from agentsleep.tasks.tokencount import count_cl100k

# --------------------------------------------------------------------------------------------------- entities (ours)

CORE_LOCATIONS: tuple[tuple[str, ...], ...] = (
    ("Cedar Marsh", "Pine Ridge", "Willow Creek", "Stone Canyon", "Misty Fen"),  # wild places
    ("Riverside Zoo", "Maple Farm", "North Sanctuary", "Oak Valley Park", "Hilltop Reserve"),  # places people run
)
CORE_ANIMALS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("wolf", "wolves"), ("otter", "otters"), ("bear", "bears"), ("fox", "foxes"), ("badger", "badgers")),  # mammals
    (("owl", "owls"), ("heron", "herons"), ("crane", "cranes"), ("eagle", "eagles"), ("swan", "swans")),  # birds
)
NOISE_LOCATIONS: tuple[str, ...] = (
    "Amber Lake", "Birch Meadow", "Copper Bay", "Dune Flats", "Elm Hill", "Frost Peak",
    "Granite Gorge", "Hazel Wood", "Iron Bluff", "Juniper Glen", "Coral Cove", "Lantern Point",
)  # fmt: skip
NOISE_ANIMALS: tuple[tuple[str, str], ...] = (
    ("beaver", "beavers"), ("lynx", "lynxes"), ("hare", "hares"), ("weasel", "weasels"), ("raccoon", "raccoons"),
    ("squirrel", "squirrels"), ("raven", "ravens"), ("finch", "finches"), ("robin", "robins"), ("stork", "storks"),
    ("pelican", "pelicans"), ("sparrow", "sparrows"), ("ferret", "ferrets"), ("mole", "moles"),
)  # fmt: skip

HEADER = (
    "Note: the total number of adult animals in a place counts only the kinds of animals mentioned for that place, "
    "and a kind of animal never mentioned for a place does not live there. Each problem stands alone."
)
# Fixed words of every phrasing below; with the entity names and digits they close the vocabulary.
_PHRASES = (
    "The number of adult in is more than times the sum of plus minus equals has and , . ? :",
    "the total number of adult animals in How many live altogether Question Problem Answer",
)

Form = Literal["const", "copy", "more", "times", "plus", "minus", "total"]


@dataclass(frozen=True)
class Quantity:
    """An instance parameter (``animal`` set) or a location total (``animal`` None)."""

    loc: str
    animal: tuple[str, str] | None
    form: Form
    inputs: tuple[int, ...]  # indices into the problem's quantity list
    const: int | None
    value: int

    @property
    def cost(self) -> int:
        return len(self.inputs) + (self.const is not None)

    def ref(self) -> str:
        """How other sentences name this quantity."""
        if self.animal is None:
            return f"the total number of adult animals in {self.loc}"
        return f"the number of adult {self.animal[1]} in {self.loc}"


def _combine(form: Form, const: int | None, vals: list[int]) -> int:
    if form == "const":
        return cast(int, const)
    if form == "copy":
        return vals[0]
    if form == "minus":
        return vals[0] - vals[1]
    base = sum(vals)
    if form == "more":
        return cast(int, const) + base
    if form == "times":
        return cast(int, const) * base
    return base  # plus, total


def sentence(q: Quantity, qs: list[Quantity]) -> str:
    """The defining sentence of an instance parameter (spec §3.4 statement forms, our wording)."""
    if q.animal is None:
        raise InvalidInput("totals are implicit: no sentence defines them")
    refs = [qs[i].ref() for i in q.inputs]
    if q.form == "const":
        noun = q.animal[0] if q.const == 1 else q.animal[1]
        return f"{q.loc} has {q.const} adult {noun}."
    subject = f"The number of adult {q.animal[1]} in {q.loc}"
    if q.form == "copy":
        return f"{subject} equals {refs[0]}."
    if q.form == "minus":
        return f"{subject} is {refs[0]} minus {refs[1]}."
    if q.form == "plus":
        return f"{subject} is {' plus '.join(refs)}."
    if len(refs) == 1:
        operand = refs[0]
    else:
        operand = f"the sum of {', '.join(refs[:-1])} and {refs[-1]}"
    word = "more than" if q.form == "more" else "times"
    return f"{subject} is {q.const} {word} {operand}."


def question_text(q: Quantity) -> str:
    if q.animal is None:
        return f"How many adult animals live in {q.loc} altogether?"
    return f"How many adult {q.animal[1]} live in {q.loc}?"


# --------------------------------------------------------------------------------------------------- config


class GSMZooConfig(GSMConfig):
    """Realistic zoo generator (spec §3.4). Defaults: the paper's band (2,000-3,300 tokens, L = 2000).

    The band is counted in this task's own (word-level) tokens by default, so every row spans 2 windows and the
    question is always evicted, as in the paper. Counting in cl100k instead (``count_with="cl100k"``, spec §3.5 for
    from-scratch toys) leaves rows with fewer word-level tokens than cl100k tokens (about 0.87x), and a quarter of
    them would then fit in one window. ``meta["n_tokens_cl100k"]`` is recorded either way.
    """

    task_name = "gsm_zoo"
    task_id = 4

    window_size: int = Field(2000, ge=8, alias="L", description="L: the window, in this task's word-level tokens")
    # 2001: a 2,000-token row would fit in one window of 2,000 and never be slept on.
    min_tokens: int = Field(2001, ge=0, description="target length ~ U[min_tokens, max_tokens] (whole sequence)")
    max_tokens: int = Field(3300, ge=1, description="hard cap: noise stops before it; longer cores are resampled")
    count_with: Literal["model", "cl100k"] = Field("model", description="unit of min/max_tokens (spec §3.5)")
    ip_max: int = Field(20, ge=2, description="at most this many instance parameters (location, animal) pairs")
    input_probs: tuple[float, float, float, float] = Field(
        (0.3, 0.35, 0.25, 0.1), description="P(p = 0, 1, 2, 3 non-constant inputs) per instance parameter"
    )
    max_value: int = Field(1000, ge=1, description="reject problems whose question depends on a larger value")
    header: bool = Field(True, description="state the totals convention once at the start (spec §3.4 step 10)")

    @model_validator(mode="after")
    def _probs(self) -> GSMZooConfig:
        if abs(sum(self.input_probs) - 1.0) > 1e-9 or min(self.input_probs) < 0:
            raise ValueError(f"input_probs must be a distribution, got {self.input_probs}")
        return self

    def build_vocab(self) -> list[str]:
        return _zoo_vocab()

    def tokenizer_mode(self) -> Literal["chars", "words", "words_digits"]:
        return "words_digits"

    def describe(self) -> str:
        noise = f"{self.min_tokens}-{self.max_tokens} {self.count_with} tokens" if self.noise else "no length noise"
        return (
            f"gsm_zoo: ops {self.ops[0]}-{self.ops[1]}, <= {self.ip_max} instance parameters, {noise}, "
            f"L={self.window}, vocab {self.vocab_size}"
        )


ZOO_PRESETS: dict[str, GSMZooConfig] = {
    "paper": GSMZooConfig(),
    # From-scratch CPU toy (spec §3.6 "possible middle ground"; unmeasured): word-level tokens, no length noise.
    "toy": GSMZooConfig(noise=False, count_with="model", min_tokens=0, max_tokens=384, ip_max=12, L=64),
}


@lru_cache(maxsize=1)
def _zoo_vocab() -> list[str]:
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    names = [*CORE_LOCATIONS[0], *CORE_LOCATIONS[1], *NOISE_LOCATIONS]
    for group in (*CORE_ANIMALS, NOISE_ANIMALS):
        names += [w for pair in group for w in pair]
    words = {p for text in (*_PHRASES, HEADER, *names) for p, _ in split.pre_tokenize_str(text)}
    digits = list("0123456789")
    return [PAD, BOS, EOS, UNK, *digits, *sorted(words - set(digits))]


@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return build_tokenizer(GSMZooConfig())


# --------------------------------------------------------------------------------------------------- generator


def _choice(rng: np.random.Generator, items: list[Any] | tuple[Any, ...], k: int) -> list[Any]:
    return [items[i] for i in rng.choice(len(items), size=k, replace=False).tolist()]


def _define(
    rng: np.random.Generator, p: int, with_const: bool, available: list[int], qs: list[Quantity]
) -> tuple[Form, tuple[int, ...], int | None]:
    """Pick inputs and a statement form: p non-constant inputs, plus a constant when asked (always when p = 0)."""
    inputs = tuple(_choice(rng, available, p))
    if p == 0:
        return "const", (), int(rng.integers(1, 5))  # bare values 1..4
    if with_const:
        if rng.random() < 0.5:  # "more than" and "times" equally likely (spec §3.4)
            return "more", inputs, int(rng.integers(1, 5))
        return "times", inputs, int(rng.integers(2, 5))
    if p == 1:
        return "copy", inputs, None
    if p == 2 and rng.random() < 0.5:
        return "minus", inputs, None
    return "plus", inputs, None


def _ops_and_validity(qs: list[Quantity], max_value: int) -> tuple[list[int], list[bool]]:
    """Per quantity: its problem op (costs summed over itself and its transitive inputs) and whether every value it
    depends on is acceptable (non-negative, non-zero unless a total, at most max_value; spec §3.4 step 5)."""
    closure: list[set[int]] = []
    for i, q in enumerate(qs):  # inputs always precede their users
        c = {i}
        for j in q.inputs:
            c |= closure[j]
        closure.append(c)

    def ok(q: Quantity) -> bool:
        return 0 <= q.value <= max_value and (q.value > 0 or q.animal is None)

    good = [ok(q) for q in qs]
    ops = [sum(qs[j].cost for j in c) for c in closure]
    return ops, [all(good[j] for j in c) for c in closure]


def draw_zoo_core(cfg: GSMZooConfig, rng: np.random.Generator, op: int) -> Core | None:
    """One structure draw (spec §3.4 steps 1-7); None when it has no acceptable question of this op."""
    locs_all = CORE_LOCATIONS[int(rng.integers(0, len(CORE_LOCATIONS)))]
    animals_all = CORE_ANIMALS[int(rng.integers(0, len(CORE_ANIMALS)))]
    w0, w1 = sorted(rng.integers(2, 6, size=2).tolist())
    locs = _choice(rng, locs_all, int(rng.integers(w0, w1 + 1)))
    animals = _choice(rng, animals_all, int(rng.integers(w0, w1 + 1)))
    n_l, n_a = len(locs), len(animals)
    lo_e, hi_e = max(n_l, n_a), min(n_l * n_a, cfg.ip_max)
    if lo_e > hi_e:
        return None
    e = int(rng.integers(lo_e, hi_e + 1))
    # Cover every location and every animal with max(n_l, n_a) distinct pairs, then add random distinct pairs.
    pairs = [(i % n_l, i % n_a) for i in range(lo_e)]
    cover = set(pairs)
    rest = [(a, b) for a in range(n_l) for b in range(n_a) if (a, b) not in cover]
    pairs += _choice(rng, rest, e - lo_e)
    order = [pairs[i] for i in rng.permutation(len(pairs)).tolist()]  # a random topological order

    qs: list[Quantity] = []
    available: list[int] = []
    remaining = {a: sum(1 for p in pairs if p[0] == a) for a in range(n_l)}
    members: dict[int, list[int]] = {a: [] for a in range(n_l)}
    for loc_i, ani_i in order:
        p = int(rng.choice(4, p=cfg.input_probs))
        p = min(p, len(available))
        with_const = p == 0 or rng.random() < 0.5
        form, inputs, const = _define(rng, p, with_const, available, qs)
        value = _combine(form, const, [qs[j].value for j in inputs])
        qs.append(Quantity(locs[loc_i], animals[ani_i], form, inputs, const, value))
        available.append(len(qs) - 1)
        members[loc_i].append(len(qs) - 1)
        remaining[loc_i] -= 1
        if remaining[loc_i] == 0:  # the total becomes available right after its last addend
            addends = tuple(members[loc_i])
            qs.append(Quantity(locs[loc_i], None, "total", addends, None, sum(qs[j].value for j in addends)))
            available.append(len(qs) - 1)

    ops, valid = _ops_and_validity(qs, cfg.max_value)
    candidates = [i for i in range(len(qs)) if ops[i] == op and valid[i]]
    if not candidates:
        return None
    asked = candidates[int(rng.integers(0, len(candidates)))]
    sentences = [sentence(q, qs) for q in qs if q.animal is not None]
    question = question_text(qs[asked])
    answer = qs[asked].value
    core = Core(
        op=op,
        key=core_key(sentences, question),
        answer=str(answer),
        answer_value=answer,
        payload=(qs, sentences, asked),
    )
    core.extra["core_tokens"] = (
        _count(cfg, _prefix(cfg, question))
        + sum(_count(cfg, " " + s) for s in sentences)
        + _count(cfg, f" Answer: {answer}")
        + (cfg.count_with == "model")
    )  # + <eos>
    return None if core.extra["core_tokens"] > cfg.max_tokens else core


def _prefix(cfg: GSMZooConfig, question: str) -> str:
    return (HEADER + " " if cfg.header else "") + f"Question: {question} Problem:"


def _count(cfg: GSMZooConfig, text: str) -> int:
    # Pieces are joined by single spaces and begin with one, so counts add up in both units.
    if cfg.count_with == "cl100k":
        return count_cl100k(text)
    return len(_tokenizer().encode(text).ids)


def _noise_sentence(
    rng: np.random.Generator, loc: str, animal: tuple[str, str], qs: list[Quantity], max_value: int
) -> str | None:
    """A distractor about a noise pair, reading 1 or 2 core quantities, optionally with a constant (spec §3.4 step 8).
    Forms whose value would be out of range are redrawn (up to 8 times) so the world stays consistent."""
    usable = [i for i, q in enumerate(qs) if 1 <= q.value <= max_value]
    for _ in range(8):
        p = min(1 + int(rng.random() < 0.5), len(usable))
        if p == 0:
            return None
        form, inputs, const = _define(rng, p, bool(rng.random() < 0.5), usable, qs)
        value = _combine(form, const, [qs[j].value for j in inputs])
        if 1 <= value <= max_value:
            return sentence(Quantity(loc, animal, form, inputs, const, value), qs)
    return None


def finish_zoo(cfg: GSMZooConfig, core: Core, rng: np.random.Generator) -> tuple[list[int], list[bool], dict[str, Any]]:
    """Length noise, shuffle (spec §3.4 steps 8-9), render, tokenise."""
    qs, core_sentences, asked = core.payload
    length = core.extra["core_tokens"]
    noise: list[str] = []
    target = int(rng.integers(cfg.min_tokens, cfg.max_tokens + 1)) if cfg.noise else 0
    if cfg.noise and length < target:
        pairs = [(loc, ani) for loc in NOISE_LOCATIONS for ani in NOISE_ANIMALS]
        for i in rng.permutation(len(pairs)).tolist():
            s = _noise_sentence(rng, *pairs[i], qs, cfg.max_value)
            if s is None:
                continue
            cost = _count(cfg, " " + s)
            if length + cost > cfg.max_tokens:
                break  # spec §3.5: drop the sentence that overshoots, and stop
            noise.append(s)
            length += cost
            if length >= target:
                break
    everything = core_sentences + noise
    shuffled = [everything[i] for i in rng.permutation(len(everything)).tolist()]
    question = question_text(qs[asked])
    text = f"{_prefix(cfg, question)} {' '.join(shuffled)} Answer: {core.answer}"
    ids = [*_tokenizer().encode(text).ids, cfg.eos_id]
    if UNK in (tok := cfg.vocab()) and tok.index(UNK) in ids:
        raise ConfigError("gsm_zoo: generated a word outside the closed vocabulary (a bug in the word lists)")
    n_answer = len(core.answer) + 1  # one token per digit, plus <eos>
    mask = [False] * (len(ids) - n_answer) + [True] * n_answer
    meta = {
        "text": text,
        "question": question,
        "n_core": len(core_sentences),
        "n_noise": len(noise),
        "target_tokens": target,
        "n_tokens": len(ids),
        "n_tokens_cl100k": count_cl100k(text),
    }
    return ids, mask, meta


def generate(split: Split, n: int, seed: int, config: GSMZooConfig | None = None, **overrides: Any) -> Batch:
    """``n`` zoo problems; rows padded to whole windows (see `gsm`)."""
    cfg = cast(GSMZooConfig, (config or GSMZooConfig()).with_overrides(**overrides))
    return generate_rows(cfg, split, n, seed, draw_zoo_core, finish_zoo)
