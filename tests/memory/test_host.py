"""AgentHost: the policy drives sleeps between turns, snapshots follow sleeps, over-long turns are split, bad input is
rejected cleanly, and a sleep that fails never fails a turn."""

from __future__ import annotations

import threading

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from agentsleep.errors import ConfigError, InvalidInput, UnknownAgent
from agentsleep.memory import ManualClock, SleepPolicy
from agentsleep.memory.host import AgentHost
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.runtime import TorchEngine
from agentsleep.store import SnapshotStore
from tests.runtime.helpers import blocking_sleep

L, N, VOCAB = 16, 2, 32


def make_engine(tokenizer: Tokenizer | None = None) -> TorchEngine:
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=VOCAB, d_model=64, layout="ag", window=L, bos_token_id=1, gdn_head_dim=64, passes=N)
    return TorchEngine(SleepHybrid(cfg), tokenizer=tokenizer)


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def policy(**kw) -> SleepPolicy:
    base = {"window": L, "passes": N, "soft_threshold": 0.75, "debounce_seconds": 0.0, "retry_backoff_seconds": 0.01}
    return SleepPolicy(**{**base, **kw})


@pytest.fixture
def store(tmp_path) -> SnapshotStore:
    return SnapshotStore(f"sqlite:///{tmp_path / 'snaps.db'}", sqlite_synchronous="OFF")


def sleeps_in(store: SnapshotStore, agent: str = "a") -> list:
    return [r for r in store.history(agent) if r.reason == "sleep"]


def test_sleep_runs_in_the_background_and_the_turn_does_not_wait(store, monkeypatch):
    engine = make_engine()
    started, release = blocking_sleep(engine, monkeypatch)
    with AgentHost(engine, store, policy()) as host:
        host.create("a")
        first = host.turn("a", ids(1, 10), max_new_tokens=3)  # 13 ≥ 12 tokens: past the soft threshold
        assert first.sync_sleeps == 0 and first.background_sleep is not None
        assert started.wait(10)  # the sleep is computing, the turn has returned
        second = host.turn("a", ids(2, 2), max_new_tokens=0)  # and the next turn does not wait for it either
        assert second.sync_sleeps == 0 and not release.is_set()
        release.set()
        record = first.background_sleep.result(10)
        assert record.status == "completed" and record.outcome.tokens == 13
        host.flush(10)
        assert host.session("a").window == tuple(ids(2, 2))  # the late turn was carried into the new window
        (snap,) = sleeps_in(store)
        assert snap.id == host.session("a").snapshot_id and snap.meta["trigger"] == "sleep"
        assert snap.tokens_consolidated == 13 and snap.window_len == 2


def test_a_turn_that_cannot_fit_waits_for_exactly_one_sleep(store):
    with AgentHost(make_engine(), store, policy(soft_threshold=1.0)) as host:  # no threshold sleeps
        host.create("a")
        host.turn("a", ids(1, 10), max_new_tokens=0)
        res = host.turn("a", ids(2, 8), max_new_tokens=2)  # 10 + 8 > 16
        assert res.sync_sleeps == 1 and res.window_tokens == 10
        (rec,) = [r for r in host.scheduler.history("a") if r.status == "completed"]
        assert rec.sync and rec.reason == "sync"
        assert [s.tokens_consolidated for s in sleeps_in(store)] == [10]


def test_an_over_long_turn_is_split_into_windows(store):
    with AgentHost(make_engine(), store, policy(soft_threshold=1.0)) as host:
        host.create("a")
        host.turn("a", ids(1, 5), max_new_tokens=0)
        long = ids(2, 3 * L + 5)  # 53 tokens through a 16-token window
        res = host.turn("a", long, max_new_tokens=2, return_logits=True)
        assert res.input_tokens == len(long) and res.input_logits.shape == (len(long), VOCAB)
        chunks = [s.tokens_consolidated for s in sleeps_in(store)]
        assert chunks == [5, 5 + L, 5 + 2 * L, 5 + 3 * L]  # sleep first, then full windows, the rest stays awake
        assert res.sync_sleeps == 4 and res.window_tokens == 5 + 2
        assert host.session("a").window[:5] == tuple(long[-5:])


def test_a_reply_that_fills_the_window_sleeps_mid_reply_and_is_snapshotted(store):
    with AgentHost(make_engine(), store, policy(soft_threshold=1.0)) as host:
        host.create("a")
        res = host.turn("a", ids(1, 12), max_new_tokens=10)
        assert res.sync_sleeps == 1 and len(res.tokens) == 10
        (snap,) = sleeps_in(store)
        assert snap.meta["trigger"] == "window_full" and snap.tokens_consolidated == L
        assert snap.id == res.snapshot_id


def test_in_turn_mode_puts_the_policy_sleep_on_the_response_path(store):
    with AgentHost(make_engine(), store, policy(), background=False) as host:
        host.create("a")
        quiet = host.turn("a", ids(1, 4), max_new_tokens=1)
        loud = host.turn("a", ids(2, 8), max_new_tokens=1)  # 4 + 1 + 8 + 1 ≥ 12
        assert (quiet.sync_sleeps, loud.sync_sleeps) == (0, 1)
        assert loud.background_sleep is None and loud.window_tokens == 0
        assert sleeps_in(store)[-1].id == loud.snapshot_id


def test_idle_sleep_follows_the_clock_and_a_turn_cancels_it(store):
    clock = ManualClock()
    with AgentHost(make_engine(), store, policy(soft_threshold=1.0, idle_seconds=30.0), clock=clock) as host:
        host.create("a")
        first = host.turn("a", ids(1, 3), max_new_tokens=1)
        clock.advance(20)
        host.turn("a", ids(2, 3), max_new_tokens=1)  # within 30 s: the first idle sleep is cancelled
        assert first.background_sleep.result(5).status == "cancelled"
        clock.advance(31)
        assert host.scheduler.wait_idle(10)
        assert host.session("a").window == () and [s.tokens_consolidated for s in sleeps_in(store)] == [8]


def test_snapshot_turns_saves_every_turn_and_a_fresh_host_revives_on_first_turn(store):
    with AgentHost(make_engine(), store, policy(), background=False, snapshot_turns=True) as host:
        host.create("a")
        results = [host.turn("a", ids(t, 3), max_new_tokens=2) for t in range(6)]
        assert [r.snapshot_id for r in results] == [r.id for r in store.history("a") if r.reason == "turn"]
        with AgentHost(make_engine(), store, policy(), background=False) as fresh:
            got = fresh.turn("a", ids(99, 3), max_new_tokens=4)  # revived from the last "turn" snapshot first
        assert got.tokens == host.turn("a", ids(99, 3), max_new_tokens=4).tokens


def test_text_turns_use_the_engine_tokenizer(store):
    vocab = {"<pad>": 0, "<bos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}  # every model id has a word
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with AgentHost(make_engine(tok), store, policy()) as host:
        host.create("a")
        res = host.turn("a", "w3 w0 w17", max_new_tokens=3)
        assert res.input_tokens == 3 and res.text == " ".join(f"w{t - 2}" for t in res.tokens)
        assert host.turn("a", b"w1 w2", max_new_tokens=0).input_tokens == 2
        with pytest.raises(InvalidInput, match="UTF-8"):
            host.turn("a", b"\xc3\x28")
        with pytest.raises(InvalidInput, match="empty"):
            host.turn("a", "  ")


def test_bad_input_and_unknown_agents_leave_everything_untouched(store):
    with AgentHost(make_engine(), store, policy()) as host:
        host.create("a")
        host.turn("a", ids(1, 3), max_new_tokens=1)
        before = host.session("a")
        for bad, err in [
            ([], InvalidInput),
            ([VOCAB + 1], InvalidInput),
            ("text without a tokenizer", InvalidInput),
            (b"\xff", InvalidInput),
        ]:
            with pytest.raises(err):
                host.turn("a", bad)
        with pytest.raises(InvalidInput, match="sampling"):
            host.turn("a", [3], temperature=-1)
        with pytest.raises(UnknownAgent, match="create it"):
            host.turn("nobody", [3])
        with pytest.raises(InvalidInput, match="already exists"):
            host.create("a")
        assert host.session("a") == before
    with pytest.raises(ConfigError):
        AgentHost(make_engine(), store, policy(window=L + 1))
    with AgentHost(make_engine(), None, policy()) as memoryless, pytest.raises(UnknownAgent):
        memoryless.turn("a", [3])


class FlakyStore(SnapshotStore):
    """A store whose saves fail while ``failing`` is set (the injected fault)."""

    failing = False

    def save(self, agent_id, state, window=(), **kw):
        if self.failing:
            raise OSError("injected: disk full")
        return super().save(agent_id, state, window, **kw)


def test_a_failing_sleep_never_fails_a_turn_and_the_agent_keeps_working(tmp_path):
    store = FlakyStore(f"sqlite:///{tmp_path / 'flaky.db'}", sqlite_synchronous="OFF")
    pol = policy(max_retries=50, retry_backoff_seconds=0.01, retry_backoff_max_seconds=0.02)
    with AgentHost(make_engine(), store, pol) as host:
        host.create("a")
        store.failing = True
        host.turn("a", ids(0, 12), max_new_tokens=1)  # past the threshold: a background sleep, which fails
        mem_before = host.engine.export_state("a")
        for _ in range(200):
            if host.scheduler.stats().failed_attempts >= 2:
                break
            threading.Event().wait(0.01)
        assert host.scheduler.stats().failed_attempts >= 2
        mem_now = host.engine.export_state("a")  # failed sleeps changed nothing
        assert mem_now.state.digest() == mem_before.state.digest() and mem_now.window == mem_before.window
        results = [host.turn("a", ids(t, 6), max_new_tokens=2) for t in range(1, 8)]  # overflows the window twice
        assert all(len(r.tokens) == 2 for r in results)
        assert sum(r.sync_sleeps for r in results) >= 2  # window-full sleeps committed without their snapshots
        assert not sleeps_in(store) and host.session("a").sleep_count >= 2
        store.failing = False  # the disk is back: the retried job goes through and the store catches up
        assert host.flush(10)
        latest = store.latest("a")
        assert latest.record.reason in ("sleep", "resync")
        live = host.engine.export_state("a")
        assert latest.state.digest() == live.state.digest() and tuple(latest.window) == live.window


def test_a_sleep_whose_computation_fails_is_retried_in_the_background(store, monkeypatch):
    engine = make_engine()
    real, calls = engine.model.sleep_window, []

    def flaky(cache, passes=None):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("injected")
        return real(cache, passes)

    monkeypatch.setattr(engine.model, "sleep_window", flaky)
    with AgentHost(engine, store, policy(max_retries=3)) as host:
        host.create("a")
        res = host.turn("a", ids(1, 13), max_new_tokens=0)
        record = res.background_sleep.result(10)
        assert record.status == "completed" and record.attempts == 3
        assert host.session("a").window == () and len(sleeps_in(store)) == 1
