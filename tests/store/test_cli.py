"""`agentsleep snapshots`: every command, its --help, its output and its exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agentsleep.cli import main
from agentsleep.store import SnapshotStore
from agentsleep.store.cli import EXIT_BAD_SNAPSHOT, EXIT_NOT_FOUND, EXIT_USAGE

from .helpers import toy_state

COMMANDS = ["list", "show", "export", "import", "fork", "prune", "delete-agent"]


def _run(url: str, *args: str, input: bytes | None = None) -> Result:
    return CliRunner().invoke(main, ["snapshots", "--url", url, *args], input=input, catch_exceptions=False)


@pytest.fixture
def filled(store: SnapshotStore, store_url: str) -> tuple[str, list[str]]:
    ids = [store.save("alice", toy_state(i), [i], passes=2).id for i in range(3)]
    store.save("bob", toy_state(7))
    return store_url, ids


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_everywhere(cmd: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the default sqlite:///agentsleep.db would appear
    monkeypatch.delenv("AGENTSLEEP_STORE_URL", raising=False)
    args = ["snapshots"] + ([cmd] if cmd else []) + ["--help"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "Usage:" in res.output
    assert not list(tmp_path.iterdir())  # --help never creates a database


def test_list_agents_and_history(filled: tuple[str, list[str]]) -> None:
    url, ids = filled
    res = _run(url, "list")
    assert res.exit_code == 0
    assert "alice" in res.output and "bob" in res.output and "toy-abc" in res.output
    rows = json.loads(_run(url, "list", "--json").output)
    assert [(r["id"], r["n_snapshots"], r["current_seq"]) for r in rows] == [("alice", 3, 3), ("bob", 1, 1)]
    hist = _run(url, "list", "alice")
    assert hist.exit_code == 0 and "*3" in hist.output and ids[0] in hist.output
    hj = json.loads(_run(url, "list", "alice", "--json").output)
    assert [h["id"] for h in hj] == ids and [h["current"] for h in hj] == [False, False, True]


def test_show_verifies(filled: tuple[str, list[str]]) -> None:
    url, ids = filled
    info = json.loads(_run(url, "show", ids[1], "--json").output)
    assert info["id"] == ids[1] and info["verified"] is True and info["passes"] == 2
    assert info["state_digest"] == toy_state(1).digest()
    table = _run(url, "show", ids[1])
    assert table.exit_code == 0 and "sha256" in table.output
    quick = json.loads(_run(url, "show", ids[1], "--json", "--no-verify").output)
    assert "verified" not in quick


def test_export_import_fork_prune_delete(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, ids = filled
    f = tmp_path / "alice.snap"
    res = _run(url, "export", ids[2], "-o", str(f))
    assert res.exit_code == 0 and f.stat().st_size > 60_000
    res = _run(url, "import", str(f), "--agent", "carol")
    assert res.exit_code == 0
    new_id = res.stdout.strip().splitlines()[0]
    res = _run(url, "fork", new_id, "dave")
    assert res.exit_code == 0
    with SnapshotStore(url) as s:
        assert s.latest("carol").state.digest() == toy_state(2).digest()
        assert s.latest("dave").record.parent_id == new_id
    dry = _run(url, "prune", "alice", "--keep", "1", "--dry-run")
    assert dry.exit_code == 0 and ids[0] in dry.output and ids[2] not in dry.output
    assert "deleted 2 snapshots" in _run(url, "prune", "alice", "--keep", "1").output
    assert _run(url, "delete-agent", "bob").exit_code != 0  # asks, and aborts without input
    assert _run(url, "delete-agent", "bob", "--yes").exit_code == 0
    with SnapshotStore(url) as s:
        assert [r.id for r in s.history("alice")] == [ids[2]]
        assert "bob" not in {a.id for a in s.agents()}


def test_export_to_stdout_and_import_from_stdin(filled: tuple[str, list[str]]) -> None:
    url, ids = filled
    data = CliRunner().invoke(main, ["snapshots", "--url", url, "export", ids[0], "-o", "-"]).stdout_bytes
    res = _run(url, "import", "-", "--agent", "erin", input=data)
    assert res.exit_code == 0
    with SnapshotStore(url) as s:
        assert s.latest("erin").state.digest() == toy_state(0).digest()


def test_errors_have_codes_and_one_line(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, ids = filled
    for args, code in [
        (["show", "nope"], EXIT_NOT_FOUND),
        (["list", "ghost"], EXIT_NOT_FOUND),
        (["fork", "nope", "x"], EXIT_NOT_FOUND),
        (["prune", "ghost", "--keep", "1"], EXIT_NOT_FOUND),
        (["fork", ids[0], "bob"], EXIT_USAGE),  # bob exists
        (["prune", "alice", "--keep", "-1"], EXIT_USAGE),  # click's own range check
    ]:
        res = _run(url, *args)
        assert res.exit_code == code, (args, res.output)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"definitely not a snapshot")
    res = _run(url, "import", str(junk))
    assert res.exit_code == EXIT_BAD_SNAPSHOT
    assert res.stderr.startswith("error: ") and "not an agentsleep snapshot" in res.stderr
    assert "Traceback" not in res.output


def test_url_from_environment(store: SnapshotStore, store_url: str) -> None:
    store.save("envy", toy_state(1))
    res = CliRunner().invoke(main, ["snapshots", "list", "--json"], env={"AGENTSLEEP_STORE_URL": store_url})
    assert res.exit_code == 0 and json.loads(res.output)[0]["id"] == "envy"
