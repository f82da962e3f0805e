"""Rule 110: the generator against cellpylib (an implementation nobody on the team wrote), chance levels, layout."""

from __future__ import annotations

import time

import cellpylib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsleep.errors import InvalidInput
from agentsleep.tasks import rule110
from agentsleep.tasks.rule110 import Q, Rule110Config


def cellpylib_final_row(state: np.ndarray, steps: int) -> np.ndarray:
    """cellpylib's evolution: the first row is the initial state, so t transitions need timesteps = t + 1."""
    out = cellpylib.evolve(
        np.asarray(state, dtype=int)[None, :],
        timesteps=steps + 1,
        apply_rule=lambda n, c, step: cellpylib.nks_rule(n, 110),
    )
    return out[-1]


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(5, 40),
    steps=st.integers(1, 40),
    data=st.data(),
)
def test_evolve_matches_cellpylib(width: int, steps: int, data: st.DataObject) -> None:
    state = np.array(data.draw(st.lists(st.integers(0, 1), min_size=width, max_size=width)))
    want = cellpylib_final_row(state, steps)
    # The bit-parallel path (used by the generator) and the lookup reference must both agree on the whole row,
    # so a left/right swap cannot hide behind a lucky label bit.
    np.testing.assert_array_equal(rule110.evolve(state[None, :], steps)[0], want)
    lookup = state.copy()
    for _ in range(steps):
        lookup = rule110.rule110_step(lookup)
    np.testing.assert_array_equal(lookup, want)


@settings(max_examples=30, deadline=None)
@given(width=st.integers(5, 40), steps=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_generated_labels_match_cellpylib(width: int, steps: int, seed: int) -> None:
    n_states = min(4, width - 1)
    batch = rule110.generate("train", 3, seed, W=width, t=steps, n_states=n_states)
    for row, meta in zip(batch.tokens, batch.meta):
        states = row[: n_states * width].reshape(n_states, width)
        labels = row[n_states * width + 1 :]
        assert row[n_states * width] == Q
        for i in range(n_states):
            assert labels[i] == cellpylib_final_row(states[i], steps)[0]
        assert meta["labels"] == labels.tolist()


def test_wide_rings_use_the_lookup_path() -> None:
    rng = np.random.default_rng(0)
    state = rng.integers(0, 2, size=70)
    np.testing.assert_array_equal(rule110.evolve(state[None], 9)[0], cellpylib_final_row(state, 9))


# spec §1.3: P(label = 1) after t steps, exact over all 2^W states, rounded to 4 decimals.
SPEC_P1 = {
    24: {1: 0.6250, 2: 0.5312, 4: 0.5352, 8: 0.5406, 12: 0.5435, 16: 0.5559, 24: 0.5590, 32: 0.5617},
    12: {1: 0.6250, 2: 0.5312, 4: 0.5352, 8: 0.5430, 12: 0.5483, 16: 0.5244, 24: 0.5320, 32: 0.5317},
}
SPEC_ALWAYS1_EXACT = {24: {32: 0.0995, 8: 0.0854, 1: 0.1526}, 12: {8: 0.0869, 32: 0.0799}}


@pytest.mark.parametrize("width", [12, 24])
def test_chance_table_matches_spec(width: int) -> None:
    rows = {r["t"]: r for r in rule110.chance_table(width)}
    for t, p in SPEC_P1[width].items():
        assert abs(rows[t]["p1"] - p) <= 6e-5, (width, t, rows[t]["p1"], p)
        assert abs(rows[t]["always1_exact"] - rows[t]["p1"] ** 4) < 1e-12
        assert rows[t]["uniform_exact"] == 1 / 16
    for t, exact in SPEC_ALWAYS1_EXACT[width].items():
        assert abs(rule110.chance_p1(width, t) ** 4 - exact) <= 6e-5


def test_chance_small_ring_by_brute_force() -> None:
    # W = 6: enumerate with the lookup reference, independently of the packed uint32 path.
    states = ((np.arange(64)[:, None] >> np.arange(6)) & 1).astype(np.int64)
    for t in range(0, 7):
        s = states.copy()
        for _ in range(t):
            s = rule110.rule110_step(s)
        assert rule110.chance_p1(6, t) == pytest.approx(s[:, 0].mean(), abs=0)


def test_chance_rejects_wide_rings() -> None:
    with pytest.raises(InvalidInput):
        rule110.chance_p1(25, 4)


@pytest.mark.parametrize("preset", sorted(rule110.PRESETS))
def test_layout(preset: str) -> None:
    cfg = rule110.PRESETS[preset]
    W, S = cfg.width, cfg.n_states
    batch = rule110.generate("test", 64, 3, cfg)
    assert batch.tokens.shape == (64, 4 * W + 5) == (64, cfg.seq_len)
    assert batch.tokens.dtype == np.int64 and batch.loss_mask.dtype == np.bool_
    assert batch.window == W == cfg.window
    expected_mask = np.zeros(cfg.seq_len, bool)
    expected_mask[S * W + 1 :] = True
    assert (batch.loss_mask == expected_mask).all()
    assert set(np.unique(batch.tokens[:, : S * W]).tolist()) <= {0, 1}
    assert (batch.tokens[:, S * W] == Q).all()
    batch.validate(cfg.vocab_size)


def test_paper_ids_and_sizes() -> None:
    cfg = Rule110Config()
    assert (cfg.width, cfg.steps, cfg.n_states, cfg.seq_len, cfg.window) == (24, 32, 4, 101, 24)
    assert cfg.vocab() == ("0", "1", "Q", "<pad>", "<bos>")
    assert (cfg.pad_id, cfg.bos_id, cfg.vocab_size) == (3, 4, 5)


def test_determinism_and_split_streams() -> None:
    a = rule110.generate("train", 50, 7)
    b = rule110.generate("train", 50, 7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert a.meta == b.meta
    for other in (rule110.generate("val", 50, 7), rule110.generate("test", 50, 7), rule110.generate("train", 50, 8)):
        assert not np.array_equal(a.tokens, other.tokens)


def test_score_perfect_wrong_and_baselines() -> None:
    cfg = rule110.PRESETS["toy"]
    batch = rule110.generate("test", 400, 0, cfg)
    perfect = rule110.score(batch.tokens, batch)
    assert perfect["exact"] == perfect["per_label"] == 1.0
    assert all(perfect[f"pos{j}"] == 1.0 for j in range(4))
    flipped = batch.tokens.copy()
    flipped[batch.loss_mask] = 1 - flipped[batch.loss_mask]
    wrong = rule110.score(flipped, batch)
    assert wrong["exact"] == wrong["per_label"] == 0.0
    labels = batch.tokens[batch.loss_mask].reshape(-1, 4)
    p1 = labels.mean()
    always1 = np.where(batch.loss_mask, 1, batch.tokens)
    s = rule110.score(always1, batch)
    assert s["per_label"] == pytest.approx(p1)
    assert s["exact"] == pytest.approx((labels == 1).all(axis=1).mean())
    assert s["majority_label"] == pytest.approx(max(p1, 1 - p1))  # p1 > 0.5 here, so the majority is "always 1"
    assert s["majority_exact"] == pytest.approx(s["exact"])
    assert s["uniform_exact"] == 1 / 16 and s["uniform_label"] == 0.5
    # Target-aligned logits [n, T, V] give the same numbers as their argmax.
    logits = np.eye(cfg.vocab_size)[always1]
    assert rule110.score(logits, batch) == s


def test_generation_speed() -> None:
    rule110.generate("train", 100, 0)  # warm
    start = time.perf_counter()
    batch = rule110.generate("train", 10_000, 0)
    elapsed = time.perf_counter() - start
    assert len(batch) == 10_000
    assert elapsed < 3.0, f"10,000 paper-scale examples took {elapsed:.2f}s (target ≲ 1-2 s)"
