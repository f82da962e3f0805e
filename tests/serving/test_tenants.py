"""Tenants and keys of ``agentsleep serve`` without vLLM: the keys file, the agent middleware driven over ASGI with a
stand-in for vLLM that answers like the connector would (it restores from the store the snapshot it is told, in the
tenant it is told), secrets kept off command lines and out of what the server shows. test_tenants_server.py runs the
same isolation through a real `agentsleep serve`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.serving.auth import MIN_KEY_LEN, ApiKeys, bearer, is_loopback, mask_secrets, mask_url
from agentsleep.serving.cli import serve, server_command, shown_env
from agentsleep.serving.params import AgentParams, ConnectorParams
from agentsleep.store import SnapshotStore

from .helpers import BOS, build_checkpoint, rand_tokens

KEY_A, KEY_B, KEY_A2 = "key-of-acme-" + "a" * 20, "key-of-beta-" + "b" * 20, "second-acme-key-" + "c" * 20
PASSWORD = "s3cr3t-Pa55word"
PG_URL = f"postgresql+psycopg://alice:{PASSWORD}@db.example:5432/agents"


# ---------------------------------------------------------------- the keys file


def test_keys_file_with_comments_blank_lines_and_two_keys_per_tenant() -> None:
    keys = ApiKeys.parse(f"# who may call\n\n{KEY_A} acme   # the first key\n  {KEY_B}\tbeta\n{KEY_A2} acme\n")
    assert keys.tenants == ["acme", "beta"]
    assert keys.tenant(KEY_A) == keys.tenant(KEY_A2) == "acme" and keys.tenant(KEY_B.encode()) == "beta"
    for wrong in (None, "", KEY_A[:-1], KEY_A + "x", KEY_A.upper(), "acme"):
        assert keys.tenant(wrong) is None
    assert KEY_A.encode() not in repr(keys).encode()  # only digests are kept


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        (f"{KEY_A} acme\n{KEY_B}\n", 2, "expected `KEY TENANT`"),
        (f"# c\n\n{KEY_A} acme extra\n", 3, "found 3 fields"),
        ("short acme\n", 1, f"at least {MIN_KEY_LEN}"),
        (f"{KEY_A} no/slash\n", 1, "tenant must be"),
        (f"{KEY_A} acme\n{KEY_A} beta\n", 2, "the same key as line 1"),
        (f"{KEY_A}é acme\n", 1, "printable ASCII"),
    ],
)
def test_a_malformed_line_is_a_start_up_error_naming_it(text: str, line: int, why: str) -> None:
    with pytest.raises(ConfigError, match=f"line {line}: .*{why}") as e:
        ApiKeys.parse(text, "keys.txt")
    assert KEY_A not in str(e.value) and "short" not in str(e.value)  # a key is never echoed


def test_empty_or_missing_keys_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no keys"):
        ApiKeys.parse("# nothing\n\n")
    with pytest.raises(ConfigError, match="cannot read"):
        ApiKeys.load(tmp_path / "absent")


def test_keys_file_readable_by_others_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "keys"
    f.write_text(f"{KEY_A} acme\n")
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        ApiKeys.load(f)
    assert "chmod 600" not in caplog.text
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        ApiKeys.load(f)
    assert "chmod 600" in caplog.text


def test_bearer_header() -> None:
    assert bearer([(b"Authorization", b"Bearer abc")]) == b"abc"
    assert bearer([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert bearer([(b"authorization", b"Basic abc")]) is None
    assert bearer([(b"x-other", b"Bearer abc")]) is None and bearer(None) is None


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.1.1"))
    assert not any(is_loopback(h) for h in (None, "0.0.0.0", "::", "10.0.0.5", "example.com"))


# ---------------------------------------------------------------- secrets never shown


def test_masking() -> None:
    assert PASSWORD not in mask_url(PG_URL) and "alice:***@db.example" in mask_url(PG_URL)
    assert PASSWORD not in mask_url(f"not a url://bob:{PASSWORD}@x")
    msg = mask_secrets(f"could not reach {PG_URL} (password {PASSWORD})", PG_URL)
    assert PASSWORD not in msg and "db.example" in msg


def test_no_secret_on_the_command_line(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A} acme\n")
    cmd, env = server_command(ckpt, host="0.0.0.0", port=1, store_url=PG_URL, gpu=False, api_keys_file=keys)
    assert not [a for a in cmd if PASSWORD in a or KEY_A in a]
    assert env["AGENTSLEEP_SERVE_STORE_URL"] == PG_URL and env["AGENTSLEEP_SERVE_API_KEYS_FILE"] == str(keys)
    assert PASSWORD not in json.dumps(shown_env(env))
    # vLLM's own --api-key (any spelling) moves to its environment variable.
    for extra in (("--api-key", KEY_B), (f"--api-key={KEY_B}",)):
        cmd, env = server_command(ckpt, host="127.0.0.1", port=1, store_url=PG_URL, gpu=False, extra=extra)
        assert not [a for a in cmd if KEY_B in a or a.startswith("--api-key")] and env["VLLM_API_KEY"] == KEY_B
        assert KEY_B not in json.dumps(shown_env(env))
    with pytest.raises(ConfigError, match="drop vLLM's --api-key"):
        server_command(ckpt, host="h", port=1, store_url=PG_URL, gpu=False, extra=("--api-key", KEY_B),
                       api_keys_file=keys)  # fmt: skip


def test_serve_dry_run_masks_and_warns(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    res = CliRunner().invoke(serve, [str(ckpt), "--store", PG_URL, "--host", "0.0.0.0", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert PASSWORD not in res.output and "alice:***@db.example" in res.output
    assert "warning: listening on 0.0.0.0 without --api-keys-file" in res.stderr
    res = CliRunner().invoke(serve, [str(ckpt), "--store", PG_URL, "--dry-run"])  # loopback: no warning
    assert res.exit_code == 0 and "warning" not in res.stderr
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A} acme\n")
    res = CliRunner().invoke(serve, [str(ckpt), "--store", PG_URL, "--host", "0.0.0.0", "--api-keys-file", str(keys),
                                     "--dry-run"])  # fmt: skip
    assert res.exit_code == 0 and "warning" not in res.stderr
    keys.write_text(f"{KEY_A} acme\nbroken\n")
    res = CliRunner().invoke(serve, [str(ckpt), "--store", PG_URL, "--api-keys-file", str(keys), "--dry-run"])
    assert res.exit_code != 0 and "line 2" in res.output and "Traceback" not in res.output


def test_a_bad_store_url_error_hides_the_password() -> None:
    with pytest.raises(InvalidInput) as e:
        SnapshotStore(f"postgresql+psycopg://alice:{PASSWORD}@db:notaport/x")
    assert PASSWORD not in str(e.value)


# ---------------------------------------------------------------- parameters


def test_clients_cannot_name_a_tenant_the_connector_is_told_one() -> None:
    with pytest.raises(InvalidInput, match="unknown kv_transfer_params key 'tenant'"):
        AgentParams.parse({"agent_id": "bob", "tenant": "acme"})
    p = ConnectorParams("bob", snapshot_id="s" * 32, tenant="acme")
    assert ConnectorParams.parse(p.to_dict()) == p
    assert "tenant" not in ConnectorParams("bob").to_dict()
    with pytest.raises(InvalidInput, match="tenant"):
        ConnectorParams.parse({"agent_id": "bob", "tenant": "a b"})


# ---------------------------------------------------------------- the middleware over ASGI


class FakeVLLM:
    """Answers ``/v1/completions`` as vLLM with the connector would: the state it is told to restore is loaded from
    the store in the tenant it is told (a wrong tenant fails the restore), the reply is seeded by the prompt."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store, self.seen = store, []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = json.loads(body) if body else {}
        self.seen.append((scope["path"], req))
        kv = ConnectorParams.parse(req.get("kv_transfer_params"))
        out: dict[str, Any] = {"object": "ok"}
        if scope["path"] == "/v1/completions" and kv is not None:
            restored = False
            if kv.restore:
                rec = self.store.for_tenant(kv.tenant).get(kv.snapshot_id)  # raises for another tenant's snapshot
                restored = rec.agent_id == kv.agent_id
            reply = rand_tokens(req["max_tokens"], len(req["prompt"]))
            out = {"choices": [{"text": "", "token_ids": reply, "finish_reason": "length", "index": 0}],
                   "kv_transfer_params": {"restored": restored}, "usage": {}}  # fmt: skip
        data = json.dumps(out).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


async def call(app: Any, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
    sent = False
    out: list[dict] = []

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(msg: dict) -> None:
        out.append(msg)

    await app(scope, receive, send)
    status = next(m["status"] for m in out if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    return status, json.loads(payload) if payload else {}


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, FakeVLLM, SnapshotStore]]:
    from agentsleep.serving.server import AgentMemoryMiddleware

    ckpt = build_checkpoint(tmp_path / "m")
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A} acme\n{KEY_B} beta\n{KEY_A2} acme\n")
    keys.chmod(0o600)
    url = f"sqlite:///{tmp_path / 's.db'}"
    for k, v in {"CHECKPOINT": str(ckpt), "STORE_URL": url, "API_KEYS_FILE": str(keys)}.items():
        monkeypatch.setenv(f"AGENTSLEEP_SERVE_{k}", v)
    monkeypatch.setenv("AGENTSLEEP_SLEEP_DEBOUNCE_SECONDS", "600")
    store = SnapshotStore(url)
    fake = FakeVLLM(store)
    mw = AgentMemoryMiddleware(fake)
    yield mw, fake, store
    for turns in mw._tenants.values():
        turns.close()
    store.close()


def _turn(agent: str, ids: list[int], **kv: Any) -> dict:
    return {"model": "m", "prompt": ids, "max_tokens": 2, "kv_transfer_params": {"agent_id": agent, **kv}}


def test_two_tenants_same_agent_interleaved_each_sees_its_own_memory(served: tuple) -> None:
    mw, fake, store = served

    async def run() -> None:
        inputs: dict[str, list[list[int]]] = {"acme": [], "beta": []}
        for step in range(4):
            for tenant, key in (("acme", KEY_A if step % 2 else KEY_A2), ("beta", KEY_B)):
                ids = rand_tokens(3, 1000 * (tenant == "beta") + step)
                status, out = await call(mw, "POST", "/v1/completions", _turn("bob", ids, create=True), key)
                assert status == 200, out
                assert out["kv_transfer_params"]["agent_id"] == "bob"
                inputs[tenant].append(ids)
                # vLLM was asked for [BOS] + this tenant's window + the input: never the other tenant's tokens
                prompt = fake.seen[-1][1]["prompt"]
                mine = [t for chunk in inputs[tenant] for t in chunk]
                assert prompt[0] == BOS and [t for t in prompt if t in mine] == [t for t in prompt[1:] if t in mine]
                assert fake.seen[-1][1]["kv_transfer_params"].get("tenant") == tenant
        for tenant in ("acme", "beta"):
            window = store.for_tenant(tenant).latest("bob").window
            other = inputs["beta" if tenant == "acme" else "acme"]
            assert all(window[i : i + 3] != chunk for chunk in other for i in range(len(window)))
            assert all(any(window[i : i + 3] == c for i in range(len(window))) for c in inputs[tenant])
        assert store.agents() == []  # the default tenant has nothing

    asyncio.run(run())


def test_another_tenants_ids_are_404_exactly_like_unknown_ones(served: tuple) -> None:
    mw, _, store = served

    async def run() -> None:
        status, first = await call(mw, "POST", "/v1/completions", _turn("alice", [5, 6], create=True), KEY_A)
        assert status == 200, first
        snap = first["kv_transfer_params"]["snapshot_id"]
        status, _ = await call(mw, "POST", "/v1/completions", _turn("alice", [7], turn_id="t-1"), KEY_A)
        assert status == 200
        absent_snap = "0" * 32
        cases = [
            ({"agent_id": "alice"}, {"agent_id": "nobody"}),
            ({"agent_id": "alice", "snapshot_id": snap}, {"agent_id": "alice", "snapshot_id": absent_snap}),
            ({"agent_id": "new-one", "snapshot_id": snap}, {"agent_id": "new-one", "snapshot_id": absent_snap}),
            ({"agent_id": "alice", "turn_id": "t-1"}, {"agent_id": "nobody", "turn_id": "t-1"}),
        ]
        for foreign, absent in cases:
            sf, bf = await call(mw, "POST", "/v1/completions", {"prompt": [9], "max_tokens": 1, "kv_transfer_params":
                                                                  foreign}, KEY_B)  # fmt: skip
            sa, ba = await call(mw, "POST", "/v1/completions", {"prompt": [9], "max_tokens": 1, "kv_transfer_params":
                                                                  absent}, KEY_B)  # fmt: skip
            assert sf == sa == 404, (foreign, bf, ba)
            norm = json.dumps(bf).replace(snap, "<s>").replace('"alice"', '"<a>"').replace("'alice'", "'<a>'")
            ref = json.dumps(ba).replace(absent_snap, "<s>").replace('"nobody"', '"<a>"').replace("'nobody'", "'<a>'")
            assert norm == ref
        # create=true under B's key makes B's own "alice": A's is untouched
        status, out = await call(mw, "POST", "/v1/completions", _turn("alice", [8], create=True), KEY_B)
        assert status == 200 and out["kv_transfer_params"]["restored_from"] is None
        assert store.for_tenant("acme").latest("alice").window[:2] == [5, 6]

    asyncio.run(run())


def test_missing_or_wrong_key_is_401_on_every_path_and_verb(served: tuple) -> None:
    mw, fake, _ = served

    async def run() -> None:
        paths = [("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/tokenize"),
                 ("DELETE", "/v1/anything"), ("POST", "/v1/chat/completions")]  # fmt: skip
        for method, path in paths:
            for key in (None, "", "wrong-key-" + "x" * 20, KEY_A[:-1], KEY_A.upper()):
                status, out = await call(mw, method, path, _turn("bob", [1], create=True), key)
                assert status == 401, (method, path, key, out)
                assert out["error"]["type"] == "AuthenticationError"
        assert fake.seen == []  # nothing reached vLLM
        status, _ = await call(mw, "GET", "/health")
        assert status == 200 and fake.seen == [("/health", {})]
        status, _ = await call(mw, "GET", "/v1/models", key=KEY_B)
        assert status == 200

    asyncio.run(run())


def test_without_keys_it_is_one_tenant_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentsleep.serving.server import AgentMemoryMiddleware

    url = f"sqlite:///{tmp_path / 's.db'}"
    monkeypatch.setenv("AGENTSLEEP_SERVE_CHECKPOINT", str(build_checkpoint(tmp_path / "m")))
    monkeypatch.setenv("AGENTSLEEP_SERVE_STORE_URL", url)
    monkeypatch.delenv("AGENTSLEEP_SERVE_API_KEYS_FILE", raising=False)
    with SnapshotStore(url) as store:
        mw = AgentMemoryMiddleware(FakeVLLM(store))
        try:
            status, out = asyncio.run(call(mw, "POST", "/v1/completions", _turn("bob", [3], create=True), "any"))
            assert status == 200, out
            assert [a.id for a in store.agents()] == ["bob"]  # the default tenant: today's agents
        finally:
            mw.turns.close()
