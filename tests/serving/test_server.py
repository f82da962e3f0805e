"""`agentsleep serve` end to end: vLLM's OpenAI server with the plugin, the connector and the agent middleware,
queried with the official openai client for two agents in interleaved order, checked against TorchEngine, fed bad
input, and stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest
import torch

from agentsleep.model.state import FastWeights
from agentsleep.runtime import SamplingParams, TorchEngine

from .helpers import WINDOW, make_model, noise_state, rand_tokens, words

pytestmark = pytest.mark.vllm
openai = pytest.importorskip("openai")

STARTUP_TIMEOUT = 240  # seconds; ~20–45 s on 2 shared cores
NEAR_TIE = 0.7  # twice test_parity.LOGPROB_ATOL: a greedy divergence below this margin is bf16 rounding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Popen]]:
    """The server shares the in-process engine's store, so agents saved by one vLLM engine are restored by another."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # No background threshold sleeps during the test (turns come faster than this): the sleeps it sees are the
    # synchronous ones a turn needs, so the expected outputs do not depend on timing.
    env = {**os.environ, "AGENTSLEEP_SLEEP_DEBOUNCE_SECONDS": "600"}
    cmd = [sys.executable, "-m", "agentsleep.cli", "serve", str(checkpoint), "--port", str(port),
           "--store", engine.states.url, "--kv-cache-bytes", str(64 << 20), "--max-num-seqs", "4"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server not ready after {STARTUP_TIMEOUT} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    yield url, proc
    if proc.poll() is None:
        proc.kill()


def _complete(client, agent: str, ids: list[int], max_tokens: int, **kv: object):
    return client.completions.create(
        model="toy-hybrid",
        prompt=words(ids),
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"kv_transfer_params": {"agent_id": agent, **kv}, "return_token_ids": True},
    )


def test_two_agents_interleaved_match_torch_engine(server, engine, reference) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    engine.states.save("srv-old", noise_state(reference, seed=21), rand_tokens(6, 700), reason="manual")
    last = {"srv-old": engine.states.latest("srv-old").record.id, "srv-new": None}
    turns = [("srv-new", 5, 6), ("srv-old", 4, 8), ("srv-new", 7, 8), ("srv-old", 9, 6), ("srv-new", 6, 10),
             ("srv-old", 8, 8), ("srv-new", 3, 4)]  # fmt: skip
    sleeps = equal = 0
    for i, (agent, n_in, n_out) in enumerate(turns):
        ids = rand_tokens(n_in, 710 + i)
        kv = {"restore": False} if last[agent] is None else {}
        resp = _complete(client, agent, ids, n_out, **kv)
        params = resp.kv_transfer_params  # vLLM's extra response field
        got = [int(t) for t in resp.choices[0].token_ids]
        assert len(got) == n_out and resp.usage.prompt_tokens_details.cached_tokens == (0 if kv else 1)
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
        assert saved.window == [*te.export_state("ref").window[: len(saved.window) - n_out], *got][-len(saved.window) :]
        last[agent] = params["snapshot_id"]
    assert sleeps >= 1 and equal >= len(turns) - 2


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(server, engine) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="unknown agent 'nobody'"):
        _complete(client, "nobody", [5, 6], 2)
    alien = make_model(seed=1)
    engine.states.save("srv-alien", FastWeights(ssm=alien.init_state(1).ssm, fingerprint=alien.fingerprint), [5],
                       reason="manual")  # fmt: skip
    with pytest.raises(openai.ConflictError, match="was made by model"):
        _complete(client, "srv-alien", [5, 6], 2)
    with pytest.raises(openai.BadRequestError, match="do not fit one window"):
        _complete(client, "srv-x", rand_tokens(WINDOW + 5, 800), 2, restore=False)
    with pytest.raises(openai.BadRequestError, match="stream"):
        body = {"kv_transfer_params": {"agent_id": "srv-x", "restore": False}}
        client.completions.create(model="toy-hybrid", prompt="w5", max_tokens=2, stream=True, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):  # it would make vLLM drop the restored S
        body = {"kv_transfer_params": {"agent_id": "srv-x", "restore": False}, "prompt_logprobs": 1}
        client.completions.create(model="toy-hybrid", prompt="w5", max_tokens=2, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="agent_id"):
        _complete(client, "", [5], 2)
    body = {"model": "toy-hybrid", "prompt": "w5 w6", "max_tokens": 2,
            "kv_transfer_params": {"agent_id": "srv-x", "restore": False}}  # fmt: skip
    raw = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(raw, timeout=60) as r:  # the server still serves (plain HTTP works too)
        assert json.loads(r.read())["kv_transfer_params"]["window_tokens"] == 4


def test_stopped_by_pid(server) -> None:
    url, proc = server
    os.kill(proc.pid, signal.SIGTERM)  # `agentsleep serve` exec'd the API server: same PID
    assert proc.wait(timeout=60) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/v1/models", timeout=2)
