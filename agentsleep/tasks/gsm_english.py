"""Stateful GSM-Symbolic in English, from reasoning-gym's ``gsm_symbolic`` generator (spec/tasks.md §4.1).

The stateful split of Lin et al. 2025 (*Sleep-time Compute*, arXiv 2504.13171; `agentsleep.tasks.stateful_gsm`): every
sentence of a problem but the last is context, heard first as messages (mixed with distractor small talk), laid out
on windows exactly as an agent sleeps (`english.lay_out`); the last sentence is the question, which opens a window of
its own, and the answer is the integer, one token per digit, then ``<eos>``::

    | Olivia has a flower bed that is 2 ##2 ##0 meters long . <pad> ... |     context windows (N passes)
    | Each plant , including the space ... <pad>                         |
    | How many plants can she fit ? 5 ##5 <eos> <pad> ...                |     label window (one pass)

Answers are scored by reasoning-gym's own ``score_answer`` (1.0 = correct). Word-level tokens over a closed
vocabulary: the words of ``vocab_sample`` entries drawn from a fixed seed (the generator's templates, names and items),
digits, punctuation and the chatter; a rarer word is ``<unk>`` (counted in each row's ``n_unk``). The size knobs are
``max_tokens`` (problems whose context is longer are skipped), ``L`` and ``chatter``. A sentence longer than a window
leaves room for is split over several messages. Metrics: ``exact`` and ``exact_k{n}`` by the number of context
sentences n (the facts the answer combines).

A from-scratch toy cannot do GSM8K arithmetic; this task exists so the same pipeline (training, episodes, the
LangChain stack) runs on English math, scored by the package's own scorer.
"""

from __future__ import annotations

import functools
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
from agentsleep.tasks.english import (
    CHATTER,
    CONT_DIGITS,
    DIGITS,
    derived_seed,
    detokenize,
    encode_strict,
    lay_out,
    split_words,
    words_of,
)
from agentsleep.tasks.family import story_key
from agentsleep.tasks.stateful_gsm import INSTRUCTION, split_entry

DATASET = "gsm_symbolic"
MAX_DRAWS = 2_000
VOCAB_SEED = 20_260_101  # the fixed reasoning-gym seed whose entries define the vocabulary


def _require_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ConfigError("the English tasks need reasoning-gym: pip install 'agentsleep[test]'") from exc
    return reasoning_gym


def _entry(seed: int) -> dict[str, Any]:
    return cast(dict[str, Any], _require_gym().create_dataset(DATASET, size=1, seed=seed)[0])


@functools.cache
def sample_words(n: int) -> tuple[str, ...]:
    """Every word of ``n`` reasoning-gym entries drawn from `VOCAB_SEED`, in first-seen order."""
    ds = _require_gym().create_dataset(DATASET, size=max(n, 1), seed=VOCAB_SEED)
    texts = []
    for i in range(n):
        e = ds[i]
        texts += [e["question"].removesuffix(INSTRUCTION), str(e["answer"])]
    return tuple(words_of(texts))


class GSMEnglishConfig(TaskConfig):
    """Stateful GSM-Symbolic in English, word-level tokens, laid out as an agent hears it. Defaults: the CPU toy."""

    task_name = "gsm_english"
    task_id = 7

    window_size: int = Field(32, ge=12, alias="L", description="L: the window, in words, digits and marks")
    max_tokens: int = Field(96, ge=8, description="skip problems whose context (without chatter) is longer")
    chatter: int = Field(1, ge=0, description="distractor small-talk messages per problem ~ U{0..chatter}")
    reserve: int = Field(8, ge=2, description="reply tokens kept free (answers longer than reserve-1 digits skipped)")
    soft_threshold: float = Field(0.8, gt=0.0, le=1.0, description="a window closes once this full (SleepPolicy)")
    vocab_sample: int = Field(4000, ge=1, description="reasoning-gym entries whose words form the vocabulary")
    test_size: int = Field(1000, ge=0, description="size of the canonical test set whose problems train/val avoid")
    test_seed: int = Field(0, ge=0)
    dedup: bool = Field(True, description="train/val skip test problems; the test split has no duplicates")

    @model_validator(mode="after")
    def _ranges(self) -> GSMEnglishConfig:
        if self.chatter > len(CHATTER):
            raise ValueError(f"chatter must be at most {len(CHATTER)} (distinct lines), got {self.chatter}")
        if self.reserve >= self.window_size:
            raise ValueError(f"reserve {self.reserve} must be smaller than L={self.window_size}")
        return self

    def tokenizer_mode(self) -> Literal["english"]:  # type: ignore[override]
        return "english"

    def build_vocab(self) -> list[str]:
        words = [w for w in sample_words(self.vocab_sample) if not w.startswith("##") and w not in DIGITS]
        out = dict.fromkeys([PAD, BOS, EOS, UNK, *DIGITS, *CONT_DIGITS, *words_of(CHATTER), *words])
        return list(out)

    @property
    def window(self) -> int:
        return self.window_size

    @property
    def seq_len(self) -> int:
        """A bound on a row: every context window at least half full, chatter in windows of its own, the question."""
        per = max(1, self.window_size // 2 - self.reserve)
        return (-(-self.max_tokens // per) + self.chatter + 1) * self.window_size

    @property
    def eos_id(self) -> int:
        return self.token_index()[EOS]

    def encode(self, text: str) -> list[int]:
        """Ids of English text; `InvalidInput` naming any word this task's vocabulary lacks."""
        return encode_strict(self.token_index(), text, "gsm_english")

    def encode_lenient(self, text: str) -> list[int]:
        """Ids of English text, ``<unk>`` for words outside the vocabulary (what the generator does)."""
        index = self.token_index()
        return [index.get(w, index[UNK]) for w in split_words(text)]

    def describe(self) -> str:
        return (
            f"gsm_english: reasoning-gym {DATASET} (stateful split), context <= {self.max_tokens} tokens, "
            f"chatter 0-{self.chatter}, L={self.window}, vocab {self.vocab_size}"
        )


PRESETS: dict[str, GSMEnglishConfig] = {
    "toy": GSMEnglishConfig(),
    "paper": GSMEnglishConfig(max_tokens=400, L=128, chatter=8, vocab_sample=10_000),
}


def _pieces(cfg: GSMEnglishConfig, words: list[str]) -> list[list[str]]:
    """A sentence's words as messages that each fit an empty window beside the reply reserve, never cut inside a
    number (a message must not open with a continuation digit: its text would read as a new number)."""
    cap = cfg.window - cfg.reserve
    out, start = [], 0
    while start < len(words):
        end = min(start + cap, len(words))
        while end < len(words) and words[end].startswith("##") and end > start + 1:
            end -= 1
        out.append(words[start:end])
        start = end
    return out


def _draw(cfg: GSMEnglishConfig, split: Split, seed: int, j: int, exclude: frozenset[str]) -> dict[str, Any]:
    for draw in range(MAX_DRAWS):
        rg_seed = derived_seed(seed_sequence(cfg.task_id, split, seed, j, 2, draw))
        entry = _entry(rg_seed)
        ep = split_entry(0, entry)
        if ep is None:
            continue  # a single sentence has nothing to remember
        context = [split_words(s) for s in ep.context]
        question = cfg.encode_lenient(ep.question)
        answer = [*cfg.encode_lenient(str(entry["answer"])), cfg.eos_id]
        if sum(map(len, context)) > cfg.max_tokens or len(answer) > cfg.reserve:
            continue
        if len(question) + len(answer) > cfg.window:
            continue
        key = story_key(list(ep.context), ep.question)
        if key in exclude:
            continue
        return {"entry": entry, "episode": ep, "rg_seed": rg_seed, "context": context, "question": question,
                "answer": answer, "key": key}  # fmt: skip
    raise ConfigError(f"gsm_english: no problem with a context <= {cfg.max_tokens} tokens in {MAX_DRAWS} draws")


_TEST_KEYS: dict[str, frozenset[str]] = {}


def test_keys(cfg: GSMEnglishConfig) -> frozenset[str]:
    ck = cfg.model_dump_json()
    if ck not in _TEST_KEYS:
        seen: set[str] = set()
        for j in range(cfg.test_size):  # the same draws as generate("test", ...): no duplicate problem
            seen.add(_draw(cfg, "test", cfg.test_seed, j, frozenset(seen))["key"])
        _TEST_KEYS[ck] = frozenset(seen)
    return _TEST_KEYS[ck]


def messages(cfg: GSMEnglishConfig, context: list[list[str]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Context sentences (split to fit a window) as (text, role) messages, chatter inserted between sentences."""
    n_chat = int(rng.integers(0, cfg.chatter + 1))
    lines = rng.choice(len(CHATTER), size=n_chat, replace=False).tolist() if n_chat else []
    slots = sorted(int(rng.integers(0, len(context) + 1)) for _ in lines)
    out: list[tuple[str, str]] = []
    k = 0
    for s in range(len(context) + 1):
        while k < len(slots) and slots[k] == s:
            out.append((CHATTER[lines[k]], "distractor"))
            k += 1
        if s < len(context):
            out += [(detokenize(p), "fact") for p in _pieces(cfg, context[s])]
    return out


def generate(split: Split, n: int, seed: int, config: GSMEnglishConfig | None = None, **overrides: Any) -> Batch:
    """``n`` stateful problems: context messages on windows, then the question window with the answer digits."""
    check_split(split)
    if n < 0:
        raise InvalidInput(f"n must be >= 0, got {n}")
    cfg = cast(GSMEnglishConfig, (config or GSMEnglishConfig()).with_overrides(**overrides))
    exclude = test_keys(cfg) if cfg.dedup and split != "test" else frozenset()
    seen: set[str] = set()
    rows, metas = [], []
    for j in range(n):
        ex = _draw(cfg, split, seed, j, exclude | (seen if split == "test" else set()))
        seen.add(ex["key"])
        msgs = messages(cfg, ex["context"], example_rng(cfg.task_id, split, seed, j, 1))
        turns = [cfg.encode_lenient(m) for m, _ in msgs]
        tokens, mask, groups = lay_out(
            turns,
            ex["question"],
            ex["answer"],
            window=cfg.window,
            reserve=cfg.reserve,
            soft_threshold=cfg.soft_threshold,
            pad_id=cfg.pad_id,
        )
        rows.append((tokens, mask))
        ep = ex["episode"]
        every = [t for m in turns for t in m] + ex["question"]
        metas.append(
            {
                "k": len(ep.context),
                "answer": str(ex["entry"]["answer"]),
                "question": ep.question,
                "messages": [{"text": t, "role": r} for t, r in msgs],
                "windows": groups,
                "n_windows": len(groups) + 1,
                "n_unk": int(sum(t == cfg.token_index()[UNK] for t in every)),
                "rg_seed": ex["rg_seed"],
                "key": ex["key"],
                "text": " ".join(ep.context) + " " + ep.question + " " + str(ex["entry"]["answer"]),
            }
        )
    return right_padded(rows, metas, cfg)


@functools.cache
def _scorer() -> Any:
    return _require_gym().create_dataset(DATASET, size=1, seed=0)


def score_answer(answer: str | None, expected: str) -> float:
    """reasoning-gym's own ``gsm_symbolic`` score (1.0 correct, 0.01 wrong, 0.0 for None)."""
    return float(_scorer().score_answer(answer, {"answer": expected}))


def predicted_answers(predictions: Any, batch: Batch, config: GSMEnglishConfig) -> list[str]:
    """Each row's answer as greedy decoding gives it: argmax tokens at the answer positions up to ``<eos>``,
    detokenized (``1 ##2 ##5`` -> ``125``). Without a predicted ``<eos>`` the next token stays in the answer."""
    return [detokenize(words) for words in answer_words(predictions, batch, config.vocab())]


def score(predictions: Any, batch: Batch, config: GSMEnglishConfig | None = None) -> dict[str, float]:
    """``exact`` (``score_answer`` == 1.0) and ``exact_k{n}`` by the number of context sentences n."""
    if len(batch) == 0:
        raise InvalidInput("cannot score an empty batch")
    cfg = config or GSMEnglishConfig()
    answers = predicted_answers(predictions, batch, cfg)
    correct = np.array([score_answer(a, m["answer"]) == 1.0 for a, m in zip(answers, batch.meta)])
    return exact_by(correct, batch)


__all__ = ["DATASET", "PRESETS", "GSMEnglishConfig", "generate", "predicted_answers", "score", "score_answer"]
