"""Symbolic GSM: answers and op counts re-derived from the rendered text by an independent solver; layout; dedup."""

from __future__ import annotations

import re

import numpy as np
import pytest

from agentsleep.tasks import gsm
from agentsleep.tasks.base import decode
from agentsleep.tasks.gsm import GSMSymbolicConfig

STMT = re.compile(r"assign (V\d+) = (?:(V\d+)(?: ([+-]) 1)?|(-?\d+))\.")
TEXT = re.compile(r"Question: (.*) Context: (.*) Answer: (.*)")


def solve_text(text: str) -> dict:
    """Parse 'assign X = ...' statements, evaluate what is determined, and answer the question."""
    m = TEXT.fullmatch(text)
    assert m, text
    question, context, answer = m.groups()
    defs: dict[str, tuple[str | None, int]] = {}
    for lhs, rhs, sign, const in STMT.findall(context):
        assert lhs not in defs, "a variable is assigned twice"
        defs[lhs] = (rhs, {"+": 1, "-": -1, "": 0}[sign]) if rhs else (None, int(const))
    assert len(defs) == len(STMT.findall(context)) == context.count("assign ")

    values: dict[str, int] = {}
    depth: dict[str, int] = {}

    def value(v: str, seen: frozenset = frozenset()) -> int | None:
        if v in values:
            return values[v]
        if v not in defs or v in seen:
            return None  # undetermined: a noise tree's root is never assigned
        rhs, amount = defs[v]
        if rhs is None:
            values[v], depth[v] = amount, 1
            return amount
        base = value(rhs, seen | {v})
        if base is None:
            return None
        values[v], depth[v] = base + amount, depth[rhs] + 1
        return values[v]

    determined = {v for v in defs if value(v) is not None}
    if q := re.fullmatch(r"What is the value of (V\d+)\?", question):
        x = q.group(1)
        return {"answer": str(values[x]), "op": depth[x], "determined": determined, "shown": answer}
    q = re.fullmatch(r"Which variables equal (-?\d+)\?", question)
    assert q, question
    target = int(q.group(1))
    names = sorted(v for v in determined if values[v] == target)
    return {"answer": ", ".join(names), "op": len(determined), "determined": determined, "shown": answer}


@pytest.mark.parametrize("form", ["value", "set"])
def test_answers_and_ops_by_independent_solver(form: str) -> None:
    cfg = GSMSymbolicConfig(form=form, test_size=100)
    batch = gsm.generate("train", 300, 4, cfg)
    batch.validate(cfg.vocab_size)
    ops_seen = set()
    for meta in batch.meta:
        got = solve_text(meta["text"])
        assert got["answer"] == meta["answer"] == got["shown"]
        assert got["op"] == meta["op"]
        assert len(got["determined"]) == meta["n_core"]  # every noise value is undetermined
        assert cfg.min_tokens <= meta["n_tokens"] or meta["n_noise"] == 0 or meta["n_tokens"] >= meta["target_tokens"]
        assert meta["n_tokens"] <= cfg.max_tokens
        ops_seen.add(meta["op"])
    assert ops_seen == set(range(1, 9))


def test_compact_tokens_match_text() -> None:
    cfg = GSMSymbolicConfig()
    batch = gsm.generate("val", 40, 0, cfg)
    for row, mask, meta in zip(batch.tokens, batch.loss_mask, batch.meta):
        body = row[meta["left_pad"] : meta["left_pad"] + meta["n_tokens"]]
        compact = decode(cfg, body)
        words = compact.split(" ")
        q_end = words.index(";")
        a_at = words.index("A")
        statements = " ".join(words[q_end + 1 : a_at]).split(" ;")
        joined = [re.sub(r"(?<=\d) (?=\d)", "", s.strip()) for s in statements if s.strip()]  # "1 0" -> "10"
        as_text = " ".join(f"assign {s}." for s in joined)
        question = f"What is the value of {words[1]}?"
        answer = "".join(words[a_at + 1 : -1])
        assert words[-1] == "<eos>" and words[0] == "Q"
        assert meta["text"] == f"Question: {question} Context: {as_text} Answer: {answer}"
        # Targets: exactly the answer tokens and <eos>.
        targets = decode(cfg, row[mask]).split(" ")
        assert targets == words[a_at + 1 :]


def test_windows_padding_and_buckets() -> None:
    cfg = GSMSymbolicConfig(test_size=50)
    batch = gsm.generate("train", 200, 1, cfg)
    L = cfg.window
    assert (batch.lengths % L == 0).all() and batch.seq_len <= cfg.seq_len
    for row, mask, length, meta in zip(batch.tokens, batch.loss_mask, batch.lengths, batch.meta):
        idx = np.flatnonzero(mask)
        assert not (idx % L == 0).any()
        assert (idx // L == (length - 1) // L).all()  # the label window is the row's last
        assert (row[:length][: meta["left_pad"]] == cfg.pad_id).all() and (row[length:] == cfg.pad_id).all()
        assert not mask[row == cfg.pad_id].any()
    buckets = batch.buckets()
    assert sum(len(b) for b in buckets.values()) == len(batch)
    for n_windows, b in buckets.items():
        assert b.seq_len == n_windows * L and (b.lengths == n_windows * L).all()
        b.validate(cfg.vocab_size)
        # One chunk layout per bucket: only the last window holds targets, in every row.
        per_window = b.loss_mask.reshape(len(b), n_windows, L).any(axis=2)
        assert per_window[:, -1].all() and not per_window[:, :-1].any()


def test_test_set_is_unseen_in_training() -> None:
    # A tiny problem space (op 1, no extra core variables): 11 values x 128 names = 1,408 distinct cores.
    base = GSMSymbolicConfig(ops=(1, 2), core_extra=0, test_size=200, test_seed=3, noise=False)
    test = gsm.generate("test", 200, 3, base)
    keys = [m["key"] for m in test.meta]
    assert len(set(keys)) == len(keys)  # no duplicates inside the test set
    assert set(keys) == gsm.test_keys(base, gsm.draw_symbolic_core)
    train = gsm.generate("train", 3000, 0, base)
    assert not {m["key"] for m in train.meta} & set(keys)
    val = gsm.generate("val", 300, 0, base)
    assert not {m["key"] for m in val.meta} & set(keys)
    # Without dedup the same draw does collide: the exclusion is doing real work.
    leaky = gsm.generate("train", 3000, 0, base.with_overrides(dedup=False))
    assert {m["key"] for m in leaky.meta} & set(keys)


def test_determinism_prefix_and_splits() -> None:
    cfg = GSMSymbolicConfig(test_size=50)
    a = gsm.generate("train", 30, 9, cfg)
    b = gsm.generate("train", 30, 9, cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.meta == b.meta
    short = gsm.generate("train", 10, 9, cfg)  # example j depends only on its own stream
    assert [m["text"] for m in short.meta] == [m["text"] for m in a.meta[:10]]
    other = gsm.generate("val", 30, 9, cfg)
    assert [m["text"] for m in other.meta] != [m["text"] for m in a.meta]
    test = gsm.generate("test", 16, 9, cfg)
    assert [m["op"] for m in test.meta] == [1, 2, 3, 4, 5, 6, 7, 8] * 2  # balanced ops in val/test


def test_scoring() -> None:
    cfg = GSMSymbolicConfig(test_size=50)
    batch = gsm.generate("test", 64, 0, cfg)
    assert gsm.score(batch.tokens, batch)["exact"] == 1.0
    wrong = np.where(batch.loss_mask, cfg.pad_id, batch.tokens)
    s = gsm.score(wrong, batch)
    assert s["exact"] == 0.0 and all(s[f"exact_op{k}"] == 0.0 for k in range(1, 9))
    # Break only op-2 rows.
    pred = batch.tokens.copy()
    for i, m in enumerate(batch.meta):
        if m["op"] == 2:
            pred[i, np.flatnonzero(batch.loss_mask[i])[-1]] = cfg.pad_id  # wrong <eos>
    s = gsm.score(pred, batch)
    assert s["exact_op2"] == 0.0 and s["exact_op3"] == 1.0 and s["exact"] == pytest.approx(7 / 8)
    # Decoded answer strings: the integer after the cue, compact spacing tolerated.
    answers = [m["answer"] for m in batch.meta]
    assert gsm.score_answers(answers, batch)["exact"] == 1.0
    spaced = [" ".join(a) for a in answers]  # "- 1 2" is how the compact form spells -12
    assert gsm.score_answers(spaced, batch)["exact"] == 1.0
    assert gsm.score_answers([None] * len(batch), batch)["exact"] == 0.0
    assert gsm.score_answers([str(int(a) + 1) for a in answers], batch)["exact"] == 0.0


def test_set_form_scoring() -> None:
    cfg = GSMSymbolicConfig(form="set", test_size=50)
    batch = gsm.generate("test", 24, 0, cfg)
    assert gsm.score(batch.tokens, batch)["exact"] == 1.0
    shuffled = [", ".join(reversed(m["answer_value"])) for m in batch.meta]
    assert gsm.score_answers(shuffled, batch)["exact"] == 1.0
    assert gsm.score_answers(["V999"] * len(batch), batch)["exact"] == 0.0


def test_cl100k_length_unit() -> None:
    cfg = GSMSymbolicConfig(count_with="cl100k", min_tokens=300, max_tokens=500, test_size=20, L=128)
    batch = gsm.generate("train", 12, 0, cfg)
    batch.validate(cfg.vocab_size)
    for m in batch.meta:
        assert m["n_tokens_cl100k"] <= 500
        assert m["n_tokens_cl100k"] >= m["target_tokens"] or m["n_tokens_cl100k"] > 500 - 20


LAST = re.compile(r"Context: (.*) (Question: .*) Answer: (.*)")


@pytest.mark.parametrize("form", ["value", "set"])
def test_question_last_moves_only_the_question(form: str) -> None:
    first_cfg = GSMSymbolicConfig(form=form, test_size=50)
    last_cfg = first_cfg.with_overrides(question_position="last")
    first = gsm.generate("train", 120, 5, first_cfg)
    last = gsm.generate("train", 120, 5, last_cfg)
    last.validate(last_cfg.vocab_size)
    L = last_cfg.window
    padded = 0
    for a, b, row, mask, length in zip(first.meta, last.meta, last.tokens, last.loss_mask, last.lengths):
        assert (a["question_position"], b["question_position"]) == ("first", "last")
        # Same problem, same shuffled statements, same answer: only the question moved behind the context.
        m = LAST.fullmatch(b["text"])
        assert m, b["text"]
        context, question, answer = m.groups()
        assert a["text"] == f"{question} Context: {context} Answer: {answer}"
        assert (a["answer"], a["op"], a["n_tokens"]) == (b["answer"], b["op"], b["n_tokens"])
        assert solve_text(a["text"])["answer"] == answer == b["answer"]
        # Token layout: PAD, context, "Q … ;", the cue "A", then the targets (answer + <eos>), then PAD.
        start = b["left_pad"]
        assert (row[:start] == last_cfg.pad_id).all()
        words = decode(last_cfg, row[start : start + b["n_tokens"]]).split(" ")
        q_at, a_at = words.index("Q"), words.index("A")
        assert words[a_at - 1] == ";" and ";" not in words[q_at : a_at - 1] and words[q_at - 1] == ";"
        assert decode(last_cfg, row[mask]).split(" ") == words[a_at + 1 :]
        # The question shares the label window with its answer: it is never consolidated before it is asked.
        assert (start + q_at) // L == (length - 1) // L
        padded += b["left_pad"] > 0
    assert padded > 0  # some questions would have straddled a boundary and were moved into the label window


def test_question_position_is_validated() -> None:
    with pytest.raises(ValueError):
        GSMSymbolicConfig(question_position="middle")
