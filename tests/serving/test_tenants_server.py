"""A real `agentsleep serve` with an API keys file, on a Postgres store whose URL carries a password: no process it
started shows the password (or a key) on its command line, nor does its log or ``/metrics``; requests without a
valid key get 401; two tenants' agents of the same id, turned in interleaved order, each see their own memory only;
tenant B naming tenant A's agent or snapshot ids gets the 404 an unknown id gets. One server serves every check."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url

from agentsleep.store import SnapshotStore
from tests.store.conftest import postgres_db, postgres_server_url  # noqa: F401  (fixtures)

from .helpers import STARTUP_TIMEOUT, Server, rand_tokens, words

pytestmark = [pytest.mark.vllm, pytest.mark.postgres]

KEY_A, KEY_B = "acme-key-" + "a" * 24, "beta-key-" + "b" * 24


def _request(
    srv: Server, method: str, path: str, body: dict | None = None, key: str | None = None
) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{srv.url}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def pg_url(postgres_db) -> Iterator[str]:  # noqa: F811  (the imported fixture)
    """A schema of its own for this module's server (module-scoped, unlike the store tests' per-test schemas)."""
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"tenants_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_db, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = postgres_db.update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="module")
def server(vllm_available, checkpoint: Path, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not make_url(pg_url).password:
        pytest.skip("the test Postgres URL has no password: nothing to keep secret")  # CI's has one
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys"
    keys.write_text(f"# test keys\n{KEY_A} acme\n\n{KEY_B} beta\n")
    keys.chmod(0o600)
    env = {"AGENTSLEEP_SLEEP_DEBOUNCE_SECONDS": "600", "AGENTSLEEP_CACHE_DIR": str(tmp / "cache")}
    srv = Server(checkpoint, pg_url, tmp / "server.log", "--api-keys-file", str(keys), env=env)
    try:
        _wait_ready(srv)
        yield srv
    finally:
        srv.stop()


def _wait_ready(srv: Server) -> None:
    import time

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if srv.proc.poll() is not None:
            pytest.fail(f"server exited with {srv.proc.returncode}:\n{srv.log.read_text()[-4000:]}")
        try:
            if _request(srv, "GET", "/v1/models", key=KEY_A)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready after {STARTUP_TIMEOUT} s:\n{srv.log.read_text()[-4000:]}")
        time.sleep(1)


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc/*/stat parent links)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        frontier.extend(kids)
    return out


def test_no_secret_on_any_command_line_log_or_metrics(server: Server, pg_url: str) -> None:
    password = make_url(pg_url).password
    assert password
    secrets = [f":{password}@", pg_url, KEY_A, KEY_B]
    pids = _descendants(server.proc.pid)
    assert len(pids) >= 1
    cmdlines = {}
    for pid in pids:
        try:
            cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    assert server.proc.pid in cmdlines
    for pid, cmd in cmdlines.items():
        assert not [s for s in secrets if s in cmd], f"process {pid} shows a secret on its command line: {cmd}"
        assert '"store_url"' not in cmd
    import subprocess

    ps = subprocess.run(["ps", "-eo", "pid,args", "-ww"], capture_output=True, text=True, check=True).stdout
    assert not [s for s in secrets if s in ps]
    status, metrics = _request(server, "GET", "/metrics", key=KEY_B)
    assert status == 200 and not [s for s in secrets if s.encode() in metrics]
    log = server.log.read_text()
    assert not [s for s in secrets if s in log]


def test_missing_or_wrong_key_is_401(server: Server) -> None:
    turn = {"model": "toy-hybrid", "prompt": "w5", "max_tokens": 1, "kv_transfer_params": {"agent_id": "x"}}
    for method, path, body in [("POST", "/v1/completions", turn), ("GET", "/v1/models", None),
                               ("GET", "/metrics", None), ("POST", "/tokenize", {"prompt": "w5"})]:  # fmt: skip
        for key in (None, "wrong-" + "k" * 30, KEY_A[:-1]):
            status, out = _request(server, method, path, body, key)
            assert status == 401, (method, path, key, out[:200])
    assert _request(server, "GET", "/health")[0] == 200  # liveness stays open


def _turn(server: Server, key: str, kv: dict, ids: list[int]) -> tuple[int, dict]:
    body = {"model": "toy-hybrid", "prompt": words(ids), "max_tokens": 2, "temperature": 0, "kv_transfer_params": kv}
    status, out = _request(server, "POST", "/v1/completions", body, key)
    return status, json.loads(out or b"{}")


def test_tenants_interleaved_and_foreign_ids_are_404(server: Server, pg_url: str) -> None:
    inputs: dict[str, list[list[int]]] = {"acme": [], "beta": []}
    last: dict[str, str | None] = {"acme": None, "beta": None}
    for step in range(3):
        for tenant, key in (("acme", KEY_A), ("beta", KEY_B)):
            ids = rand_tokens(3, 100 * (tenant == "beta") + step)
            status, out = _turn(server, key, {"agent_id": "bob", "create": True}, ids)
            assert status == 200, out
            kv = out["kv_transfer_params"]
            assert kv["agent_id"] == "bob" and kv["restored_from"] == last[tenant]  # its own previous memory
            last[tenant] = kv["snapshot_id"]
            inputs[tenant].append(ids)
    with SnapshotStore(pg_url, tenant="acme", migrate=False) as a:
        b = a.for_tenant("beta")
        for tenant, store in (("acme", a), ("beta", b)):
            window = store.latest("bob").window
            assert store.current_id("bob") == last[tenant]
            for chunk in inputs[tenant]:
                assert any(window[i : i + 3] == chunk for i in range(len(window)))
            for chunk in inputs["beta" if tenant == "acme" else "acme"]:
                assert not any(window[i : i + 3] == chunk for i in range(len(window)))
        assert a.for_tenant("").agents() == []
    # Tenant B naming A's snapshot, and a new agent forked from it, get what an absent id gets.
    foreign, absent = last["acme"], "f" * 32
    assert foreign is not None
    for kv in ({"agent_id": "bob", "snapshot_id": "{}"}, {"agent_id": "copy", "snapshot_id": "{}"}):
        sf, bf = _turn(server, KEY_B, {k: v.format(foreign) for k, v in kv.items()}, [7])
        sa, ba = _turn(server, KEY_B, {k: v.format(absent) for k, v in kv.items()}, [7])
        assert sf == sa == 404
        assert json.dumps(bf).replace(foreign, "<s>") == json.dumps(ba).replace(absent, "<s>")
    # An agent only A has: B gets the unknown-agent answer, word for word.
    assert _turn(server, KEY_A, {"agent_id": "only-acme", "create": True}, [9])[0] == 200
    sf, bf = _turn(server, KEY_B, {"agent_id": "only-acme"}, [9])
    sa, ba = _turn(server, KEY_B, {"agent_id": "never-was"}, [9])
    assert sf == sa == 404
    assert json.dumps(bf).replace("only-acme", "<a>") == json.dumps(ba).replace("never-was", "<a>")
