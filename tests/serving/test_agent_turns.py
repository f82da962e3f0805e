"""The server's agent layer without vLLM: window composition, the resident memory and its version check, saves that
are compare-and-sets, idempotent turns, synchronous and background sleeps, and the HTTP status of every error (the
ASGI wiring and vLLM are exercised by test_server.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from agentsleep.errors import InvalidInput, SnapshotConflict, SnapshotMismatch, UnknownAgent, WindowOverflow
from agentsleep.memory import SleepPolicy
from agentsleep.model.state import FastWeights
from agentsleep.runtime import TextCodec
from agentsleep.serving.params import AgentParams, ConnectorParams
from agentsleep.serving.resident import state_key
from agentsleep.serving.server import http_error
from agentsleep.serving.turns import AgentTurns, Turn
from agentsleep.store import SnapshotStore

from .helpers import BOS, WINDOW, make_model, make_tokenizer, noise_state, rand_tokens


@pytest.fixture()
def turns(tmp_path: Path):
    model = make_model()
    store = SnapshotStore(f"sqlite:///{tmp_path / 's.db'}")
    policy = SleepPolicy(window=WINDOW, passes=2, soft_threshold=0.75, debounce_seconds=0.0)
    t = AgentTurns(model, store, TextCodec(make_tokenizer()), policy)
    yield t
    t.close()


def _plan(turns: AgentTurns, kv: dict, prompt: list[int] | str, max_tokens: int) -> Turn:
    body = {"prompt": prompt, "max_tokens": max_tokens}
    ids, n = turns.check(body)
    return turns.plan(AgentParams.parse(kv), body, ids, n)


def _serve(turns: AgentTurns, kv: dict, prompt: list[int] | str, max_tokens: int) -> tuple[Turn, str]:
    """plan -> what vLLM would answer (random reply tokens) -> commit -> release; returns (turn, saved id)."""
    turn = _plan(turns, kv, prompt, max_tokens)
    window_tokens = None
    try:
        reply = rand_tokens(max_tokens, len(turn.body["prompt"]))
        rec = turns.commit(turn, reply, {"text": "", "finish_reason": "length", "stop_reason": None})
        window_tokens = rec.window_len
    finally:
        turns.release(turn, window_tokens)
    return turn, rec.id


def test_composes_one_window_and_sleeps_when_needed(turns: AgentTurns) -> None:
    with pytest.raises(UnknownAgent, match="create=true"):
        _serve(turns, {"agent_id": "a"}, [5, 6], 2)
    turn, first = _serve(turns, {"agent_id": "a", "restore": False}, [5, 6], 2)
    assert turn.body["prompt"] == [BOS, 5, 6] and turn.body["kv_transfer_params"] == {"agent_id": "a", "restore": False}
    turn, _ = _serve(turns, {"agent_id": "a"}, turns.codec.encode("w7 w8"), 3)  # text is tokenised by the server
    assert turn.body["prompt"][:3] == [BOS, 5, 6] and turn.body["prompt"][-2:] == [7, 8]
    kv = ConnectorParams.parse(turn.body["kv_transfer_params"])
    assert kv.restore and kv.snapshot_id == first and kv.state_key == state_key(turns.model.init_state(1))
    before = turns.store.latest("a")
    turn, _ = _serve(turns, {"agent_id": "a"}, rand_tokens(20, 1), 10)  # 9 + 30 > L + 1: the turn waits for a sleep
    slept = turns.store.get(turn.base.record.id)
    assert slept.reason == "sleep" and slept.parent_id == before.record.id and len(turn.body["prompt"]) == 21
    want = turns.model.sleep(torch.tensor([before.window]), before.state, 2)
    assert turns.store.load(slept.id).state.allclose(want)


def test_memory_stays_resident_until_another_writer_moves_the_agent(turns: AgentTurns) -> None:
    S = noise_state(turns.model, seed=3)
    turns.store.save("r", S, [5, 6], reason="manual")
    _serve(turns, {"agent_id": "r"}, [7], 2)  # first sight of the agent: loaded from the store
    assert turns.stats["store_loads"] == 1
    for k in range(3):
        turn, _ = _serve(turns, {"agent_id": "r"}, [8 + k], 1)
        assert turn.base.key == state_key(S)  # S itself is unchanged by turns
    assert turns.stats["store_loads"] == 1 and turns.stats["resident_hits"] == 3  # one version read each, no load
    other = turns.store.save("r", S, [9, 9, 9], reason="manual")  # another host's save
    turn, _ = _serve(turns, {"agent_id": "r"}, [10], 1)
    assert turns.stats["store_loads"] == 2 and turn.base.record.id == other.id and turn.base.window == (9, 9, 9)


def test_every_save_is_a_compare_and_set(turns: AgentTurns) -> None:
    turns.store.save("c", noise_state(turns.model), [5], reason="manual")
    turn = _plan(turns, {"agent_id": "c"}, [6], 2)
    try:
        moved = turns.store.save("c", noise_state(turns.model, seed=8), [7], reason="manual")  # another host wins
        with pytest.raises(SnapshotConflict):
            turns.commit(turn, [1, 2], {})
    finally:
        turns.release(turn, None)
    assert turns.store.current_id("c") == moved.id and len(turns.store.history("c")) == 2  # nothing written
    _, sid = _serve(turns, {"agent_id": "c"}, [6], 2)  # the retry starts from the winner's memory
    assert turns.store.get(sid).parent_id == moved.id and turns.store.load(sid).window[:1] == [7]


def test_creating_an_agent_is_a_compare_and_set_too(turns: AgentTurns) -> None:
    """Two hosts creating the same new agent: exactly one save wins; the other re-runs on the winner's memory."""
    a = _plan(turns, {"agent_id": "new", "create": True}, [5], 1)
    turns.release(a, None)  # a second host's plan of the same agent (this host would serialise them)
    b = _plan(turns, {"agent_id": "new", "create": True}, [6], 1)
    try:
        assert a.base is None and b.base is None
        won = turns.commit(a, [1], {})
        with pytest.raises(SnapshotConflict):
            turns.commit(b, [2], {})
    finally:
        turns.release(b, None)
    turn, _ = _serve(turns, {"agent_id": "new", "create": True}, [6], 1)  # create on an existing agent: restore
    assert turn.base.record.id == won.id
    assert [r.reason for r in turns.store.history("new")] == ["turn", "turn"]


def test_concurrent_turns_of_one_agent_all_land_in_the_lineage(turns: AgentTurns) -> None:
    """Plans from many threads (this host's lock serialises them; conflicts are retried like the server does)."""
    turns.store.save("many", noise_state(turns.model), [], reason="manual")
    saved: list[str] = []

    def one(k: int) -> None:
        for _ in range(10):
            try:
                _, sid = _serve(turns, {"agent_id": "many"}, [5 + k], 1)
                saved.append(sid)
                return
            except SnapshotConflict:
                continue

    threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lineage = {r.id for r in turns.store.lineage(turns.store.current_id("many"))}
    assert len(saved) == 6 and set(saved) <= lineage


def test_a_repeated_turn_id_replays_and_appends_nothing(turns: AgentTurns) -> None:
    turns.store.save("idem", noise_state(turns.model), [5], reason="manual")
    first = _plan(turns, {"agent_id": "idem", "turn_id": "t-1"}, [6, 7], 2)
    try:
        rec = turns.commit(first, [11, 12], {"text": "w11 w12", "finish_reason": "length", "stop_reason": None})
    finally:
        turns.release(first, None)
    again = _plan(turns, {"agent_id": "idem", "turn_id": "t-1"}, [6, 7], 2)
    turns.release(again, None)
    assert again.replay is not None and again.replay.id == rec.id and again.lock is None
    assert again.replay.meta["turn"]["token_ids"] == [11, 12] and again.replay.meta["turn"]["text"] == "w11 w12"
    assert turns.store.current_id("idem") == rec.id and len(turns.store.history("idem")) == 2
    with pytest.raises(InvalidInput, match="another input"):
        _plan(turns, {"agent_id": "idem", "turn_id": "t-1"}, [6, 8], 2)
    _serve(turns, {"agent_id": "idem"}, [9], 1)  # a later sleep or turn keeps the turn findable
    assert _plan(turns, {"agent_id": "idem", "turn_id": "t-1"}, [6, 7], 2).replay.id == rec.id


def test_background_sleep_after_the_threshold(turns: AgentTurns) -> None:
    _, sid = _serve(turns, {"agent_id": "b", "restore": False}, rand_tokens(20, 2), 6)  # 26 >= 0.75 * 32: a sleep
    deadline = time.monotonic() + 30
    while turns.store.latest("b").record.reason != "sleep":
        assert time.monotonic() < deadline, "no background sleep"
        time.sleep(0.05)
    slept = turns.store.latest("b")
    assert slept.window == [] and slept.record.parent_id == sid and slept.record.meta["sleep_count"] == 1
    assert turns.resident.get("b").record.id == slept.record.id  # the sleep's memory is resident for the next turn


@pytest.mark.parametrize(
    "kv, match",
    [
        ({"agentid": "x"}, "did you mean 'agent_id'"),
        ({"agent_id": "x", "snapshotid": "s"}, "did you mean 'snapshot_id'"),
        ({"agent_id": " x"}, "whitespace"),
        ({"agent_id": "a\x00b"}, "control"),
        ({"agent_id": "a\nb"}, "control"),
        ({"agent_id": "x" * 200}, "at most 128"),
        ({"agent_id": ""}, "empty"),
        ({"agent_id": 5}, "must be a str"),
        ({"agent_id": "x", "turn_id": "t\nu"}, "control"),
        ({"agent_id": "x", "restore": "yes"}, "true or false"),
        ({"agent_id": "x", "restore": False, "snapshot_id": "s"}, "pick one"),
        ("alice", "JSON object"),
    ],
)
def test_bad_agent_parameters_are_refused_before_anything_runs(kv: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as info:
        AgentParams.parse(kv)
    assert http_error(info.value).status == 400


def test_errors_and_their_http_status(turns: AgentTurns) -> None:
    def status(fn) -> int:
        with pytest.raises(Exception) as info:
            fn()
        return http_error(info.value).status

    assert status(lambda: turns.check({"prompt": rand_tokens(WINDOW, 3), "max_tokens": 2})) == 400  # > one window
    assert status(lambda: turns.check({"prompt": [5], "n": 2})) == 400
    assert status(lambda: turns.check({"prompt": [5], "echo": True})) == 400
    assert status(lambda: turns.check({"prompt": [5], "prompt_logprobs": 1})) == 400
    assert status(lambda: turns.check({"prompt": ""})) == 400
    assert status(lambda: turns.check({"prompt": [[5], [6]]})) == 400
    assert status(lambda: turns.check({"prompt": [5], "max_tokens": 0})) == 400
    assert turns.check({"prompt": [5], "stream": True}) == ([5], 16)  # streaming is served; max_tokens defaults
    assert status(lambda: _plan(turns, {"agent_id": "c", "snapshot_id": "nope"}, [5], 2)) == 404
    alien = make_model(seed=1)
    turns.store.save("alien", FastWeights(ssm=alien.init_state(1).ssm, fingerprint=alien.fingerprint), [5])
    assert status(lambda: _plan(turns, {"agent_id": "alien"}, [5], 2)) == 409
    turns.store.save("d", noise_state(turns.model), rand_tokens(WINDOW + 1, 4))
    sid = turns.store.latest("d").record.id
    assert status(lambda: _plan(turns, {"agent_id": "d", "snapshot_id": sid}, [5], 2)) == 400  # full, named
    assert turns.agent_lock("d").acquire(blocking=False)  # a refused plan holds no lock
    assert http_error(SnapshotMismatch("x")).status == 409 and http_error(WindowOverflow("x")).status == 400
    assert http_error(SnapshotConflict("x")).status == 409 and http_error(RuntimeError("boom")).status == 500
