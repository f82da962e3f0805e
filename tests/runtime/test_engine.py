"""TorchEngine: wake (observe / generate), sleep, export / import, atomicity, concurrency and bad input."""

from __future__ import annotations

import threading

import pytest
import torch

from agentsleep.errors import InvalidInput, SleepFailed, SnapshotMismatch, UnknownAgent, WindowOverflow
from agentsleep.runtime import (
    AgentMemory,
    Engine,
    GenerateRequest,
    SamplingParams,
    SleepCommit,
    TorchEngine,
)
from agentsleep.runtime.sampling import filter_logits, sample_next

from .helpers import VOCAB, blocking_sleep, make_model, turn_tokens

L, N = 16, 3


def stream_reference(model, tokens: list[int], passes: int) -> torch.Tensor:
    """Paper.md §5's streaming recipe written directly on the model: one token at a time, and when the window is
    full, sleep (passes 2..N over the cached pass-1 features) before the next token. Returns logits [T, V]."""
    cache = model.start_window(model.init_state(1))
    out = []
    for t in tokens:
        if cache.n_fresh == model.config.window:
            cache = model.start_window(model.sleep_window(cache, passes))
        out.append(model.extend(cache, torch.tensor([[t]]))[0, -1])
    return torch.stack(out)


@pytest.fixture
def engine() -> TorchEngine:
    return TorchEngine(make_model(window=L, passes=N))


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert (engine.window, engine.passes, engine.vocab_size) == (L, N, VOCAB)


def test_observe_and_generate_follow_the_streaming_recipe_across_windows():
    model = make_model(window=L, passes=N, dtype=torch.float64)
    eng = TorchEngine(model)
    eng.create_agent("a")
    first, prompt = turn_tokens(1, 37), turn_tokens(2, 5)  # 37 tokens: two window-full sleeps inside observe
    obs = eng.observe("a", first, return_logits=True)
    gen = eng.generate("a", prompt, SamplingParams(max_new_tokens=12), return_logits=True)  # fills the window again
    assert obs.sleeps == 2 and gen.sleeps == 1
    stream = first + prompt + list(gen.tokens)
    ref = stream_reference(model, stream[:-1], N)  # the last new token has not run yet (it waits in the window)
    got = torch.cat([obs.logits, gen.prompt_logits, gen.logits[1:]])
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-10  # float64: the same math, token by token or not
    assert list(gen.tokens) == ref[len(first) + len(prompt) - 1 :].argmax(-1).tolist()  # greedy = argmax
    s = eng.session("a")
    assert s.sleep_count == 3 and s.tokens_seen == len(stream)
    assert s.window == tuple(stream[s.tokens_consolidated :]) and s.tokens_since_sleep == len(s.window)


def test_the_last_generated_token_waits_and_joins_the_next_input(engine):
    engine.create_agent("a")
    gen = engine.generate("a", turn_tokens(3, 4), SamplingParams(max_new_tokens=3))
    s = engine.session("a")
    assert s.window[-1] == gen.tokens[-1] and len(s.window) == 7
    live = engine._agents["a"]
    assert live.pending == [gen.tokens[-1]] and live.cache.n_fresh == 6  # not run through the model yet
    engine.observe("a", [5])
    assert live.pending == [] and live.cache.n_fresh == 8


def test_sampling_is_reproducible_with_a_seed(engine):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(4, 6))
    mem = engine.export_state("a")
    runs = []
    for seed in (7, 7, 8, 9):
        engine.import_state("a", mem)
        out = engine.generate("a", [3, 4], SamplingParams(max_new_tokens=12, temperature=1.5, seed=seed))
        runs.append(out.tokens)
    assert runs[0] == runs[1]
    assert len({runs[0], runs[2], runs[3]}) > 1  # different seeds draw different text
    engine.import_state("a", mem)
    g = torch.Generator().manual_seed(7)
    assert (
        engine.generate("a", [3, 4], SamplingParams(max_new_tokens=12, temperature=1.5), generator=g).tokens == runs[0]
    )


def test_top_k_and_top_p_keep_only_their_support():
    torch.manual_seed(0)
    logits = torch.randn(VOCAB)
    kept = torch.isfinite(filter_logits(logits, 5, None))
    assert kept.sum() == 5 and set(kept.nonzero().flatten().tolist()) == set(logits.topk(5).indices.tolist())
    probs = logits.softmax(-1)
    nucleus = torch.isfinite(filter_logits(logits, None, 0.6))
    order = probs.argsort(descending=True)
    need = int((probs[order].cumsum(0) < 0.6).sum()) + 1  # smallest prefix whose mass reaches 0.6
    assert set(nucleus.nonzero().flatten().tolist()) == set(order[:need].tolist())
    for seed in range(20):  # sampling never leaves the support
        tok = sample_next(
            logits, SamplingParams(temperature=2.0, top_k=3, seed=seed), torch.Generator().manual_seed(seed)
        )
        assert tok in logits.topk(3).indices.tolist()
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), None) == int(logits.argmax())


def test_stop_tokens_end_generation_and_stay_in_the_window(engine):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(5, 5))
    mem = engine.export_state("a")
    free = engine.generate("a", [9], SamplingParams(max_new_tokens=6))
    engine.import_state("a", mem)
    stopped = engine.generate("a", [9], SamplingParams(max_new_tokens=6, stop_tokens=(free.tokens[2],)))
    cut = free.tokens.index(free.tokens[2]) + 1
    assert stopped.tokens == free.tokens[:cut] and stopped.stop_reason == "stop"
    assert free.stop_reason == "length"
    assert engine.session("a").window[-1] == free.tokens[2]


def test_max_new_tokens_zero_only_takes_the_prompt_in(engine):
    engine.create_agent("a")
    out = engine.generate("a", [4, 5, 6], SamplingParams(max_new_tokens=0))
    assert out.tokens == () and engine.session("a").window == (4, 5, 6)


def test_export_import_round_trip_continues_the_agent(engine):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(6, 20))
    engine.generate("a", [4], SamplingParams(max_new_tokens=3))
    mid = engine.export_state("a")  # mid-window: replayed in one prefill
    other = TorchEngine(make_model(window=L, passes=N))  # same seed: same weights, a separate model object
    assert other.fingerprint == engine.fingerprint
    other.import_state("b", mid)
    assert other.session("b").window == engine.session("a").window
    a = engine.generate("a", [7, 8], SamplingParams(max_new_tokens=8), return_logits=True)
    b = other.generate("b", [7, 8], SamplingParams(max_new_tokens=8), return_logits=True)
    assert a.tokens == b.tokens
    assert torch.allclose(a.logits, b.logits, atol=1e-5)  # replay vs token-by-token: float rounding only
    engine.sleep("a")
    after = engine.export_state("a")  # post-sleep: empty window, restores bit-exactly
    assert after.window == ()
    other.import_state("b", after)
    a = engine.generate("a", [3], SamplingParams(max_new_tokens=5), return_logits=True)
    b = other.generate("b", [3], SamplingParams(max_new_tokens=5), return_logits=True)
    assert a.tokens == b.tokens and torch.equal(a.logits, b.logits)


def test_a_generated_token_past_the_window_waits_for_the_next_window(engine):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(7, L - 2))
    engine.generate("a", [3], SamplingParams(max_new_tokens=2))  # window: L processed + 1 waiting
    mem = engine.export_state("a")
    assert len(mem.window) == L + 1
    other = TorchEngine(make_model(window=L, passes=N))
    other.import_state("b", mem)
    ra = engine.observe("a", [5, 6], return_logits=True)
    rb = other.observe("b", [5, 6], return_logits=True)
    assert ra.sleeps == rb.sleeps == 1 and engine.session("a").window == other.session("b").window
    assert torch.allclose(ra.logits, rb.logits, atol=1e-5)
    with pytest.raises(WindowOverflow):
        other.import_state("c", AgentMemory(mem.state, (*mem.window, 4)))


def test_sleep_clears_the_window_and_an_empty_window_is_not_slept(engine):
    engine.create_agent("a")
    assert engine.sleep("a").skipped == "empty"
    engine.observe("a", turn_tokens(8, 9))
    before = engine.export_state("a")
    res = engine.sleep("a", 2)
    assert (res.tokens, res.passes, res.skipped) == (9, 2, None)
    s = engine.session("a")
    assert s.window == () and s.sleep_count == 1 and s.tokens_consolidated == 9
    want = engine.model.sleep(torch.tensor([before.window]), before.state, 2)  # parallel window: rounding only
    assert engine.export_state("a").state.allclose(want, atol=1e-5)


@pytest.mark.parametrize("where", ["persist", "model"])
def test_a_failing_sleep_leaves_the_agent_exactly_as_it_was(engine, monkeypatch, where):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(9, 11))
    before = engine.export_state("a")

    def boom(*_a, **_k):
        raise RuntimeError("injected")

    if where == "model":
        monkeypatch.setattr(engine.model, "sleep_window", boom)
    with pytest.raises(RuntimeError, match="injected"):
        engine.sleep("a", persist=boom if where == "persist" else None)
    after = engine.export_state("a")
    assert after.window == before.window and after.state.digest() == before.state.digest()
    assert engine.session("a").sleep_count == 0
    monkeypatch.undo()
    assert engine.sleep("a").tokens == 11  # and a retry works


def test_persist_sees_the_new_memory_before_the_swap(engine):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(10, 6))
    seen: list[SleepCommit] = []

    def persist(commit: SleepCommit) -> str:
        seen.append(commit)
        assert engine._agents["a"].window  # not swapped yet
        return "snap-1"

    res = engine.sleep("a", persist=persist)
    assert res.snapshot_id == "snap-1" == engine.session("a").snapshot_id
    (c,) = seen
    assert (c.tokens, c.trigger, c.memory.window, c.memory.sleep_count) == (6, "sleep", (), 1)
    assert c.memory.state.digest() == engine.export_state("a").state.digest()


def test_turns_go_on_while_a_sleep_computes_and_are_carried_into_the_new_window(engine, monkeypatch):
    engine.create_agent("a")
    first = turn_tokens(11, 8)
    engine.observe("a", first)
    snap = engine.export_state("a")
    started, release = blocking_sleep(engine, monkeypatch)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", engine.sleep("a")))
    t.start()
    assert started.wait(10)
    late = turn_tokens(12, 3)
    engine.observe("a", late)  # does not wait for the sleep
    release.set()
    t.join(10)
    r = result["r"]
    assert (r.tokens, r.carried, r.skipped) == (8, 3, None)
    mem = engine.export_state("a")
    assert mem.window == tuple(late)
    want = engine.model.sleep(torch.tensor([first]), snap.state, N)
    assert mem.state.allclose(want, atol=1e-5)  # S consolidates exactly the window the sleep froze


def test_a_sleep_overtaken_by_an_import_is_dropped(engine, monkeypatch):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(13, 5))
    started, release = blocking_sleep(engine, monkeypatch)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", engine.sleep("a")))
    t.start()
    assert started.wait(10)
    fresh = AgentMemory(engine.model.init_state(1), (4, 5))
    engine.import_state("a", fresh)
    release.set()
    t.join(10)
    assert result["r"].skipped == "superseded"
    assert engine.export_state("a").window == (4, 5) and engine.session("a").sleep_count == 0


def test_a_failing_extend_leaves_the_agent_unchanged(engine, monkeypatch):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(14, 4))
    before = engine.session("a")

    def boom(*_a, **_k):
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.model, "extend", boom)
    with pytest.raises(RuntimeError):
        engine.observe("a", [5, 6])
    monkeypatch.undo()
    assert engine.session("a") == before
    assert engine.observe("a", [5, 6]).window_tokens == 6


def test_a_window_full_sleep_that_cannot_compute_raises_sleep_failed(engine, monkeypatch):
    engine.create_agent("a")
    engine.observe("a", turn_tokens(15, L))

    def boom(*_a, **_k):
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.model, "sleep_window", boom)
    with pytest.raises(SleepFailed, match="0 of 2 tokens"):
        engine.observe("a", [5, 6])
    assert engine.session("a").window_tokens == L


def test_generate_batch_equals_generate_one_by_one():
    model = make_model(window=L, passes=N)
    batch_eng, one_eng = TorchEngine(model), TorchEngine(model)
    prompts = {"a": 3, "b": 3, "c": 5, "d": 14, "e": 3}  # a, b, e share window shapes; d crosses a window
    reqs = []
    for i, (name, n) in enumerate(prompts.items()):
        for eng in (batch_eng, one_eng):
            eng.create_agent(name)
            eng.observe(name, turn_tokens(20 + i, 4))
        sp = SamplingParams(max_new_tokens=9, temperature=0.0 if i % 2 else 1.0, seed=i, stop_tokens=(0,))
        reqs.append(GenerateRequest(name, turn_tokens(30 + i, n), sp))
    batched = batch_eng.generate_batch(reqs, return_logits=True)
    for r, got in zip(reqs, batched):
        want = one_eng.generate(r.agent_id, r.prompt, r.sampling, return_logits=True)
        assert got.tokens == want.tokens and got.sleeps == want.sleeps
        assert torch.allclose(got.logits, want.logits, atol=1e-5)
        assert batch_eng.session(r.agent_id) == one_eng.session(r.agent_id)
    with pytest.raises(InvalidInput, match="only once"):
        batch_eng.generate_batch([reqs[0], reqs[0]])


def test_bad_input_is_rejected_with_clear_errors(engine):
    engine.create_agent("a")
    with pytest.raises(InvalidInput, match="empty"):
        engine.observe("a", [])
    with pytest.raises(InvalidInput, match="token ids"):
        engine.observe("a", "hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        engine.observe("a", [VOCAB])
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        engine.generate("a", [-1])
    with pytest.raises(InvalidInput):
        engine.observe("a", [1.5])  # type: ignore[list-item]
    with pytest.raises(InvalidInput):
        engine.observe("a", [True])
    with pytest.raises(InvalidInput):
        engine.observe("a", torch.tensor([[1, 2]]))
    with pytest.raises(InvalidInput):
        engine.observe("a", torch.tensor([1.0]))
    with pytest.raises(InvalidInput, match="sampling"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(InvalidInput, match="sampling"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidInput, match="stop_tokens"):
        engine.generate("a", [3], SamplingParams(stop_tokens=(VOCAB + 3,)))
    with pytest.raises(InvalidInput, match="passes"):
        engine.sleep("a", 0)
    with pytest.raises(InvalidInput, match="already exists"):
        engine.create_agent("a")
    with pytest.raises(InvalidInput, match="agent id"):
        engine.create_agent("")
    with pytest.raises(InvalidInput, match="no tokenizer"):
        engine.encode("hello")
    assert engine.session("a").window == ()  # none of it touched the agent


def test_unknown_and_removed_agents_raise_unknown_agent(engine):
    for call in (
        lambda: engine.observe("ghost", [3]),
        lambda: engine.generate("ghost", [3]),
        lambda: engine.sleep("ghost"),
        lambda: engine.export_state("ghost"),
        lambda: engine.session("ghost"),
        lambda: engine.remove_agent("ghost"),
    ):
        with pytest.raises(UnknownAgent, match="ghost"):
            call()
    engine.create_agent("a")
    engine.remove_agent("a")
    assert not engine.has_agent("a")
    with pytest.raises(UnknownAgent):
        engine.observe("a", [3])


def test_import_rejects_a_memory_of_another_model(engine):
    other = make_model(window=L, passes=N, seed=1)
    with pytest.raises(SnapshotMismatch):
        engine.import_state("a", AgentMemory(other.init_state(1)))
    with pytest.raises(InvalidInput):
        engine.import_state("a", AgentMemory(engine.model.init_state(1), (VOCAB,)))
    with pytest.raises(InvalidInput):
        engine.import_state("a", "not a memory")  # type: ignore[arg-type]
    assert not engine.has_agent("a")


def test_turns_go_on_while_a_sleep_persists_and_a_full_window_waits_for_it(engine):
    engine.create_agent("a")
    first = turn_tokens(16, 10)
    engine.observe("a", first)
    persisting, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_persist(commit: SleepCommit) -> str:
        persisting.set()
        assert release.wait(10)
        order.append("sleep")
        return "snap-sleep"

    t = threading.Thread(target=lambda: engine.sleep("a", persist=slow_persist))
    t.start()
    assert persisting.wait(10)
    late = turn_tokens(17, L - 10)
    assert engine.observe("a", late).sleeps == 0  # taken in while the sleep persists: the old window fills up
    overflow: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: overflow.setdefault("r", engine.observe("a", [5, 6, 7])))
    waiter.start()  # no room: this must wait for the sleep in flight, not sleep a second time
    saver = threading.Thread(target=lambda: engine.checkpoint("a", lambda m: order.append("checkpoint") or "c"))
    saver.start()  # a checkpoint must land in the store after the sleep's snapshot
    waiter.join(0.2)
    assert waiter.is_alive() and order == []
    release.set()
    for th in (t, waiter, saver):
        th.join(10)
    assert overflow["r"].sleeps == 0 and order == ["sleep", "checkpoint"]
    s = engine.session("a")
    assert s.sleep_count == 1 and s.tokens_consolidated == 10 and s.window == (*late, 5, 6, 7)
