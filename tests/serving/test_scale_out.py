"""Two real `agentsleep serve` hosts on one store (SQLite file, and Postgres): concurrent turns of one agent split
across them all land in the agent's lineage exactly once (a lost compare-and-set is re-run or refused with 409, never
acknowledged and lost), concurrent creates of a new agent are serialised, streams that lose end with an error, and a
host killed with SIGKILL takes its engine process with it."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from agentsleep.store import SnapshotStore
from tests.store.conftest import postgres_db, postgres_server_url  # noqa: F401  (fixtures)

from .helpers import Server, alive, noise_state, rand_tokens, words

pytestmark = pytest.mark.vllm
MODEL = "toy-hybrid"
KILL_TIMEOUT = 30  # seconds for the kernel to deliver the parent-death signal and reap


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('shared') / 'shared.db'}"
        return
    db = request.getfixturevalue("postgres_db")
    schema = f"hosts_{uuid.uuid4().hex[:12]}"
    admin = create_engine(db, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield db.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def hosts(vllm_available, checkpoint: Path, store_url: str, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hosts")
    SnapshotStore(store_url).close()  # migrate once, before two servers open it
    env = {"AGENTSLEEP_CACHE_DIR": str(tmp / "cache")}  # shared: both write the tokenizer folder at once
    servers = [Server(checkpoint, store_url, tmp / f"host{i}.log", env=env) for i in range(2)]
    try:
        yield tuple(s.wait_ready() for s in servers)
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def store(store_url: str) -> Iterator[SnapshotStore]:
    s = SnapshotStore(store_url)
    yield s
    s.close()


def _turn(host: Server, agent: str, ids: list[int], **kv: object) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": words(ids), "max_tokens": 2, "temperature": 0, "return_token_ids": True,
            "kv_transfer_params": {"agent_id": agent, **kv}}  # fmt: skip
    return host.post("/v1/completions", body, timeout=300)


def _concurrently(calls: list) -> list:
    out: list = [None] * len(calls)

    def run(i: int) -> None:
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return out


def _turns_in_lineage(store: SnapshotStore, agent: str) -> list[str]:
    return [r.id for r in store.lineage(store.current_id(agent)) if r.reason == "turn"]


def test_concurrent_turns_of_one_agent_on_two_hosts_land_exactly_once(hosts, store: SnapshotStore, reference) -> None:
    agent = f"shared-{uuid.uuid4().hex[:6]}"
    store.save(agent, noise_state(reference), [], reason="manual")
    acked_all: list[str] = []
    for trial in range(3):
        inputs = [rand_tokens(3, 900 + 10 * trial + k) for k in range(6)]
        calls = [lambda k=k, ids=ids: _turn(hosts[k % 2], agent, ids) for k, ids in enumerate(inputs)]
        results = _concurrently(calls)
        acked = []
        for k, (status, body) in enumerate(results):
            assert status in (200, 409), body  # served, or refused after its retries: nothing else
            if status == 200:
                params = body["kv_transfer_params"]
                saved = store.load(params["snapshot_id"])
                reply = body["choices"][0]["token_ids"]
                assert saved.window[-5:] == [*inputs[k], *reply]  # the turn, with the reply the client got
                acked.append(params["snapshot_id"])
            else:
                assert "another host" in body["error"]["message"]
        assert len(acked) >= 3, results  # conflicts are re-run: most turns get through
        acked_all += acked
        # every acknowledged turn is in the lineage, and no turn the clients were refused
        assert set(_turns_in_lineage(store, agent)[-len(acked) :]) == set(acked)
    lineage_turns = _turns_in_lineage(store, agent)
    assert set(acked_all) <= set(lineage_turns) and len(lineage_turns) == len(acked_all)


def test_concurrent_creates_of_a_new_agent_are_serialised(hosts, store: SnapshotStore) -> None:
    agent = f"fresh-{uuid.uuid4().hex[:6]}"
    inputs = [rand_tokens(3, 950 + k) for k in range(4)]
    results = _concurrently([lambda k=k: _turn(hosts[k % 2], agent, inputs[k], create=True) for k in range(4)])
    acked = [body["kv_transfer_params"]["snapshot_id"] for status, body in results if status == 200]
    assert all(status in (200, 409) for status, _ in results) and len(acked) >= 2
    history = store.history(agent)
    assert [r.parent_id is None for r in history].count(True) == 1  # one creation; the others continued it
    assert set(_turns_in_lineage(store, agent)) == set(acked)


def _stream(host: Server, agent: str, ids: list[int]) -> tuple[str | None, bool]:
    """(snapshot id from the final chunk, whether the stream ended with an error event)."""
    body = {"model": MODEL, "prompt": words(ids), "max_tokens": 3, "temperature": 0, "stream": True,
            "kv_transfer_params": {"agent_id": agent}}  # fmt: skip
    req = urllib.request.Request(f"{host.url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    sid, failed, done = None, False, False
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r.read().decode().split("\n\n"):
            data = line.strip().removeprefix("data:").strip()
            if not data:
                continue
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            failed |= "error" in event
            sid = (event.get("kv_transfer_params") or {}).get("snapshot_id", sid)
    assert done != failed  # a stream ends either with [DONE] (saved) or with an error event (nothing saved)
    return sid, failed


def test_concurrent_streams_either_land_or_end_with_an_error(hosts, store: SnapshotStore, reference) -> None:
    agent = f"streams-{uuid.uuid4().hex[:6]}"
    store.save(agent, noise_state(reference), [], reason="manual")
    results = _concurrently([lambda k=k: _stream(hosts[k % 2], agent, rand_tokens(3, 970 + k)) for k in range(4)])
    saved = [sid for sid, failed in results if not failed]
    assert all(sid is not None for sid in saved) and saved
    assert set(_turns_in_lineage(store, agent)) == set(saved)


def test_sigkill_takes_the_engine_process_with_it(hosts, store: SnapshotStore) -> None:
    a, b = hosts
    children = b.children()
    assert children, "the server should run vLLM's engine core in a child process"
    cache = b.log.parent / "cache"
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(30)
    deadline = time.monotonic() + KILL_TIMEOUT
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, f"engine processes {sorted(children)} outlived their server"
        time.sleep(0.2)
    leftovers = [p.name for p in (cache / "tokenizers").iterdir() if p.name.startswith(".")]
    assert not leftovers and len(list((cache / "tokenizers").iterdir())) == 1  # one folder, shared, no temporaries
    agent = f"after-kill-{uuid.uuid4().hex[:6]}"
    status, body = _turn(a, agent, [5, 6], create=True)  # the other host is unaffected
    assert status == 200 and store.current_id(agent) == body["kv_transfer_params"]["snapshot_id"]
