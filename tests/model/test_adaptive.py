"""Adaptive sleep (`agentsleep.model.adaptive`): every stream equals a fixed-N sleep at the N it stopped at, the
stopping rules do what they say, and bad settings are refused."""

from __future__ import annotations

import math

import pytest
import torch

from agentsleep.errors import InvalidInput, WindowOverflow
from agentsleep.model.adaptive import AutoPasses, forward_adaptive, sleep_adaptive, sleep_window_adaptive
from agentsleep.model.hybrid import HybridConfig, SleepHybrid

V, BOS, PAD = 9, 7, 8


def make(eviction: str = "hard", layout: str = "ag", window: int = 6) -> SleepHybrid:
    cfg = HybridConfig(
        vocab_size=V, d_model=64, layout=layout, window=window, eviction=eviction, bos_token_id=BOS,
        pad_token_id=PAD, gdn_heads=1, passes=4,
    )  # fmt: skip
    m = SleepHybrid(cfg).double().eval()
    with torch.no_grad():  # slow forgetting and a strong read-out, so S differs from pass to pass
        for b in m.layers:
            if b.kind == "g":
                b.linear_attn.A_log.fill_(-3.0)
                b.linear_attn.out_proj.weight.mul_(8.0)
    return m


def toks(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(seed))


def warm_state(m: SleepHybrid, B: int):  # a non-zero state entering the window under test
    return m.sleep(toks(B, m.config.window, seed=9), m.init_state(B), 2)


def assert_states_equal(a, b, rows: slice | int = slice(None)) -> None:
    for x, y in zip(a.ssm, b.ssm):
        torch.testing.assert_close(x[rows], y, rtol=1e-9, atol=1e-10)
    for (ka, va), (kb, vb) in zip(a.kv, b.kv):
        torch.testing.assert_close(ka[rows], kb, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(va[rows], vb, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("criterion", ["state", "kl"])
def test_tol_zero_is_the_fixed_n_sleep(eviction: str, criterion: str) -> None:
    m = make(eviction)
    st, x = warm_state(m, 3), toks(3, 6, seed=1)
    out = sleep_adaptive(m, x, st, max_passes=5, tol=0.0, criterion=criterion)
    assert out.passes.tolist() == [5, 5, 5] and len(out.deltas) == 4
    assert_states_equal(out.state, m.sleep(x, st, 5))
    assert out.state.fingerprint == m.fingerprint


@pytest.mark.parametrize("criterion", ["state", "kl"])
def test_huge_tol_stops_after_the_first_comparison(criterion: str) -> None:
    m = make()
    st, x = warm_state(m, 2), toks(2, 6, seed=2)
    out = sleep_adaptive(m, x, st, max_passes=6, tol=math.inf, criterion=criterion)
    assert out.passes.tolist() == [2, 2]
    assert_states_equal(out.state, m.sleep(x, st, 2))
    one = sleep_adaptive(m, x, st, max_passes=1, tol=math.inf, criterion=criterion)
    assert one.passes.tolist() == [1, 1] and one.deltas == []
    assert_states_equal(one.state, m.sleep(x, st, 1))


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("criterion", ["state", "kl"])
def test_each_stream_equals_a_fixed_sleep_at_the_n_it_used(eviction: str, criterion: str) -> None:
    m = make(eviction)
    B = 6
    x = toks(B, 6, seed=3)
    x[4, 3:] = PAD  # a padded stream stops on its own too
    st = warm_state(m, B)
    probe = sleep_adaptive(m, x, st, max_passes=6, tol=0.0, criterion=criterion)
    measures = torch.stack(probe.deltas)  # [passes − 1, B]
    tol = float(measures[1:3].median())  # between pass 3's and pass 4's spread: streams stop at different passes
    out = sleep_adaptive(m, x, st, max_passes=6, tol=tol, criterion=criterion)
    used = out.passes.tolist()
    assert len(set(used)) > 1, used
    for b in range(B):
        # the stream stopped at the first pass whose measure fell below tol (or ran to max_passes)
        below = [j + 2 for j in range(measures.shape[0]) if measures[j, b] < tol]
        assert used[b] == (below[0] if below else 6)
        single = m.sleep(x[b : b + 1], st.select(b), used[b])
        assert_states_equal(out.state, single, rows=slice(b, b + 1))


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("criterion", ["state", "kl"])
def test_streaming_window_sleep_equals_the_whole_window_sleep(eviction: str, criterion: str) -> None:
    m = make(eviction)
    B = 4
    x = toks(B, 6, seed=6)
    st = warm_state(m, B)
    probe = sleep_adaptive(m, x, st, max_passes=5, tol=0.0, criterion=criterion)
    tol = float(torch.stack(probe.deltas)[1:3].median())
    want = sleep_adaptive(m, x, st, max_passes=5, tol=tol, criterion=criterion)
    cache = m.start_window(st)
    m.extend(cache, x[:, :4])  # decoding feeds the window in pieces
    m.extend(cache, x[:, 4:])
    got = sleep_window_adaptive(m, cache, max_passes=5, tol=tol, criterion=criterion)
    assert got.passes.tolist() == want.passes.tolist() and len(set(got.passes.tolist())) > 1
    for a, b in zip(got.deltas, want.deltas):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    for b in range(B):
        assert_states_equal(got.state, want.state.select(b), rows=slice(b, b + 1))
    cache = m.start_window(st)
    m.extend(cache, x)
    full = sleep_window_adaptive(m, cache, max_passes=5, tol=0.0, criterion=criterion)  # never stops early
    assert full.passes.tolist() == [5] * B
    assert_states_equal(full.state, m.sleep_window(cache, 5))


def test_state_measure_is_the_relative_change_of_s() -> None:
    m = make()
    st, x = warm_state(m, 2), toks(2, 6, seed=4)
    out = sleep_adaptive(m, x, st, max_passes=3, tol=0.0)
    s2, s3 = m.sleep(x, st, 2).ssm[0], m.sleep(x, st, 3).ssm[0]
    want = (s3 - s2).flatten(1).norm(dim=1) / s3.flatten(1).norm(dim=1)
    torch.testing.assert_close(out.deltas[1].double(), want, rtol=1e-5, atol=1e-7)


def test_no_carried_state_means_one_pass() -> None:
    m = make(layout="aa")  # attention only, hard eviction: nothing crosses the window
    out = sleep_adaptive(m, toks(2, 6), m.init_state(2), max_passes=4, tol=0.1)
    assert out.passes.tolist() == [1, 1]


@pytest.mark.parametrize("criterion", ["state", "kl"])
def test_forward_adaptive_matches_forward(criterion: str) -> None:
    m = make()
    T = 4 * 6
    x = toks(3, T, seed=5)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[:, 19:] = True  # the last window is scored, the first three are slept
    logits, used = forward_adaptive(m, x, mask, max_passes=3, tol=0.0, criterion=criterion)
    ref, _ = m(x, mask, 3)
    torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)
    assert used.tolist() == [[3, 3, 3, 0]] * 3
    early, used2 = forward_adaptive(m, x, mask, max_passes=3, tol=math.inf, criterion=criterion)
    torch.testing.assert_close(early, m(x, mask, 2)[0], rtol=1e-9, atol=1e-9)
    assert used2.tolist() == [[2, 2, 2, 0]] * 3


def test_bad_settings_are_refused() -> None:
    m = make()
    st, x = m.init_state(1), toks(1, 6)
    for kw in ({"max_passes": 0, "tol": 0.1}, {"max_passes": 2, "tol": -1.0}, {"max_passes": 2, "tol": math.nan}):
        with pytest.raises(InvalidInput):
            sleep_adaptive(m, x, st, **kw)
    with pytest.raises(InvalidInput):
        sleep_adaptive(m, x, st, max_passes=2, tol=0.1, criterion="entropy")  # type: ignore[arg-type]
    with pytest.raises(WindowOverflow):
        sleep_adaptive(m, toks(1, 7), st, max_passes=2, tol=0.1)
    with pytest.raises(InvalidInput):
        AutoPasses(max_passes=0)
    with pytest.raises(InvalidInput):
        forward_adaptive(m, toks(1, 6), torch.zeros(1, 5, dtype=torch.bool), max_passes=2, tol=0.1)
