"""`agentsleep snapshots --tenant`: every command sees one tenant's agents only."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from agentsleep.cli import main
from agentsleep.store import SnapshotStore
from agentsleep.store.cli import EXIT_NOT_FOUND, EXIT_USAGE

from .helpers import toy_state


def _run(url: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["snapshots", "--url", url, *args], env=env, catch_exceptions=False)


def test_tenant_option_scopes_every_command(store: SnapshotStore, store_url: str, tmp_path: Path) -> None:
    a, b = store.for_tenant("acme"), store.for_tenant("beta")
    mine = a.save("alice", toy_state(1), [1, 2]).id
    b.save("alice", toy_state(2), [3])
    store.save("root-agent", toy_state(3))

    listed = json.loads(_run(store_url, "--tenant", "acme", "list", "--json").stdout)
    assert [x["id"] for x in listed] == ["alice"]
    assert [x["id"] for x in json.loads(_run(store_url, "list", "--json").stdout)] == ["root-agent"]
    env = {"AGENTSLEEP_TENANT": "beta"}
    history = json.loads(_run(store_url, "list", "alice", "--json", env=env).stdout)
    assert len(history) == 1 and history[0]["id"] != mine and history[0]["agent_id"] == "alice"

    out = tmp_path / "a.snap"
    assert _run(store_url, "--tenant", "acme", "export", mine, "-o", str(out)).exit_code == 0
    # Tenant beta cannot name acme's snapshot: the same exit code and message as a snapshot that never existed.
    for args in (["show", "{}"], ["export", "{}", "-o", str(tmp_path / "x")], ["fork", "{}", "copy"]):
        foreign = _run(store_url, "--tenant", "beta", *[x.format(mine) for x in args])
        absent = _run(store_url, "--tenant", "beta", *[x.format("0" * 32) for x in args])
        assert foreign.exit_code == absent.exit_code == EXIT_NOT_FOUND, foreign.output
        assert foreign.stderr.replace(mine, "<id>") == absent.stderr.replace("0" * 32, "<id>")
    assert _run(store_url, "--tenant", "beta", "delete-agent", "root-agent", "--yes").exit_code == EXIT_NOT_FOUND
    # An import lands in the importing tenant.
    assert _run(store_url, "--tenant", "gamma", "import", str(out)).exit_code == 0
    assert store.for_tenant("gamma").latest("alice").window == [1, 2]
    assert a.latest("alice").record.id == mine


def test_bad_tenant_is_a_one_line_usage_error(store: SnapshotStore, store_url: str) -> None:
    res = _run(store_url, "--tenant", "no/slashes", "list")
    assert res.exit_code == EXIT_USAGE
    assert res.stderr.startswith("error: tenant must be") and res.stderr.count("\n") == 1
