"""`agentsleep serve` end to end: vLLM's OpenAI server with the plugin, the connector and the agent middleware,
queried with the official openai client for two agents in interleaved order and checked against TorchEngine; stop
strings, streaming and repeated turn ids saved exactly once; requests without an agent and bad input refused with
clear errors; stopped by its PID."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from agentsleep.model.state import FastWeights
from agentsleep.runtime import SamplingParams, TorchEngine

from .helpers import WINDOW, Server, make_model, noise_state, rand_tokens, words

pytestmark = pytest.mark.vllm
openai = pytest.importorskip("openai")

NEAR_TIE = 0.7  # twice test_parity.LOGPROB_ATOL: a greedy divergence below this margin is bf16 rounding
MODEL = "toy-hybrid"


@pytest.fixture(scope="module")
def server(engine, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server shares the in-process engine's store, so agents saved by one vLLM engine are restored by another."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    # No background threshold sleeps during the test (turns come faster than this): the sleeps it sees are the
    # synchronous ones a turn needs, so the expected outputs do not depend on timing.
    env = {"AGENTSLEEP_SLEEP_DEBOUNCE_SECONDS": "600", "AGENTSLEEP_CACHE_DIR": str(log.parent / "cache")}
    srv = Server(checkpoint, engine.states.url, log, env=env).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _complete(client, agent: str, ids: list[int], max_tokens: int, **kv: object):
    return client.completions.create(
        model=MODEL,
        prompt=words(ids),
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"kv_transfer_params": {"agent_id": agent, **kv}, "return_token_ids": True},
    )


def _ids(choice) -> list[int]:
    return [int(t) for t in choice.token_ids]


def test_two_agents_interleaved_match_torch_engine(client, engine, reference) -> None:
    engine.states.save("srv-old", noise_state(reference, seed=21), rand_tokens(6, 700), reason="manual")
    last = {"srv-old": engine.states.latest("srv-old").record.id, "srv-new": None}
    turns = [("srv-new", 5, 6), ("srv-old", 4, 8), ("srv-new", 7, 8), ("srv-old", 9, 6), ("srv-new", 6, 10),
             ("srv-old", 8, 8), ("srv-new", 3, 4)]  # fmt: skip
    sleeps = equal = 0
    for i, (agent, n_in, n_out) in enumerate(turns):
        ids = rand_tokens(n_in, 710 + i)
        resp = _complete(client, agent, ids, n_out, create=True)  # create: the first turn starts srv-new from zero
        params = resp.kv_transfer_params  # vLLM's extra response field, written by the middleware
        got = _ids(resp.choices[0])
        new = last[agent] is None
        assert len(got) == n_out and resp.usage.prompt_tokens_details.cached_tokens == (0 if new else 1)
        # each turn continues the previous one, directly or through one synchronous sleep
        start = params["restored_from"]
        if start is not None and start != last[agent]:
            slept = engine.states.get(start)
            assert slept.reason == "sleep" and slept.parent_id == last[agent]
            sleeps += 1
        # TorchEngine from the same memory gives the same reply (up to a bf16 near-tie)
        te = TorchEngine(reference)
        if start is None:
            te.create_agent("ref")
        else:
            te.revive("ref", engine.states, start)
        ref = te.generate("ref", ids, SamplingParams(max_new_tokens=n_out), return_logits=True)
        if got != list(ref.tokens):
            d = next(j for j, (a, b) in enumerate(zip(got, ref.tokens)) if a != b)
            top = torch.log_softmax(ref.logits[d], -1).topk(2).values
            assert float(top[0] - top[1]) <= NEAR_TIE, (agent, i, got, ref.tokens)
        else:
            equal += 1
        saved = engine.states.load(params["snapshot_id"])
        assert saved.record.parent_id == (start or None) and saved.window[-n_out - n_in :] == [*ids, *got]
        assert params["window_tokens"] == len(saved.window) and params["agent_id"] == agent
        last[agent] = params["snapshot_id"]
    assert sleeps >= 1 and equal >= len(turns) - 2


def test_a_turn_ended_by_a_stop_string_is_saved(client, engine, reference) -> None:
    """vLLM ends such a turn in its front end and aborts it in the engine; the turn is still saved, holding exactly
    the reply tokens the client got."""
    base = engine.states.save("srv-stop", noise_state(reference, seed=31), rand_tokens(3, 730), reason="manual").id
    ids = rand_tokens(4, 731)
    full = _complete(client, "srv-stop", ids, 8, snapshot_id=base)
    tokens, text = _ids(full.choices[0]), full.choices[0].text
    stop = text.split()[3]  # the 4th word: the turn must end at or before it
    cut = client.completions.create(
        model=MODEL, prompt=words(ids), max_tokens=8, temperature=0, stop=[stop],
        extra_body={"kv_transfer_params": {"agent_id": "srv-stop", "snapshot_id": base}, "return_token_ids": True},
    )  # fmt: skip
    choice = cut.choices[0]
    got = _ids(choice)
    assert choice.finish_reason == "stop" and stop not in choice.text and len(got) < 8 and got == tokens[: len(got)]
    saved = engine.states.load(cut.kv_transfer_params["snapshot_id"])
    assert saved.window == [*engine.states.load(base).window, *ids, *got]  # the turn, exactly as answered
    assert saved.record.parent_id == base and engine.states.current_id("srv-stop") == saved.record.id


def test_a_streamed_turn_is_saved_when_the_stream_ends(client, engine, reference) -> None:
    sid = engine.states.save("srv-stream", noise_state(reference, seed=41), rand_tokens(5, 740), reason="manual").id
    ids = rand_tokens(6, 741)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=words(ids), max_tokens=7, temperature=0, stream=True,
            extra_body={"kv_transfer_params": {"agent_id": "srv-stream"}, "return_token_ids": True},
        )
    )  # fmt: skip
    streamed = [int(t) for c in chunks for ch in c.choices for t in (ch.token_ids or [])]
    finals = [c.kv_transfer_params for c in chunks if getattr(c, "kv_transfer_params", None)]
    assert len(streamed) == 7 and len(finals) == 1
    saved = engine.states.load(finals[0]["snapshot_id"])
    assert saved.record.parent_id == sid and saved.window == [*engine.states.load(sid).window, *ids, *streamed]
    # the same turn unstreamed, from the same snapshot: the same reply
    again = _complete(client, "srv-stream", ids, 7, snapshot_id=sid)
    assert _ids(again.choices[0]) == streamed
    # a streamed turn cut by a stop string: saved with the tokens that were streamed
    stop = "".join(c.choices[0].text for c in chunks if c.choices).split()[2]
    cut = list(
        client.completions.create(
            model=MODEL, prompt=words(ids), max_tokens=7, temperature=0, stream=True, stop=[stop],
            extra_body={"kv_transfer_params": {"agent_id": "srv-stream", "snapshot_id": sid}},
        )
    )  # fmt: skip
    assert [ch.finish_reason for c in cut for ch in c.choices if ch.finish_reason] == ["stop"]
    assert all(getattr(ch, "token_ids", None) is None for c in cut for ch in c.choices)  # not asked for: not sent
    params = next(c.kv_transfer_params for c in cut if getattr(c, "kv_transfer_params", None))
    window = engine.states.load(params["snapshot_id"]).window
    assert window[: len(saved.window) - 7] == saved.window[:-7] and len(window) < len(saved.window)


def test_a_repeated_turn_id_returns_the_stored_reply(client, engine, reference) -> None:
    engine.states.save("srv-idem", noise_state(reference, seed=51), rand_tokens(4, 750), reason="manual")
    ids = rand_tokens(5, 751)
    first = _complete(client, "srv-idem", ids, 6, turn_id="turn-1")
    history = len(engine.states.history("srv-idem"))
    again = _complete(client, "srv-idem", ids, 6, turn_id="turn-1")  # e.g. the client's retry after a lost answer
    assert _ids(again.choices[0]) == _ids(first.choices[0]) and again.choices[0].text == first.choices[0].text
    assert again.kv_transfer_params["replayed"] is True and first.kv_transfer_params["replayed"] is False
    assert again.kv_transfer_params["snapshot_id"] == first.kv_transfer_params["snapshot_id"]
    assert len(engine.states.history("srv-idem")) == history  # nothing appended
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=words(ids), max_tokens=6, temperature=0, stream=True,
            extra_body={"kv_transfer_params": {"agent_id": "srv-idem", "turn_id": "turn-1"}},
        )
    )  # fmt: skip
    assert "".join(ch.text for c in streamed for ch in c.choices) == first.choices[0].text
    with pytest.raises(openai.BadRequestError, match="another input"):
        _complete(client, "srv-idem", rand_tokens(5, 752), 6, turn_id="turn-1")


def test_requests_without_an_agent_are_refused(server: Server, client) -> None:
    status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "w5 w6", "max_tokens": 2})
    assert status == 400 and "serves agents" in body["error"]["message"]
    status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "w5", "max_tokens": 2,
                                                   "kv_transfer_param": {"agent_id": "x"}})  # fmt: skip
    assert status == 400 and "did you mean 'kv_transfer_params'" in body["error"]["message"]
    status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "w5", "agent_id": "x"})
    assert status == 400 and "inside kv_transfer_params" in body["error"]["message"]
    status, body = server.post("/v1/completions", {"model": MODEL, "prompt": "w5",
                                                   "kv_transfer_params": {"agentid": "x"}})  # fmt: skip
    assert status == 400 and "did you mean 'agent_id'" in body["error"]["message"]
    status, _ = server.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400
    status, body = server.post("/tokenize", {"model": MODEL, "prompt": "w5 w6"})
    assert status == 200 and body["tokens"][-2:] == [5, 6]  # harmless endpoints still answer
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as r:
        assert r.status == 200


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(server: Server, client, engine) -> None:
    with pytest.raises(openai.NotFoundError, match="unknown agent 'nobody'"):
        _complete(client, "nobody", [5, 6], 2)
    alien = make_model(seed=1)
    engine.states.save("srv-alien", FastWeights(ssm=alien.init_state(1).ssm, fingerprint=alien.fingerprint), [5],
                       reason="manual")  # fmt: skip
    with pytest.raises(openai.ConflictError, match="was made by model"):
        _complete(client, "srv-alien", [5, 6], 2)
    with pytest.raises(openai.BadRequestError, match="do not fit one window"):
        _complete(client, "srv-x", rand_tokens(WINDOW + 5, 800), 2, restore=False)
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):  # it would make vLLM drop the restored S
        body = {"kv_transfer_params": {"agent_id": "srv-x", "restore": False}, "prompt_logprobs": 1}
        client.completions.create(model=MODEL, prompt="w5", max_tokens=2, extra_body=body)
    for bad, match in (("", "empty"), ("x" * 200, "at most 128"), (" srv-x", "whitespace"), ("a\nb", "control")):
        with pytest.raises(openai.BadRequestError, match=match):
            _complete(client, bad, [5], 2, restore=False)
    assert not any(a.id.strip() != a.id or len(a.id) > 128 for a in engine.states.agents())  # none was stored
    plain = {"model": MODEL, "prompt": "w5 w6", "max_tokens": 2, "kv_transfer_params": {"agent_id": "srv-x",
                                                                                         "restore": False}}  # fmt: skip
    status, body = server.post("/v1/completions", plain)
    assert status == 200 and body["kv_transfer_params"]["window_tokens"] == 4  # plain HTTP works too
    assert "token_ids" not in body["choices"][0]  # only when asked for


def test_stopped_by_pid(server: Server) -> None:
    os.kill(server.proc.pid, signal.SIGTERM)  # `agentsleep serve` exec'd the API server: same PID
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/v1/models", timeout=2)
