"""Shared pieces of the English tasks (`family`, `gsm_english`): a word-level tokenizer, distractor chatter, and the
window layout an agent produces when it hears the facts one message at a time.

Tokenizer. A `tokenizers` WordLevel model over a closed vocabulary, with an ``<unk>`` token. Text splits into words
(hyphenated words such as ``mother-in-law`` stay one word), clitics such as ``'s``, single digits and single punctuation
marks. A digit that follows a digit is written ``##d`` (a normaliser rewrites ``125`` to ``1 ##2 ##5``; a decimal point
inside a number is ``##.``), so a number costs one token per digit and still decodes without spaces. The decoder glues
punctuation, clitics (``'s``, ``'ll``) and continuation digits to the word before them, so ids decode to readable
English (``Lily is married to Owen.``) that encodes back to the same ids. `encode_strict` raises `InvalidInput` naming
the words outside the vocabulary; the tokenizer itself maps them to ``<unk>`` (what a served model must do with
arbitrary user text).

Layout. `pack_turns` lays messages out on windows exactly as the agent runtime sleeps (`SleepPolicy` with
``soft_threshold`` and the reply ``reserve``): a message that would not fit beside the window's tokens plus the reserve
starts a new window (the agent sleeps first), and a window that reaches the soft threshold is closed (a background
sleep). The rest of each window is PAD, which is inert (masked from attention, no fast-weight write; spec §0 rule 4),
so a trained model sees in training exactly the windows it sees as an agent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from agentsleep.errors import ConfigError, InvalidInput

# A word (hyphens inside allowed), a clitic ('s, 'll), a continuation digit or point, a digit, or any other mark.
WORD_PATTERN = r"'[a-z]+\b|[A-Za-z]+(?:-[A-Za-z]+)*|##[\d.]|\d|[^\sA-Za-z\d]"
_WORD_RE = re.compile(WORD_PATTERN)
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DIGIT_RUN = re.compile(r"(?<=\d)(?=\d)")
GLUED = (".", ",", "?", "!", ":", ";", "%", ")")  # decoded without a space before them (and clitics: 's, 'll)
DIGITS = tuple("0123456789")
CONT_DIGITS = (*(f"##{d}" for d in DIGITS), "##.")  # a digit or decimal point inside a number

# Small talk that carries no family or number facts: the distractor messages of the English episodes. Ours; every
# word is lower-case or a weekday so it can never be read as one of reasoning-gym's names.
CHATTER: tuple[str, ...] = (
    "The weather is nice today.",
    "I had coffee this morning.",
    "The train was late again.",
    "My phone needs charging.",
    "We watched a film last night.",
    "Dinner will be ready soon.",
    "The office is quiet on Friday.",
    "I forgot my umbrella.",
    "Traffic was heavy on the bridge.",
    "Remind me to call the plumber.",
    "The new cafe serves good tea.",
    "It might snow this weekend.",
    "The meeting moved to Thursday.",
    "I should water the plants.",
    "The cat is sleeping on the sofa.",
    "My laptop is very slow today.",
    "Lunch was delicious.",
    "The library opens early.",
)


def split_words(text: str) -> list[str]:
    """The tokenizer's pieces of ``text`` (before the vocabulary lookup), e.g. ``"Owen's 125."`` ->
    ``["Owen", "'s", "1", "##2", "##5", "."]``."""
    return _WORD_RE.findall(_DIGIT_RUN.sub(" ##", _DECIMAL_POINT.sub(" ##. ##", text)))


def words_of(texts: Sequence[str]) -> list[str]:
    """Distinct pieces of several texts, in first-seen order."""
    seen: dict[str, None] = {}
    for t in texts:
        for w in split_words(t):
            seen.setdefault(w, None)
    return list(seen)


def english_tokenizer(vocab: Sequence[str], unk: str, specials: Sequence[str]) -> Tokenizer:
    """The WordLevel tokenizer over ``vocab`` (ids = positions), readable decoding, ``unk`` for unknown words."""
    index = {tok: i for i, tok in enumerate(vocab)}
    if len(index) != len(vocab):
        raise InvalidInput("duplicate entries in the vocabulary")
    tok = Tokenizer(models.WordLevel(index, unk_token=unk))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"(?<=\d)\.(?=\d)"), " ##. ##"),  # 2.5 -> 2 ##. ##5
            normalizers.Replace(Regex(r"(?<=\d)(?=\d)"), " ##"),  # 125 -> 1 ##2 ##5
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")]
    )
    glued = "|".join(re.escape(g) for g in GLUED) + "|'"
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(Regex(rf"^(?!(?:{glued}|##))"), " "),  # a space before every token that is not glued
            decoders.Replace(Regex(r"^##"), ""),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(list(specials))
    return tok


def encode_strict(index: dict[str, int], text: str, what: str) -> list[int]:
    """Ids of ``text`` under a closed vocabulary; `InvalidInput` naming every word outside it."""
    words = split_words(text)
    unknown = sorted({w for w in words if w not in index})
    if unknown:
        raise InvalidInput(
            f"{what}: {len(unknown)} word(s) outside the vocabulary: {unknown[:12]}; this toy model knows only the "
            "words of its generator (see its tokenizer.json)"
        )
    return [index[w] for w in words]


def detokenize(pieces: Sequence[str]) -> str:
    """Token strings to readable text (the tokenizer's decoder, in Python): glued marks and ``##`` digits join."""
    out = ""
    for p in pieces:
        if p.startswith("##"):
            out += p[2:]
        elif p in GLUED or p.startswith("'") or not out:
            out += p
        else:
            out += " " + p
    return out


def soft_limit(window: int, soft_threshold: float) -> int:
    """Tokens at which a window counts as full after a message (`SleepPolicy.soft_limit_tokens`)."""
    return max(1, math.ceil(round(soft_threshold * window, 9)))


def pack_turns(lengths: Sequence[int], window: int, reserve: int, soft_threshold: float) -> list[list[int]]:
    """Message indices per window, as the agent runtime sleeps between messages.

    Before a message: if the window is not empty and the message plus ``reserve`` would not fit, sleep (new window).
    After it: if the window holds at least the soft limit, sleep. Raises `ConfigError` for a message that cannot fit
    an empty window beside the reserve.
    """
    limit = soft_limit(window, soft_threshold)
    windows: list[list[int]] = []
    cur: list[int] = []
    w = 0
    for i, n in enumerate(lengths):
        if n + reserve > window:
            raise ConfigError(f"a message of {n} tokens plus a reply reserve of {reserve} exceeds the window {window}")
        if w and w + n + reserve > window:
            windows.append(cur)
            cur, w = [], 0
        cur.append(i)
        w += n
        if w >= limit:
            windows.append(cur)
            cur, w = [], 0
    if cur:
        windows.append(cur)
    return windows


def lay_out(
    turns: Sequence[Sequence[int]],
    question: Sequence[int],
    answer: Sequence[int],
    *,
    window: int,
    reserve: int,
    soft_threshold: float,
    pad_id: int,
) -> tuple[list[int], list[bool], list[list[int]]]:
    """A row: the fact/distractor messages packed on windows (PAD-filled), then one window that opens with the
    question and holds the answer (the targets). Returns tokens, loss mask and the message indices of each window.

    The question window is a window of its own: the agent sleeps before it is asked, so everything it heard
    survives only in S.
    """
    if len(question) + len(answer) > window:
        raise ConfigError(f"question + answer ({len(question)} + {len(answer)} tokens) exceed the window L={window}")
    groups = pack_turns([len(t) for t in turns], window, reserve, soft_threshold)
    tokens: list[int] = []
    for g in groups:
        body = [tok for i in g for tok in turns[i]]
        tokens += body + [pad_id] * (window - len(body))
    tail = list(question) + list(answer)
    mask = [False] * len(tokens) + [False] * len(question) + [True] * len(answer) + [False] * (window - len(tail))
    tokens += tail + [pad_id] * (window - len(tail))
    return tokens, mask, groups


def derived_seed(seq: np.random.SeedSequence) -> int:
    """A 64-bit integer seed for a generator that takes a plain int (reasoning-gym seeds `random.Random` with it)."""
    a, b = seq.generate_state(2, dtype=np.uint32).tolist()
    return (int(a) << 32) | int(b)


__all__ = [
    "CHATTER",
    "CONT_DIGITS",
    "DIGITS",
    "WORD_PATTERN",
    "derived_seed",
    "detokenize",
    "encode_strict",
    "english_tokenizer",
    "lay_out",
    "pack_turns",
    "soft_limit",
    "split_words",
    "words_of",
]
