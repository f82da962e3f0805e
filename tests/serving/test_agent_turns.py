"""The server's agent layer without vLLM: window composition, synchronous and background sleeps through the
scheduler, and the HTTP status of every error (the ASGI wiring is exercised by test_server.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from agentsleep.errors import InvalidInput, SnapshotMismatch, UnknownAgent, WindowOverflow
from agentsleep.memory import SleepPolicy
from agentsleep.model.state import FastWeights
from agentsleep.runtime import TextCodec
from agentsleep.serving.params import AgentParams
from agentsleep.serving.server import AgentTurns, http_error
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


def _serve(turns: AgentTurns, agent: str, ids: list[int], max_tokens: int, **kv: object) -> dict:
    """prepare -> what the connector would save -> finish; returns the composed vLLM body."""
    turn = turns.prepare(AgentParams.parse({"agent_id": agent, **kv}), {"prompt": ids, "max_tokens": max_tokens})
    body = turn.body
    params = body["kv_transfer_params"]
    reply = rand_tokens(max_tokens, len(body["prompt"]))
    if params["restore"]:
        snap = turns.store.load(params["snapshot_id"])
        state, parent = snap.state, snap.record.id
    else:
        state, parent = turns.model.init_state(1), None
    window = [*body["prompt"][1:], *reply]
    turns.store.save(agent, state, window, reason="turn", parent_id=parent)
    turns.finish(turn, 200, {"kv_transfer_params": {"window_tokens": len(window)}})
    return body


def test_composes_one_window_and_sleeps_when_needed(turns: AgentTurns) -> None:
    with pytest.raises(UnknownAgent, match="restore=false"):
        _serve(turns, "a", [5, 6], 2)
    body = _serve(turns, "a", [5, 6], 2, restore=False)
    assert body["prompt"] == [BOS, 5, 6] and body["kv_transfer_params"]["restore"] is False
    body = _serve(turns, "a", turns.codec.encode("w7 w8"), 3)  # text prompts are tokenised by the server
    assert body["prompt"][:3] == [BOS, 5, 6] and body["prompt"][-2:] == [7, 8]
    assert body["kv_transfer_params"]["restore"] is True
    before = turns.store.latest("a")
    body = _serve(turns, "a", rand_tokens(20, 1), 10)  # 9 + 30 > L + 1: the turn waits for one sleep
    slept = turns.store.get(body["kv_transfer_params"]["snapshot_id"])
    assert slept.reason == "sleep" and slept.parent_id == before.record.id and len(body["prompt"]) == 21
    want = turns.model.sleep(torch.tensor([before.window]), before.state, 2)
    assert turns.store.load(slept.id).state.allclose(want)


def test_background_sleep_after_the_threshold(turns: AgentTurns) -> None:
    _serve(turns, "b", rand_tokens(20, 2), 6, restore=False)  # 26 >= 0.75 * 32: a threshold sleep is scheduled
    deadline = time.monotonic() + 30
    while turns.store.latest("b").record.reason != "sleep":
        assert time.monotonic() < deadline, "no background sleep"
        time.sleep(0.05)
    assert turns.store.latest("b").window == []


def test_errors_and_their_http_status(turns: AgentTurns) -> None:
    def status(fn) -> int:
        with pytest.raises(Exception) as info:
            fn()
        return http_error(info.value).status

    assert status(lambda: _serve(turns, "c", rand_tokens(WINDOW, 3), 2, restore=False)) == 400  # > one window
    assert status(lambda: turns.prepare(AgentParams("c", restore=False), {"prompt": [5], "stream": True})) == 400
    assert status(lambda: turns.prepare(AgentParams("c", restore=False), {"prompt": [5], "n": 2})) == 400
    assert status(lambda: turns.prepare(AgentParams("c", restore=False, sleep=True), {"prompt": [5]})) == 400
    assert status(lambda: turns.prepare(AgentParams("c", restore=False), {"prompt": ""})) == 400
    assert status(lambda: turns.prepare(AgentParams("c", restore=False), {"prompt": [[5], [6]]})) == 400
    assert status(lambda: turns.prepare(AgentParams("c", snapshot_id="nope"), {"prompt": [5]})) == 404
    alien = make_model(seed=1)
    turns.store.save("alien", FastWeights(ssm=alien.init_state(1).ssm, fingerprint=alien.fingerprint), [5])
    assert status(lambda: turns.prepare(AgentParams("alien"), {"prompt": [5]})) == 409
    turns.store.save("d", noise_state(turns.model), rand_tokens(WINDOW + 1, 4))
    assert status(lambda: turns.prepare(AgentParams("d", snapshot_id=turns.store.latest("d").record.id),
                                        {"prompt": [5], "max_tokens": 2})) == 400  # fmt: skip
    with pytest.raises(InvalidInput):
        AgentParams.parse({"agent_id": 5})
    assert http_error(SnapshotMismatch("x")).status == 409 and http_error(WindowOverflow("x")).status == 400
    assert http_error(RuntimeError("boom")).status == 500
