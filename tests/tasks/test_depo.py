"""Depo: every example is re-solved from its tokens by an independent parser; statistics match spec §2.3."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agentsleep.tasks import depo
from agentsleep.tasks.depo import DepoConfig


def parse_names(tokens: list[int], mini_vocab: int) -> list[tuple[int, ...]]:
    """Split a run of name tokens at the end-of-name markers (ids above mini_vocab)."""
    names, cur = [], []
    for t in tokens:
        cur.append(t)
        if t > mini_vocab:
            names.append(tuple(cur))
            cur = []
    assert not cur, "a name without its end marker"
    return names


def solve(row: np.ndarray, mask: np.ndarray, cfg: DepoConfig) -> dict:
    """Rebuild the cycle from the edge list and check every query's answer and loss mask."""
    mv, pad = cfg.mini_vocab, cfg.pad_id
    cycle = row[: cfg.block].tolist()
    first = next(i for i, t in enumerate(cycle) if t != pad)
    assert all(t == pad for t in cycle[:first]) and all(t != pad for t in cycle[first:])
    names = parse_names(cycle[first:], mv)
    assert len(names) % 2 == 0
    edges = list(zip(names[0::2], names[1::2]))
    succ = dict(edges)
    n = len(edges)
    assert len(succ) == n and set(succ) == set(succ.values()), "not a permutation of the nodes"
    node = edges[0][0]
    for step in range(1, n + 1):  # one cycle through all n nodes
        node = succ[node]
        if node == edges[0][0]:
            assert step == n
    assert all(cfg.min_len <= len(x) <= cfg.max_len for x in succ)
    assert not mask[: cfg.block].any()

    qa = row[cfg.block :].tolist()
    qmask = mask[cfg.block :].tolist()
    i, ks, starts = 0, [], []
    while i < len(qa) and qa[i] != pad:
        k = qa[i] - cfg.hop_id0 + 1
        assert 1 <= k <= cfg.hops and not qmask[i]
        j = i + 1
        start = []
        while qa[j] <= mv:
            start.append(qa[j])
            j += 1
        start.append(qa[j])
        start = tuple(start)
        assert not any(qmask[i + 1 : j + 1])
        assert qa[j + 1] == cfg.ans_id and qmask[j + 1]
        want = start
        for _ in range(k):
            want = succ[want]
        got = tuple(qa[j + 2 : j + 2 + len(want)])
        assert got == want and all(qmask[j + 2 : j + 2 + len(want)])
        ks.append(k)
        starts.append(start)
        i = j + 2 + len(want)
    assert all(t == pad for t in qa[i:]) and not any(qmask[i:])
    assert len(starts) == len(set(starts)) == min(n, cfg.n_queries)
    return {"n": n, "k": ks, "cycle_tokens": len(cycle) - first}


@pytest.mark.parametrize("preset", ["paper", "toy", "micro", "mini"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_solve(preset: str, split: str) -> None:
    cfg = depo.PRESETS[preset]
    batch = depo.generate(split, 200, 11, cfg)
    assert batch.tokens.shape == (200, cfg.seq_len)
    batch.validate(cfg.vocab_size)
    for row, mask, meta in zip(batch.tokens, batch.loss_mask, batch.meta):
        got = solve(row, mask, cfg)
        assert got["n"] == meta["n"] and got["k"] == meta["k"] and got["cycle_tokens"] == meta["cycle_tokens"]
        if split == "test":
            assert got["n"] == cfg.n_max and set(got["k"]) <= set(cfg.eval_k())


@pytest.mark.parametrize("split", ["train", "test"])
def test_fewer_nodes_than_queries(split: str) -> None:
    """n_max < M (a small decoy or hidden cycle of an episode): min(n, M) queries, each still correct."""
    cfg = depo.PRESETS["micro"].with_overrides(n_max=3)
    batch = depo.generate(split, 50, 2, cfg)
    for row, mask, meta in zip(batch.tokens, batch.loss_mask, batch.meta):
        got = solve(row, mask, cfg)
        assert len(got["k"]) == min(got["n"], cfg.n_queries) == len(meta["k"])


def test_paper_vocabulary_table() -> None:
    cfg = DepoConfig()
    v = cfg.vocab()
    assert len(v) == cfg.vocab_size == 120
    ids = (cfg.pad_id, cfg.hop_id0, cfg.hop_id0 + 15, cfg.ans_id, cfg.bos_id, cfg.sep_id)
    assert ids == (0, 101, 116, 117, 118, 119)
    assert v[1] == "w1" and v[50] == "w50" and v[51] == "w1." and v[100] == "w50."
    assert depo.PRESETS["toy"].vocab() == v  # the toy shares the paper's id table
    assert (cfg.seq_len, cfg.window) == (360, 75)
    toy = depo.PRESETS["toy"]
    assert (toy.n_max, toy.hops, toy.n_queries, toy.block, toy.qa_block, toy.window, toy.seq_len) == (
        25, 8, 4, 100, 25, 25, 125,
    )  # fmt: skip


def test_eval_k_sets() -> None:
    assert DepoConfig().eval_k() == (1, 2, 4, 8, 16)
    assert depo.PRESETS["toy"].eval_k() == (1, 2, 4, 8)
    assert DepoConfig(K=12, n_hop_tokens=16).eval_k() == (1, 2, 4, 8, 12)
    assert DepoConfig(K=32, n_hop_tokens=32).eval_k() == (1, 2, 4, 8, 16, 24, 32)


def test_training_statistics_match_spec() -> None:
    """spec §2.3 (5,000 simulated samples): n mean 27.8 / median 22, 24.6% with n < 10, cycle 86.6, QA 45.5."""
    batch = depo.generate("train", 5000, 0)
    n = np.array([m["n"] for m in batch.meta])
    cyc = np.array([m["cycle_tokens"] for m in batch.meta])
    qa = np.array([m["qa_tokens"] for m in batch.meta])
    assert abs(n.mean() - 27.8) < 1.0  # the exact mean of 1/(i + sqrt 75) on 3..75 is 27.48
    assert 20 <= np.median(n) <= 24
    assert abs((n < 10).mean() - 0.246) < 0.03
    assert abs(cyc.mean() - 86.6) < 4 and cyc.max() <= 300
    assert abs(qa.mean() - 45.5) < 1.5 and qa.max() <= 60
    ks = np.concatenate([m["k"] for m in batch.meta])
    assert set(ks.tolist()) == set(range(1, 17))
    spans = depo.span_histogram(batch)
    assert spans[1] > spans[4]  # a typical training cycle sits in the last window (spec §2.3)
    test = depo.generate("test", 1000, 0)
    tcyc = np.array([m["cycle_tokens"] for m in test.meta])
    assert abs(tcyc.mean() - 240) < 3 and tcyc.min() >= 200
    assert depo.span_histogram(test).get(4, 0) > 900  # a test cycle spans all 4 windows


def test_determinism_and_split_streams() -> None:
    a = depo.generate("train", 40, 5)
    b = depo.generate("train", 40, 5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.meta == b.meta
    assert not np.array_equal(a.tokens, depo.generate("val", 40, 5).tokens)
    assert not np.array_equal(depo.generate("val", 40, 5).tokens, depo.generate("test", 40, 5).tokens)


def test_score_and_per_k_ce() -> None:
    cfg = DepoConfig()
    batch = depo.generate("test", 300, 2, cfg)
    perfect = depo.score(batch.tokens, batch, cfg)
    assert perfect["exact"] == 1.0 and all(perfect[f"exact_k{k}"] == 1.0 for k in cfg.eval_k())
    wrong = batch.tokens.copy()
    wrong[batch.loss_mask] = cfg.pad_id
    assert depo.score(wrong, batch, cfg)["exact"] == 0.0

    # Break only the last answer-name token of every k = 1 query: exact_k1 drops to 0, the rest stay at 1.
    k_at = np.zeros_like(batch.tokens)
    for i, row in enumerate(batch.tokens):
        k = 0
        for j in range(cfg.block, cfg.seq_len):
            if cfg.hop_id0 <= row[j] < cfg.hop_id0 + cfg.n_hop_tokens:
                k = row[j] - cfg.hop_id0 + 1
            k_at[i, j] = k
    name_target = batch.loss_mask & (batch.tokens != cfg.ans_id)
    last_of_name = name_target & (batch.tokens > cfg.mini_vocab)
    pred = batch.tokens.copy()
    pred[last_of_name & (k_at == 1)] = 0
    s = depo.score(pred, batch, cfg)
    assert s["exact_k1"] == 0.0 and s["exact_k2"] == 1.0 and s["exact_k16"] == 1.0
    assert s["ans_acc"] == 1.0

    ce = np.where(name_target, k_at.astype(float), 0.0)
    ce[batch.loss_mask & (batch.tokens == cfg.ans_id)] = 99.0  # ANS must not count
    out = depo.per_k_ce(ce, batch, cfg)
    assert all(out[f"ce_k{k}"] == pytest.approx(k) for k in cfg.eval_k())


def test_generation_speed() -> None:
    depo.generate("train", 100, 0)
    start = time.perf_counter()
    depo.generate("train", 10_000, 0)
    depo.generate("test", 10_000, 0, depo.PRESETS["toy"])
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"20,000 Depo examples took {elapsed:.2f}s (target ≲ 1-2 s per 10,000)"
