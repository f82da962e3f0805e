"""Realistic zoo GSM: every problem is re-read from its English text by an independent parser and re-solved."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from agentsleep.tasks import gsm, gsm_zoo
from agentsleep.tasks.base import save_tokenizer
from agentsleep.tasks.gsm_zoo import GSMZooConfig

# Entity data (not logic) is shared with the generator: the parser needs singular -> plural.
PLURAL = {s: p for group in (*gsm_zoo.CORE_ANIMALS, gsm_zoo.NOISE_ANIMALS) for s, p in group}
PLURAL.update({p: p for p in PLURAL.values()})

REF_INST = re.compile(r"the number of adult (\w+) in (.+)")
REF_TOTAL = re.compile(r"the total number of adult animals in (.+)")
CONST = re.compile(r"(.+) has (\d+) adult (\w+)")
DEFN = re.compile(r"The number of adult (\w+) in (.+?) (equals|is) (.+)")


def parse_ref(text: str) -> tuple[str, str | None]:
    if m := REF_TOTAL.fullmatch(text):
        return (m.group(1), None)
    m = REF_INST.fullmatch(text)
    assert m, text
    return (m.group(2), m.group(1))


def parse_expr(kind: str, rest: str) -> tuple[str, int | None, list[tuple[str, str | None]]]:
    """-> (operation, constant, input references)."""
    if kind == "equals":
        return "copy", None, [parse_ref(rest)]
    if m := re.fullmatch(r"(\d+) (more than|times) (.+)", rest):
        c, word, operand = int(m.group(1)), m.group(2), m.group(3)
        if s := re.fullmatch(r"the sum of (.+) and (.+)", operand):
            refs = [parse_ref(r) for r in s.group(1).split(", ")] + [parse_ref(s.group(2))]
        else:
            refs = [parse_ref(operand)]
        return ("more" if word == "more than" else "times"), c, refs
    if " minus " in rest:
        a, b = rest.split(" minus ")
        return "minus", None, [parse_ref(a), parse_ref(b)]
    return "plus", None, [parse_ref(r) for r in rest.split(" plus ")]


def solve(text: str) -> dict:
    header, rest = text.split(" Question: ", 1)
    assert header == gsm_zoo.HEADER
    question, rest = rest.split(" Problem: ", 1)
    body, answer = rest.rsplit(" Answer: ", 1)
    defs: dict[tuple[str, str | None], tuple[str, int | None, list]] = {}
    for sentence in re.split(r"(?<=\.) ", body):
        assert sentence.endswith(".")
        s = sentence[:-1]
        if m := CONST.fullmatch(s):
            key = (m.group(1), PLURAL[m.group(3)])
            assert (m.group(3) == PLURAL[m.group(3)]) == (m.group(2) != "1")  # "1 adult owl", "2 adult owls"
            spec = ("const", int(m.group(2)), [])
        else:
            m = DEFN.fullmatch(s)
            assert m, sentence
            key = (m.group(2), m.group(1))
            spec = parse_expr(m.group(3), m.group(4))
        assert key not in defs, f"{key} defined twice"
        defs[key] = spec
    # Totals are implicit: the sum over every animal mentioned for the location (header convention).
    for loc in {loc for loc, _ in defs}:
        defs[(loc, None)] = ("total", None, [k for k in defs if k[0] == loc and k[1] is not None])

    memo: dict = {}

    def value(key: tuple[str, str | None]) -> int:
        if key not in memo:
            op, c, refs = defs[key]
            vals = [value(r) for r in refs]
            memo[key] = {
                "const": lambda: c,
                "copy": lambda: vals[0],
                "more": lambda: c + sum(vals),
                "times": lambda: c * sum(vals),
                "minus": lambda: vals[0] - vals[1],
                "plus": lambda: sum(vals),
                "total": lambda: sum(vals),
            }[op]()
        return memo[key]

    def closure(key: tuple[str, str | None], acc: set) -> set:
        if key not in acc:
            acc.add(key)
            for r in defs[key][2]:
                closure(r, acc)
        return acc

    if m := re.fullmatch(r"How many adult animals live in (.+) altogether\?", question):
        asked = (m.group(1), None)
    else:
        m = re.fullmatch(r"How many adult (\w+) live in (.+)\?", question)
        assert m, question
        asked = (m.group(2), m.group(1))
    deps = closure(asked, set())
    cost = {k: len(defs[k][2]) + (defs[k][1] is not None) for k in deps}
    return {
        "answer": value(asked),
        "shown": int(answer),
        "op": sum(cost.values()),
        "dep_values": {k: value(k) for k in deps},
        "n_sentences": len([k for k in defs if k[1] is not None]),
    }


@pytest.mark.parametrize("preset", ["toy", "paper"])
def test_problems_solve_independently(preset: str) -> None:
    cfg = gsm_zoo.ZOO_PRESETS[preset].with_overrides(test_size=40)
    n = 160 if preset == "toy" else 8
    batch = gsm_zoo.generate("train", n, 1, cfg)
    batch.validate(cfg.vocab_size)
    ops = set()
    for meta in batch.meta:
        got = solve(meta["text"])
        assert got["answer"] == got["shown"] == meta["answer_value"] == int(meta["answer"])
        assert got["op"] == meta["op"]
        assert got["n_sentences"] == meta["n_core"] + meta["n_noise"]
        for (_, animal), v in got["dep_values"].items():  # spec §3.4 step 5 on everything the question needs
            assert 0 <= v <= cfg.max_value and (v > 0 or animal is None)
        ops.add(meta["op"])
    if preset == "toy":
        assert ops == set(range(1, 9))


def test_paper_length_band() -> None:
    cfg = GSMZooConfig(test_size=16)
    batch = gsm_zoo.generate("test", 6, 0, cfg)
    for m in batch.meta:
        assert 2000 < m["target_tokens"] <= m["n_tokens"] <= 3300
        assert m["n_tokens_cl100k"] > m["n_tokens"]  # recorded for reference; cl100k splits names finer
        assert m["n_noise"] > 40  # a sentence is ~30-40 tokens, so the band needs dozens of distractors
    # L = 2000: the first window (question + start of the problem) is slept and evicted, the last holds the answer.
    assert set(batch.n_windows.tolist()) == {2}


def test_cl100k_length_unit() -> None:
    cfg = GSMZooConfig(count_with="cl100k", test_size=8)
    for m in gsm_zoo.generate("train", 4, 0, cfg).meta:
        assert 2000 < m["target_tokens"] <= m["n_tokens_cl100k"] <= 3300  # per-sentence counts add up exactly


def test_closed_vocabulary_and_round_trip(tmp_path) -> None:
    cfg = gsm_zoo.ZOO_PRESETS["toy"].with_overrides(test_size=20)
    batch = gsm_zoo.generate("val", 50, 0, cfg)
    path = save_tokenizer(cfg, tmp_path)
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == cfg.vocab_size
    unk = cfg.token_index()["<unk>"]
    for row, meta in zip(batch.tokens, batch.meta):
        assert unk not in row
        ids = row[row != cfg.pad_id].tolist()
        text = tok.decode(ids, skip_special_tokens=False)
        assert tok.encode(text).ids == ids
        assert tok.encode(meta["text"]).ids == ids[:-1]  # the rendered text is the row minus <eos>


def test_entity_lists_are_ours_and_disjoint() -> None:
    core_locs = {x for g in gsm_zoo.CORE_LOCATIONS for x in g}
    core_animals = {a for g in gsm_zoo.CORE_ANIMALS for a, _ in g}
    assert all(len(g) == 5 for g in gsm_zoo.CORE_LOCATIONS + gsm_zoo.CORE_ANIMALS)
    assert len(gsm_zoo.NOISE_LOCATIONS) >= 12 and len(gsm_zoo.NOISE_ANIMALS) >= 12
    assert not core_locs & set(gsm_zoo.NOISE_LOCATIONS)
    assert not core_animals & {a for a, _ in gsm_zoo.NOISE_ANIMALS}
    # Words the sentence parser splits on must not occur inside names.
    for name in core_locs | set(gsm_zoo.NOISE_LOCATIONS):
        assert not set(name.lower().split()) & {"and", "plus", "minus", "times", "more", "sum", "in", "is", "the"}


def test_test_set_dedup_and_scoring() -> None:
    cfg = gsm_zoo.ZOO_PRESETS["toy"].with_overrides(test_size=80)
    test = gsm_zoo.generate("test", 80, cfg.test_seed, cfg)
    keys = {m["key"] for m in test.meta}
    assert len(keys) == 80
    train = gsm_zoo.generate("train", 400, 0, cfg)
    assert not keys & {m["key"] for m in train.meta}
    assert gsm.score(test.tokens, test)["exact"] == 1.0
    assert gsm.score_answers([m["answer"] for m in test.meta], test)["exact"] == 1.0
    s = gsm.score_answers([str(m["answer_value"] + 1) for m in test.meta], test)
    assert s["exact"] == 0.0 and set(s) == {"exact", *(f"exact_op{k}" for k in range(1, 9))}


def test_determinism() -> None:
    cfg = gsm_zoo.ZOO_PRESETS["toy"].with_overrides(test_size=10)
    a = gsm_zoo.generate("train", 20, 3, cfg)
    b = gsm_zoo.generate("train", 20, 3, cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.meta == b.meta
