"""The record checksum: a sha256 over every field of a snapshot row that describes the memory.

The payload's own sha256 (column ``sha256``, checked on every load) covers the fast weights and the window. The row
around it says what they *are*: how many tokens they consolidated, with how many passes, which snapshot they came
from, the metadata the runtime revives its counters from (``sleep_count``, ``tokens_seen``), ... An edit to any of
those would otherwise go unnoticed and, e.g., let a revived agent count tokens it never saw. ``record_sha256`` covers
them; `SnapshotStore.load` recomputes it and raises `SnapshotCorrupt` on a mismatch.

Version 1 covers: id, agent_id, parent_id, seq, created_at, reason, passes, tokens_consolidated, window_len,
fingerprint, byte_size, sha256, format_version, thread_id, metadata. Not covered: where the payload lives
(``payload``/``payload_path``: the payload is checked by its own sha256, and a file's name must be that sha256).
``parent_id`` becomes NULL when the parent is pruned; the store re-seals such rows in the same transaction (only rows
that verified before, so a damaged row is never made to look sound).

Never change this function: migration 0003 computed the checksums of existing rows with it. A new field means a new
version (a new function and a migration).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace, ASCII only, no NaN: the same text for the same value on every backend."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def record_digest_v1(
    *,
    id: str,
    agent_id: str,
    parent_id: str | None,
    seq: int,
    created_at: datetime,
    reason: str,
    passes: int,
    tokens_consolidated: int,
    window_len: int,
    fingerprint: str,
    byte_size: int,
    sha256: str,
    format_version: int,
    thread_id: str | None,
    metadata: dict[str, Any] | None,
) -> str:
    """sha256 (hex) of the canonical JSON of a snapshot row's describing fields (see the module docstring)."""
    when = created_at if created_at.tzinfo is not None else created_at.replace(tzinfo=UTC)
    doc = {
        "v": 1,
        "id": id,
        "agent_id": agent_id,
        "parent_id": parent_id,
        "seq": seq,
        "created_at": when.astimezone(UTC).isoformat(timespec="microseconds"),
        "reason": reason,
        "passes": passes,
        "tokens_consolidated": tokens_consolidated,
        "window_len": window_len,
        "fingerprint": fingerprint,
        "byte_size": byte_size,
        "sha256": sha256,
        "format_version": format_version,
        "thread_id": thread_id,
        "metadata": metadata or {},
    }
    return hashlib.sha256(canonical_json(doc).encode("ascii")).hexdigest()


def row_digest(row: Any) -> str:
    """`record_digest_v1` of a `Snapshot` row (or anything with the same attributes; ``meta`` is the metadata)."""
    return record_digest_v1(
        id=row.id,
        agent_id=row.agent_id,
        parent_id=row.parent_id,
        seq=row.seq,
        created_at=row.created_at,
        reason=row.reason,
        passes=row.passes,
        tokens_consolidated=row.tokens_consolidated,
        window_len=row.window_len,
        fingerprint=row.fingerprint,
        byte_size=row.byte_size,
        sha256=row.sha256,
        format_version=row.format_version,
        thread_id=row.thread_id,
        metadata=row.meta,
    )


__all__ = ["canonical_json", "record_digest_v1", "row_digest"]
