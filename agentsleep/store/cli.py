"""``agentsleep snapshots``: inspect and manage the snapshot store from the shell.

Exit codes: 0 success; 2 bad usage or argument; 3 unknown agent or snapshot; 4 corrupt snapshot or one of another
model; 5 the store failed (database unreachable, schema newer than this agentsleep).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from agentsleep.errors import (
    AgentSleepError,
    CheckpointError,
    InvalidInput,
    SnapshotCorrupt,
    SnapshotMismatch,
    StoreError,
    UnknownAgent,
    UnknownSnapshot,
)
from agentsleep.model.fingerprint import checkpoint_fingerprint
from agentsleep.store.engine import one_line
from agentsleep.store.records import SnapshotRecord
from agentsleep.store.store import DEFAULT_URL, SnapshotStore

EXIT_USAGE, EXIT_NOT_FOUND, EXIT_BAD_SNAPSHOT, EXIT_STORE = 2, 3, 4, 5

P = ParamSpec("P")
R = TypeVar("R")


def _exit_code(e: AgentSleepError) -> int:
    if isinstance(e, UnknownAgent | UnknownSnapshot):
        return EXIT_NOT_FOUND
    if isinstance(e, SnapshotCorrupt | SnapshotMismatch):
        return EXIT_BAD_SNAPSHOT
    if isinstance(e, InvalidInput):
        return EXIT_USAGE
    if isinstance(e, StoreError):
        return EXIT_STORE
    return 1


def _errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Print our typed errors as one line on stderr and exit with their code, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except AgentSleepError as e:
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(_exit_code(e))
        except OSError as e:  # a file we were asked to read or write (export -o, import FILE)
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


def _store(ctx: click.Context, *, create: bool = False) -> SnapshotStore:
    """Open the store on first use, so `--help` never touches a database. Only ``import`` may create a store: a
    mistyped URL must not leave an empty database (or directory) behind a ``list``."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "store" not in obj:
        obj["store"] = ctx.with_resource(SnapshotStore(obj["url"], blob_dir=obj["blob_dir"], create=create))
    return obj["store"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def _when(r: SnapshotRecord) -> str:
    return r.created_at.strftime("%Y-%m-%d %H:%M:%S")


F = TypeVar("F", bound=Callable[..., Any])


def url_option(help: str) -> Callable[[F], F]:
    """``--url`` (env AGENTSLEEP_STORE_URL): the store's database, for every command that opens one."""
    return click.option("--url", envvar="AGENTSLEEP_STORE_URL", default=DEFAULT_URL, show_default=True, help=help)


blob_dir_option = click.option(
    "--blob-dir",
    envvar="AGENTSLEEP_STORE_BLOB_DIR",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of content-addressed payload files, if the store uses one (env AGENTSLEEP_STORE_BLOB_DIR).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@url_option("Store database URL (env AGENTSLEEP_STORE_URL), e.g. sqlite:///agentsleep.db or postgresql+psycopg://...")
@blob_dir_option
@click.pass_context
def snapshots(ctx: click.Context, url: str, blob_dir: str | None) -> None:
    """Inspect and manage agents' memory snapshots (fast weights + window)."""
    ctx.ensure_object(dict).update(url=url, blob_dir=blob_dir)


@snapshots.command("list")
@click.argument("agent_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
@_errors
def list_(ctx: click.Context, agent_id: str | None, as_json: bool) -> None:
    """List agents, or with AGENT_ID that agent's snapshots (oldest first; * marks the current one)."""
    store = _store(ctx)
    if agent_id is None:
        agents = store.agents()
        if as_json:
            click.echo(_json([a.to_dict() for a in agents]))
            return
        rows = [(a.id, a.fingerprint, a.n_snapshots, a.current_seq, a.current_snapshot_id) for a in agents]
        click.echo(_table(["agent", "fingerprint", "snapshots", "current seq", "current snapshot"], rows))
        return
    current = store.agent(agent_id).current_snapshot_id
    hist = store.history(agent_id)
    if as_json:
        click.echo(_json([dict(r.to_dict(), current=r.id == current) for r in hist]))
        return
    rows = [
        (
            ("*" if r.id == current else "") + str(r.seq),
            r.id,
            _when(r),
            r.reason,
            r.passes,
            r.tokens_consolidated,
            r.window_len,
            r.byte_size,
            r.parent_id,
        )
        for r in hist
    ]
    click.echo(_table(["seq", "snapshot", "created (UTC)", "reason", "N", "tokens", "window", "bytes", "parent"], rows))


@snapshots.command()
@click.argument("snapshot_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Load and check the payload's sha256.")
@click.pass_context
@_errors
def show(ctx: click.Context, snapshot_id: str, as_json: bool, verify: bool) -> None:
    """Show one snapshot's metadata (and verify its payload). Exit code 4 if it is corrupt."""
    store = _store(ctx)
    info: dict[str, Any] = store.get(snapshot_id).to_dict()
    if verify:
        loaded = store.load(snapshot_id)
        info.update(verified=True, state_digest=loaded.state.digest(), state_shapes=loaded.state.shapes())
    if as_json:
        click.echo(_json(info))
        return
    click.echo(_table(["field", "value"], [(k, json.dumps(v) if isinstance(v, dict) else v) for k, v in info.items()]))


@snapshots.command("export")
@click.argument("snapshot_id")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True), help="File to write, - = stdout."
)
@click.pass_context
@_errors
def export_(ctx: click.Context, snapshot_id: str, output: str) -> None:
    """Write a verified snapshot to a self-describing file (safetensors) that `import` reads on any host."""
    data = _store(ctx).export_snapshot(snapshot_id)
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    Path(output).write_bytes(data)
    click.echo(f"exported snapshot {snapshot_id} ({len(data)} bytes) to {output}", err=True)


@snapshots.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--agent", "agent_id", default=None, help="Agent to import into (default: the exporting agent's id).")
@click.pass_context
@_errors
def import_(ctx: click.Context, file: str, agent_id: str | None) -> None:
    """Import an exported snapshot as the newest snapshot of an agent; prints the new snapshot id."""
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    rec = _store(ctx, create=True).import_snapshot(data, agent_id=agent_id)
    click.echo(rec.id)
    click.echo(f"imported as agent {rec.agent_id!r} seq {rec.seq}", err=True)


@snapshots.command()
@click.argument("snapshot_id")
@click.argument("new_agent_id")
@click.pass_context
@_errors
def fork(ctx: click.Context, snapshot_id: str, new_agent_id: str) -> None:
    """Start agent NEW_AGENT_ID from a copy of SNAPSHOT_ID; prints the new snapshot id."""
    rec = _store(ctx).fork(snapshot_id, new_agent_id)
    click.echo(rec.id)
    click.echo(f"forked {snapshot_id} into agent {new_agent_id!r}", err=True)


@snapshots.command()
@click.argument("agent_id")
@click.option("--keep", type=click.IntRange(min=0), required=True, help="How many newest snapshots to keep.")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.pass_context
@_errors
def prune(ctx: click.Context, agent_id: str, keep: int, dry_run: bool) -> None:
    """Delete all but the KEEP newest snapshots of AGENT_ID (the current snapshot is always kept)."""
    store = _store(ctx)
    if dry_run:
        victims = store.prune_candidates(agent_id, keep=keep)
        for r in victims:
            click.echo(f"would delete seq {r.seq} {r.id}")
        click.echo(f"{len(victims)} snapshots would be deleted", err=True)
        return
    n = store.prune(agent_id, keep=keep)
    click.echo(f"deleted {n} snapshots of agent {agent_id!r}")


@snapshots.command("delete-agent")
@click.argument("agent_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@_errors
def delete_agent(ctx: click.Context, agent_id: str, yes: bool) -> None:
    """Delete AGENT_ID with all its snapshots and sleep jobs."""
    if not yes:
        click.confirm(f"delete agent {agent_id!r} and all its snapshots?", abort=True)
    n = _store(ctx).delete_agent(agent_id)
    click.echo(f"deleted agent {agent_id!r} and {n} snapshots")


@snapshots.command()
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Checkpoint directory of a model whose agents to move to the current fingerprint rule (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Verify and list what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per agent instead of lines.")
@click.option("--url", default=None, help="Store database URL (overrides `agentsleep snapshots --url`).")
@click.pass_context
@_errors
def migrate(ctx: click.Context, checkpoints: tuple[str, ...], dry_run: bool, as_json: bool, url: str | None) -> None:
    """Re-tag the agents of each CHECKPOINT's model that carry a legacy fingerprint (a "migrate" snapshot per agent).

    Agents of other models are left alone. Safe to rerun: migrated agents are current. Exit code 4 if an agent could
    not be migrated (e.g. its current snapshot is corrupt: it is listed, the others are migrated), 2 for a broken
    checkpoint.
    """
    from agentsleep.store.migrate import migrate_agents

    if url is not None:
        ctx.ensure_object(dict)["url"] = url
    try:
        models = [checkpoint_fingerprint(c) for c in checkpoints]
    except CheckpointError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    results = migrate_agents(_store(ctx), models, dry_run=dry_run)
    if as_json:
        click.echo(_json([r.to_dict() for r in results]))
    else:
        _print_migrations(results)
    counts = {a: sum(r.action == a for r in results) for a in ("migrated", "would-migrate", "current", "other-model")}
    click.echo(
        f"{counts['would-migrate'] if dry_run else counts['migrated']} agents {'would be ' if dry_run else ''}"
        f"migrated, {counts['current']} already current, {counts['other-model']} of other models",
        err=True,
    )
    if any(r.action == "failed" for r in results):
        sys.exit(EXIT_BAD_SNAPSHOT)


def _print_migrations(results: Sequence[Any]) -> None:
    for r in results:
        if r.action in ("migrated", "would-migrate"):
            verb = "migrated" if r.action == "migrated" else "would migrate"
            new = f" as snapshot {r.snapshot_id}" if r.snapshot_id else ""
            click.echo(f"{verb} agent {r.agent_id!r}: {r.fingerprint} -> {r.new_fingerprint} (from snapshot "
                       f"{r.from_snapshot}{new})")  # fmt: skip
        elif r.action == "failed":
            click.echo(f"failed agent {r.agent_id!r}: {r.error}")
        elif r.action == "no-snapshot":
            click.echo(f"skipped agent {r.agent_id!r}: no current snapshot (its next save takes {r.new_fingerprint})")


__all__ = ["snapshots"]
