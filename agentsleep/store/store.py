"""`SnapshotStore`: save, load, fork and prune agents' memories (fast weights + window) in SQLite or Postgres.

Every public method is one unit of work (one transaction) and is safe to call from many threads, processes and hosts
at once. Guarantees (tested in tests/store/ and tests/reliability/):

- a save is atomic: the snapshot row and the agent's current pointer change together or not at all, and an
  acknowledged save is never lost, also when its payload file is shared with an agent being pruned or deleted;
- sequence numbers increase strictly per agent, also under concurrent writers (the agent row is the lock);
- a load verifies the payload's sha256 and the row's record checksum before parsing anything and raises
  `SnapshotCorrupt` for damaged data, changing nothing (the agent keeps pointing at its last good snapshot);
- an agent's model fingerprint and state shapes are fixed at its first save (`SnapshotMismatch` otherwise);
- ``save(..., expect_current=id)`` is a compare-and-set under the agent's row lock: it writes nothing and raises
  `SnapshotConflict` if another save made a different snapshot current first;
- bad input raises a typed error (`InvalidInput`, ...) before anything is written, the same on both backends.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import torch
from sqlalchemy import ColumnElement, Engine, delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.orm import Session, undefer

from agentsleep.errors import (
    AgentSleepError,
    InvalidInput,
    SnapshotConflict,
    SnapshotCorrupt,
    SnapshotMismatch,
    StoreError,
    UnknownAgent,
    UnknownSnapshot,
    UnsupportedBackend,
)
from agentsleep.ids import DEFAULT_TENANT, TENANT_SEP, agent_key, check_agent_id, check_id, check_tenant
from agentsleep.model.depth import Passes, check_passes, passes_to_json
from agentsleep.model.fingerprint import accepts, mismatch
from agentsleep.model.state import FastWeights
from agentsleep.store import jobs
from agentsleep.store import payload as container
from agentsleep.store.blobs import BlobDir, lock_key
from agentsleep.store.checks import (
    INT32_MAX,
    INT64_MAX,
    MAX_WINDOW_TOKENS,
    SNAPSHOT_ID_LEN,
    check_int,
    check_metadata,
    check_snapshot_id,
    check_state,
    check_window,
    from_file,
    parse_state,
)
from agentsleep.store.digest import row_digest
from agentsleep.store.engine import Synchronous, make_engine, one_line, upgrade, writer
from agentsleep.store.models import Agent, Snapshot, utcnow
from agentsleep.store.records import AgentRecord, LoadedSnapshot, SleepJobRecord, SnapshotRecord

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///agentsleep.db"
# With blob_dir set, payloads above this size go to content-addressed files (see docs/store.md for the numbers).
DEFAULT_INLINE_LIMIT = 1 << 20
_REASON = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_CHUNK = 500  # ids per IN (...) clause; SQLite caps bound parameters


def _new_id() -> str:
    return uuid.uuid4().hex


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ssm_shapes(state: FastWeights) -> dict[str, list[int]]:
    """The fixed-size part of a state, pinned per agent. Retained sliding-window K/V may vary in length."""
    return {k: v for k, v in state.shapes().items() if k.startswith("ssm.")}


def same_model(stored: str, given: str) -> bool:
    """Whether fast weights made by model ``given`` belong to an agent or snapshot of model ``stored``.

    The one place the store compares model fingerprints (saves, loads, fallbacks), so that a notion of accepted
    aliases of a fingerprint changes this function only.
    """
    return accepts(given, stored)


_check_agent_id = check_agent_id


class _CurrentParent:
    """Sentinel: the new snapshot's parent is the agent's current snapshot."""


_CURRENT = _CurrentParent()

NO_SNAPSHOT = ""
"""``save(..., expect_current=NO_SNAPSHOT)``: a compare-and-set for creating an agent (it must have no current snapshot
yet); a save racing another host's first save of the same agent then fails with `SnapshotConflict`."""


class SnapshotStore:
    """Per-agent fast-weight snapshots in SQL.

    Args:
        url: SQLAlchemy URL. ``sqlite:///path.db`` (default ``sqlite:///agentsleep.db``) or
            ``postgresql+psycopg://user:pass@host/db`` (bare ``postgresql://`` is accepted). ``sqlite://``
            (in memory, one shared connection) is for tests and single-threaded use only.
        blob_dir: optional directory for content-addressed payload files; payloads larger than ``inline_limit``
            go there instead of the database. Must be shared by every host that opens the same database.
        inline_limit: bytes; only used with ``blob_dir``.
        sqlite_synchronous: SQLite ``PRAGMA synchronous``; FULL survives power loss, NORMAL only process crashes.
        migrate: run Alembic ``upgrade head`` on open (idempotent, locked against concurrent openers).
        engine_kwargs: extra arguments for `sqlalchemy.create_engine` (pool sizes, echo, ...).
        tenant: the namespace this store object sees (`agentsleep.ids.check_tenant`; default: the default tenant,
            which holds every agent saved before tenants existed). Every call names agents and snapshots of this
            tenant only: another tenant's agent id or snapshot id is unknown here (`UnknownAgent`,
            `UnknownSnapshot`, the same query and message as for an id that exists nowhere). `for_tenant` opens
            another tenant's view on the same connections.
        create: make a new store if there is none (a new SQLite file in an existing directory, the schema in an
            empty Postgres database, ``blob_dir`` itself). ``False`` refuses to: read-only tools (``agentsleep
            snapshots list``) must not turn a mistyped URL into an empty store.

    Raises:
        StoreError: the database cannot be reached, is not a database (a damaged or 0-byte SQLite file), its schema
            is newer than this code, its directory does not exist, or (``create=False``) it holds no store.
        InvalidInput: the URL is not a SQLite or Postgres URL, or a bad argument.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        blob_dir: str | None = None,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        sqlite_synchronous: Synchronous = "FULL",
        migrate: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
        create: bool = True,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        self.tenant = check_tenant(tenant)
        self._prefix = agent_key(tenant, "x")[:-1]  # what this tenant's agent keys start with ("" by default)
        self.inline_limit = check_int("inline_limit", inline_limit, 0, INT64_MAX)
        self.engine: Engine = make_engine(
            url, sqlite_synchronous=sqlite_synchronous, engine_kwargs=engine_kwargs, create=create
        )
        self._writer = writer(self.engine)
        try:
            if migrate:
                upgrade(self.engine, create=create)
            self.blobs = BlobDir(blob_dir, create=create) if blob_dir is not None else None
        except BaseException:
            self.engine.dispose()
            raise

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SnapshotStore({self.url!r}{f', tenant={self.tenant!r}' if self.tenant else ''})"

    def for_tenant(self, tenant: str) -> SnapshotStore:
        """The same store (connections, blob directory) as seen by ``tenant``. Closing either closes both."""
        view = object.__new__(SnapshotStore)
        view.__dict__.update(self.__dict__)
        view.tenant = check_tenant(tenant)
        view._prefix = agent_key(tenant, "x")[:-1]
        return view

    # ---------------------------------------------------------------- tenants: keys in, ids out

    def _key(self, agent_id: str) -> str:
        """The store key of this tenant's ``agent_id`` (validated)."""
        return agent_key(self.tenant, check_agent_id(agent_id))

    def _name(self, key: str) -> str:
        """The caller's agent id of one of this tenant's keys."""
        return key[len(self._prefix) :]

    def _ours(self, key_column: Any) -> ColumnElement[bool]:
        """SQL: the agent key in ``key_column`` belongs to this tenant."""
        if self._prefix:
            return key_column.startswith(self._prefix, autoescape=True)
        return ~key_column.contains(TENANT_SEP, autoescape=True)

    def _rec(self, rec: SnapshotRecord) -> SnapshotRecord:
        """A record as this tenant sees it (its agent key back to the caller's id). Only for records leaving the
        store: the record checksum covers the stored key."""
        return replace(rec, agent_id=self._name(rec.agent_id)) if self._prefix else rec

    def _snapshot(self, s: Session, snapshot_id: str, *, payload: bool = False) -> Snapshot | None:
        """This tenant's snapshot row, or None (whether it is missing or another tenant's: one query either way)."""
        stmt = select(Snapshot).where(Snapshot.id == snapshot_id, self._ours(Snapshot.agent_id))
        if payload:
            stmt = stmt.options(undefer(Snapshot.payload))
        return s.scalars(stmt).one_or_none()

    # ---------------------------------------------------------------- units of work

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with _db_errors(), Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with _db_errors(), Session(self._writer, expire_on_commit=False) as s, s.begin():
            yield s

    def _insert_agent_if_absent(self, s: Session, agent_id: str, fingerprint: str, shapes: dict[str, Any]) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING; returns True if this call created the agent."""
        ins = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(Agent)
        stmt = ins.values(
            id=agent_id, created_at=utcnow(), fingerprint=fingerprint, state_shapes=shapes, last_seq=0
        ).on_conflict_do_nothing(index_elements=[Agent.id])
        # RETURNING rather than rowcount: the ORM-enabled insert does not report rowcount on every driver.
        return s.execute(stmt.returning(Agent.id)).first() is not None

    @staticmethod
    def _lock_agent(s: Session, key: str, agent_id: str) -> Agent:
        # FOR UPDATE: the agent row serialises writers of one agent on Postgres (SQLite: BEGIN IMMEDIATE already did).
        agent = s.scalars(select(Agent).where(Agent.id == key).with_for_update()).one_or_none()
        if agent is None:
            raise UnknownAgent(f"no agent {agent_id!r} in the snapshot store; save a snapshot for it first")
        return agent

    def _lock_blob(self, s: Session, sha256: str, *, exclusive: bool) -> None:
        """The per-file lock of the payload-file protocol (docs/store.md): shared by a save re-checking its file,
        exclusive for counting a file's references and unlinking it. Postgres: a transaction-scoped advisory lock;
        SQLite: nothing to take, every write transaction already holds the database's one write lock."""
        if self.dialect == "postgresql":
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            s.execute(text(f"SELECT {fn}(:k)"), {"k": lock_key(sha256)})

    # ---------------------------------------------------------------- save

    def save(
        self,
        agent_id: str,
        state: FastWeights,
        window: Sequence[int] = (),
        *,
        reason: str = "sleep",
        passes: int = 1,
        tokens_consolidated: int = 0,
        parent_id: str | None = None,
        thread_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        expect_current: str | None = None,
        new_agent: bool = False,
        max_window: int | None = None,
    ) -> SnapshotRecord:
        """Save an agent's memory (fast weights + window token ids) and make it the agent's current snapshot.

        Args:
            agent_id: the agent; created on its first save (its fingerprint and state shapes are fixed then).
            state: the fast weights of one stream (float32, finite; ``state.fingerprint`` is the model fingerprint).
            window: token ids of the agent's current attention window (may be empty, e.g. right after a sleep).
            reason: why this snapshot exists: "sleep", "manual", ... (lowercase, ≤ 32 chars).
            passes: the number of sleep passes N that produced ``state`` (1 ≤ N < 2^31).
            tokens_consolidated: total tokens consolidated into ``state`` over the agent's life (0 ≤ n < 2^63).
            parent_id: the snapshot this one derives from; default the agent's current snapshot.
            thread_id, metadata: free-form tags (metadata: a JSON object, no NaN/inf, ≤ 1 MiB).
            expect_current: compare-and-set: save only if this is still the agent's current snapshot id (checked
                under the agent's row lock, so no concurrent save can slip in between); otherwise raise
                `SnapshotConflict` and write nothing. An agent that does not exist yet has no current snapshot, so
                any ``expect_current`` conflicts with it, except `NO_SNAPSHOT` (``""``), which expects exactly that.
            new_agent: the save creates the agent; `InvalidInput` if it exists already (two hosts creating one
                agent: exactly one wins).
            max_window: the model's limit on the window (L, plus one waiting token); the store alone only knows
                `MAX_WINDOW_TOKENS`. Callers that know the model pass it.

        Raises:
            InvalidInput: bad argument (type, range, dtype, NaN/inf, non-int or negative token ids, a window past
                ``max_window``, metadata that is not a JSON object).
            SnapshotMismatch: the agent exists with another model fingerprint or other state shapes.
            SnapshotConflict: ``expect_current`` is not the agent's current snapshot (nothing written).
            UnknownSnapshot: ``parent_id`` does not exist.
            StoreError: the database failed.
        """
        state = check_state(state)
        win = check_window(window, max_window)
        payload = container.encode(container.canonical(state.to_bytes()), win, fingerprint=state.fingerprint)
        return self._save(
            agent_id,
            payload,
            fingerprint=state.fingerprint,
            shapes=_ssm_shapes(state),
            window_len=int(win.shape[0]),
            reason=reason,
            passes=passes,
            tokens_consolidated=tokens_consolidated,
            parent=_CURRENT if parent_id is None else parent_id,
            thread_id=thread_id,
            metadata=metadata,
            expect_current=expect_current,
            new_agent=new_agent,
        )

    def _save(
        self,
        agent_id: str,
        payload: bytes,
        *,
        fingerprint: str,
        shapes: dict[str, list[int]],
        window_len: int,
        reason: str,
        passes: int,
        tokens_consolidated: int,
        parent: str | _CurrentParent | None,
        thread_id: str | None,
        metadata: dict[str, Any] | None,
        new_agent: bool = False,
        expect_current: str | None = None,
    ) -> SnapshotRecord:
        key = self._key(agent_id)
        if expect_current is not None and not isinstance(expect_current, str):
            raise InvalidInput(f"expect_current must be a snapshot id (str) or None, got {expect_current!r}")
        if not isinstance(new_agent, bool):
            raise InvalidInput(f"new_agent must be a bool, got {new_agent!r}")
        if not isinstance(reason, str) or not _REASON.match(reason):
            raise InvalidInput(f"reason must match {_REASON.pattern} (e.g. 'sleep', 'manual'), got {reason!r}")
        check_int("passes", passes, 1, INT32_MAX)
        check_int("tokens_consolidated", tokens_consolidated, 0, INT64_MAX)
        if thread_id is not None:
            check_id(thread_id, "thread_id")
        if isinstance(parent, str):
            check_snapshot_id(parent, "parent_id")
        meta = check_metadata(metadata)

        sha = _sha256(payload)
        path = None
        if self.blobs is not None and len(payload) > self.inline_limit:
            path = self.blobs.put(sha, payload)  # the expensive write, durable before the transaction starts

        with self._write() as s:
            created = self._insert_agent_if_absent(s, key, fingerprint, shapes)
            if new_agent and not created:
                raise InvalidInput(f"agent {agent_id!r} already exists; choose a new agent id")
            agent = self._lock_agent(s, key, agent_id)
            if expect_current is not None and agent.current_snapshot_id != (expect_current or None):
                # Checked under the row lock (Postgres FOR UPDATE, SQLite BEGIN IMMEDIATE): a compare-and-set.
                raise SnapshotConflict(
                    f"agent {agent_id!r} moved on: its current snapshot is {agent.current_snapshot_id!r}, not the "
                    f"expected {expect_current!r}; nothing was saved (reload its latest snapshot and redo the work)"
                )
            if not same_model(agent.fingerprint, fingerprint):
                raise mismatch(fingerprint, agent.fingerprint, f"agent {agent_id!r}")
            if agent.fingerprint != fingerprint:  # a legacy tag of the same model: the agent moves to the current rule
                agent.fingerprint = str(fingerprint)
            if agent.state_shapes != shapes:
                raise SnapshotMismatch(
                    f"agent {agent_id!r} has state shapes {agent.state_shapes}, this state has {shapes}"
                )
            if isinstance(parent, _CurrentParent):
                parent_id = agent.current_snapshot_id
                if parent_id is not None and self._snapshot(s, parent_id) is None:
                    # A pointer left dangling by an edit outside agentsleep (SQLite with foreign keys off): the new
                    # snapshot starts a fresh lineage instead of failing every save from now on.
                    log.warning("agent %r points at missing snapshot %s; saving without a parent", agent_id, parent_id)
                    parent_id = None
            else:
                parent_id = parent
                if parent_id is not None and self._snapshot(s, parent_id) is None:
                    raise UnknownSnapshot(f"parent snapshot {parent_id!r} does not exist")
            if path is not None:
                # Under the file's lock: no prune or delete can unlink it between this check and our commit.
                self._lock_blob(s, sha, exclusive=False)
                path = self.blobs.ensure(sha, payload)  # type: ignore[union-attr]  # set with path
            agent.last_seq += 1
            snap = Snapshot(
                id=_new_id(),
                agent_id=key,
                parent_id=parent_id,
                seq=agent.last_seq,
                created_at=utcnow(),
                reason=reason,
                passes=passes,
                tokens_consolidated=tokens_consolidated,
                window_len=window_len,
                fingerprint=fingerprint,
                byte_size=len(payload),
                sha256=sha,
                format_version=container.FORMAT_VERSION,
                thread_id=thread_id,
                meta=meta,
                payload=None if path else payload,
                payload_path=path,
            )
            snap.record_sha256 = row_digest(snap)
            s.add(snap)
            s.flush()  # the row must exist before the agent points at it (the FK is checked per statement)
            agent.current_snapshot_id = snap.id
            record = self._rec(SnapshotRecord.from_row(snap))
        log.debug("saved %s", record)
        return record

    # ---------------------------------------------------------------- load

    def get(self, snapshot_id: str) -> SnapshotRecord:
        """A snapshot's metadata, without reading or verifying its payload. Raises `UnknownSnapshot`."""
        check_snapshot_id(snapshot_id)
        with self._read() as s:
            snap = self._snapshot(s, snapshot_id)
            if snap is None:
                raise UnknownSnapshot(f"no snapshot {snapshot_id!r} in the snapshot store")
            return self._rec(SnapshotRecord.from_row(snap))

    def current_id(self, agent_id: str) -> str | None:
        """The agent's current snapshot id, or None for an unknown agent (one indexed read, no payload): the cheap
        version check of a cache that holds the agent's memory."""
        key = self._key(agent_id)
        with self._read() as s:
            return s.scalar(select(Agent.current_snapshot_id).where(Agent.id == key))

    def find_by_metadata(self, agent_id: str, key: str, value: str) -> SnapshotRecord | None:
        """The newest snapshot of ``agent_id`` whose ``metadata[key]`` is the string ``value`` (None if none), e.g.
        the snapshot a served turn with an idempotency key wrote. Scans the agent's snapshots, not the whole store."""
        agent_key_ = self._key(agent_id)
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise InvalidInput(f"find_by_metadata needs a non-empty str key and a str value, got {key!r}, {value!r}")
        with self._read() as s:
            # The SQL filter compares text (Postgres renders a JSON number 1 as "1"); the exact test is in Python.
            rows = s.scalars(
                select(Snapshot)
                .where(Snapshot.agent_id == agent_key_, Snapshot.meta[key].as_string() == value)
                .order_by(Snapshot.seq.desc())
            )
            snap = next((r for r in rows if (r.meta or {}).get(key) == value), None)
            return self._rec(SnapshotRecord.from_row(snap)) if snap is not None else None

    def load(
        self,
        snapshot_id: str,
        *,
        fingerprint: str | None = None,
        shapes: dict[str, list[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> LoadedSnapshot:
        """Load and verify one snapshot.

        Args:
            snapshot_id: the snapshot.
            fingerprint: if given, the model fingerprint the snapshot must carry.
            shapes: if given, every tensor's shape the state must have (as `FastWeights.shapes()`).
            device: where to put the tensors.

        Raises:
            UnknownSnapshot: no such snapshot.
            SnapshotCorrupt: the stored payload is truncated or damaged (sha256 or size mismatch, bad container), or
                a field of its row was altered (record checksum).
            SnapshotMismatch: the snapshot belongs to another model or has other shapes.
        """
        check_snapshot_id(snapshot_id)
        with self._read() as s:
            snap = self._snapshot(s, snapshot_id, payload=True)
            if snap is None:
                raise UnknownSnapshot(f"no snapshot {snapshot_id!r} in the snapshot store")
            record, data, path = SnapshotRecord.from_row(snap), snap.payload, snap.payload_path
        loaded = self._decode(record, data, path, fingerprint=fingerprint, shapes=shapes, device=device)
        return replace(loaded, record=self._rec(loaded.record))

    def latest(
        self,
        agent_id: str,
        *,
        fingerprint: str | None = None,
        shapes: dict[str, list[int]] | None = None,
        device: torch.device | str = "cpu",
        fallback: bool = False,
    ) -> LoadedSnapshot:
        """Load the agent's current snapshot (the newest save unless rewound with `set_current`).

        With ``fallback=True`` a current snapshot that cannot be served (corrupt, or missing: a pointer left
        dangling by an edit outside agentsleep) is skipped, logged as a warning, in favour of the newest other
        snapshot of the agent that verifies; the agent's pointer is not changed.

        Raises:
            UnknownAgent: no such agent.
            UnknownSnapshot: the agent has no snapshot.
            SnapshotCorrupt, SnapshotMismatch: as `load` (with fallback: only when no snapshot verifies). A dangling
                pointer is `SnapshotCorrupt` without fallback.
        """
        key = self._key(agent_id)
        with self._read() as s:
            # One statement, so a concurrent save cannot slip between reading the pointer and the row.
            row = s.execute(
                select(Agent.current_snapshot_id, Snapshot)
                .outerjoin(Snapshot, Agent.current_snapshot_id == Snapshot.id)
                .where(Agent.id == key)
                .options(undefer(Snapshot.payload))
            ).first()
            if row is None:
                raise UnknownAgent(f"no agent {agent_id!r} in the snapshot store")
            pointer, snap = row
            found = None if snap is None else (SnapshotRecord.from_row(snap), snap.payload, snap.payload_path)
        if found is None:
            if pointer is None:
                problem: AgentSleepError = UnknownSnapshot(f"agent {agent_id!r} has no current snapshot")
            else:
                problem = SnapshotCorrupt(
                    f"agent {agent_id!r} points at snapshot {pointer}, which is missing from the store (the database "
                    "was edited outside agentsleep); latest(fallback=True) serves the newest snapshot that verifies, "
                    "set_current repairs the pointer"
                )
            if not fallback or not self.history(agent_id):
                raise problem
            log.warning("%s; trying the newest snapshot that verifies", problem)
            return self._newest_verifying(agent_id, None, problem, fingerprint, shapes, device)
        record, data, path = found
        try:
            loaded = self._decode(record, data, path, fingerprint=fingerprint, shapes=shapes, device=device)
            return replace(loaded, record=self._rec(loaded.record))
        except SnapshotCorrupt as first:
            if not fallback:
                raise
            log.warning("current snapshot %s of agent %r is corrupt (%s); trying older", record.id, agent_id, first)
            return self._newest_verifying(agent_id, record, first, fingerprint, shapes, device)

    def _newest_verifying(
        self,
        agent_id: str,
        skip: SnapshotRecord | None,
        problem: AgentSleepError,
        fingerprint: str | None,
        shapes: dict[str, list[int]] | None,
        device: torch.device | str,
    ) -> LoadedSnapshot:
        for older in reversed(self.history(agent_id)):
            if skip is not None and older.seq >= skip.seq:
                continue
            try:
                loaded = self.load(older.id, fingerprint=fingerprint, shapes=shapes, device=device)
            except SnapshotCorrupt as e:
                log.warning("snapshot %s of agent %r is corrupt too (%s)", older.id, agent_id, e)
                continue
            log.warning("agent %r served from older snapshot seq %d", agent_id, older.seq)
            return loaded
        raise problem

    def _payload_bytes(self, record: SnapshotRecord, inline: bytes | None, path: str | None) -> bytes:
        if path is None:
            if inline is None:
                raise SnapshotCorrupt(f"snapshot {record.id} has no payload")
            return bytes(inline)
        if self.blobs is None:
            raise StoreError(
                f"snapshot {record.id}'s payload lives in a blob directory; open the store with blob_dir=..."
            )
        if path != BlobDir.relpath(record.sha256):
            raise SnapshotCorrupt(f"snapshot {record.id}: its payload file is not named after its sha256")
        return self.blobs.get(path)

    def _decode(
        self,
        record: SnapshotRecord,
        inline: bytes | None,
        path: str | None,
        *,
        fingerprint: str | None,
        shapes: dict[str, list[int]] | None,
        device: torch.device | str,
    ) -> LoadedSnapshot:
        if record.record_sha256 is None or row_digest(record) != record.record_sha256:
            raise SnapshotCorrupt(
                f"snapshot {record.id}: its record (tokens_consolidated, passes, parent, metadata, ...) fails its "
                "checksum: the row was altered outside agentsleep"
            )
        if fingerprint is not None and not same_model(record.fingerprint, fingerprint):
            raise mismatch(fingerprint, record.fingerprint, f"snapshot {record.id}")
        data = self._payload_bytes(record, inline, path)
        if len(data) != record.byte_size:
            raise SnapshotCorrupt(
                f"snapshot {record.id} payload is {len(data)} bytes, expected {record.byte_size}: truncated or damaged"
            )
        if _sha256(data) != record.sha256:
            raise SnapshotCorrupt(f"snapshot {record.id} payload fails its sha256 check: the stored bytes are damaged")
        try:
            dec = container.decode(data)  # its content checksum also catches a hand-"repaired" row sha256
            state = parse_state(dec.state_bytes, shapes=shapes, device=device)
        except SnapshotCorrupt as e:
            raise SnapshotCorrupt(f"snapshot {record.id}: {e}") from e
        if dec.fingerprint != record.fingerprint or state.fingerprint != record.fingerprint:
            raise SnapshotCorrupt(f"snapshot {record.id}: payload fingerprint disagrees with its row")
        state.fingerprint = fingerprint or state.fingerprint  # the caller's model (a legacy tag is saved as current)
        if len(dec.window) != record.window_len:
            raise SnapshotCorrupt(f"snapshot {record.id}: payload window length disagrees with its row")
        return LoadedSnapshot(record=record, state=state, window=dec.window)

    def verify(self, snapshot_id: str) -> SnapshotRecord:
        """Load and verify a snapshot, discarding the state. Raises like `load`."""
        return self.load(snapshot_id).record

    def _verifies(self, s: Session, snapshot_id: str) -> bool:
        """Whether a snapshot loads and verifies, read in the caller's transaction."""
        snap = self._snapshot(s, snapshot_id, payload=True)
        if snap is None:
            return False
        try:
            self._decode(
                SnapshotRecord.from_row(snap), snap.payload, snap.payload_path, fingerprint=None, shapes=None,
                device="cpu",
            )  # fmt: skip
        except (SnapshotCorrupt, SnapshotMismatch):
            return False
        return True

    # ---------------------------------------------------------------- listing

    def agent(self, agent_id: str) -> AgentRecord:
        """One agent. Raises `UnknownAgent`."""
        rows = self._agents(self._key(agent_id))
        if not rows:
            raise UnknownAgent(f"no agent {agent_id!r} in the snapshot store")
        return rows[0]

    def agents(self) -> list[AgentRecord]:
        """Every agent, by id."""
        return self._agents(None)

    def _agents(self, key: str | None) -> list[AgentRecord]:
        n = select(func.count(Snapshot.id)).where(Snapshot.agent_id == Agent.id).scalar_subquery()
        cur = select(Snapshot.seq).where(Snapshot.id == Agent.current_snapshot_id).scalar_subquery()
        stmt = select(Agent, n, cur).order_by(Agent.id)
        stmt = stmt.where(self._ours(Agent.id)) if key is None else stmt.where(Agent.id == key)
        with self._read() as s:
            rows = [AgentRecord.from_row(a, int(k), c) for a, k, c in s.execute(stmt).all()]
        return [replace(r, id=self._name(r.id)) for r in rows] if self._prefix else rows

    def history(self, agent_id: str) -> list[SnapshotRecord]:
        """The agent's snapshots, oldest first (sequence order, which is lineage order for a linear agent).

        Raises `UnknownAgent`.
        """
        key = self._key(agent_id)
        with self._read() as s:
            if s.get(Agent, key) is None:
                raise UnknownAgent(f"no agent {agent_id!r} in the snapshot store")
            rows = s.scalars(select(Snapshot).where(Snapshot.agent_id == key).order_by(Snapshot.seq)).all()
            return [self._rec(SnapshotRecord.from_row(r)) for r in rows]

    def lineage(self, snapshot_id: str) -> list[SnapshotRecord]:
        """The chain of parents ending at ``snapshot_id``, root first; crosses agents at forks, stops at a pruned
        parent. Raises `UnknownSnapshot`."""
        check_snapshot_id(snapshot_id)
        chain: list[SnapshotRecord] = []
        seen: set[str] = set()
        with self._read() as s:
            sid: str | None = snapshot_id
            while sid is not None and sid not in seen:
                snap = self._snapshot(s, sid)  # a lineage never leaves its tenant
                if snap is None:
                    if not chain:
                        raise UnknownSnapshot(f"no snapshot {snapshot_id!r} in the snapshot store")
                    break
                seen.add(sid)
                chain.append(self._rec(SnapshotRecord.from_row(snap)))
                sid = snap.parent_id
        return chain[::-1]

    # ---------------------------------------------------------------- fork, rewind, import/export

    def fork(self, snapshot_id: str, new_agent_id: str, *, thread_id: str | None = None) -> SnapshotRecord:
        """Start a new agent from a copy of a snapshot (verified first). The copy's parent is the source snapshot.

        Raises:
            UnknownSnapshot: no such snapshot.
            SnapshotCorrupt: the source does not verify (nothing is created).
            InvalidInput: ``new_agent_id`` already exists.
        """
        _check_agent_id(new_agent_id)
        loaded = self.load(snapshot_id)
        src = loaded.record
        payload = container.encode(
            container.canonical(loaded.state.to_bytes()), loaded.window, fingerprint=src.fingerprint
        )
        return self._save(
            new_agent_id,
            payload,
            fingerprint=src.fingerprint,
            shapes=_ssm_shapes(loaded.state),
            window_len=src.window_len,
            reason="fork",
            passes=src.passes,
            tokens_consolidated=src.tokens_consolidated,
            parent=src.id,
            thread_id=thread_id,
            metadata={"forked_from": {"agent_id": src.agent_id, "snapshot_id": src.id, "seq": src.seq}},
            new_agent=True,
        )

    def set_current(self, agent_id: str, snapshot_id: str) -> AgentRecord:
        """Rewind (or advance) an agent to one of its own snapshots. The next save's parent is that snapshot.

        Raises `UnknownAgent`, `UnknownSnapshot`, `InvalidInput` (snapshot of another agent).
        """
        key = self._key(agent_id)
        check_snapshot_id(snapshot_id)
        with self._write() as s:
            agent = self._lock_agent(s, key, agent_id)
            snap = self._snapshot(s, snapshot_id)
            if snap is None:
                raise UnknownSnapshot(f"no snapshot {snapshot_id!r} in the snapshot store")
            if snap.agent_id != key:
                raise InvalidInput(
                    f"snapshot {snapshot_id} belongs to agent {self._name(snap.agent_id)!r}, not {agent_id!r}"
                )
            agent.current_snapshot_id = snapshot_id
        return self.agent(agent_id)

    def export_snapshot(self, snapshot_id: str) -> bytes:
        """A verified snapshot as a self-describing file (safetensors container with its record; see payload.py)."""
        loaded = self.load(snapshot_id)
        rec = loaded.record.to_dict()
        state_bytes = container.canonical(loaded.state.to_bytes())
        return container.encode(state_bytes, loaded.window, fingerprint=loaded.record.fingerprint, record=rec)

    def import_snapshot(self, data: bytes, *, agent_id: str | None = None) -> SnapshotRecord:
        """Import an exported snapshot as the newest snapshot of ``agent_id`` (default: the exporting agent's id).

        The import gets a new id and reason "import"; its parent is the original snapshot if that exists in this
        store, else none. ``metadata["imported_from"]`` names the original.

        Raises:
            SnapshotCorrupt: not a snapshot file, or a damaged one. Nothing is written.
            SnapshotMismatch: the target agent exists with another fingerprint or shapes.
            InvalidInput: no ``agent_id`` given and the file names none; a state the store refuses (NaN, dtype).
        """
        dec = container.decode(data)
        state = check_state(parse_state(dec.state_bytes))
        if state.fingerprint != dec.fingerprint:
            raise SnapshotCorrupt("snapshot file's container and state disagree on the model fingerprint")
        win = check_window(dec.window, None)
        rec = dec.record or {}
        named = rec.get("agent_id")
        target = agent_id if agent_id is not None else named if isinstance(named, str) else None
        if not target:
            raise InvalidInput("this snapshot file names no agent; pass agent_id")
        _check_agent_id(target)
        origin = from_file(rec, "id", str)
        parent: str | None = None
        if origin is not None and len(origin) <= SNAPSHOT_ID_LEN and origin.isascii() and origin.isprintable():
            with self._read() as s:
                parent = origin if self._snapshot(s, origin) is not None else None
        passes = from_file(rec, "passes", int)
        tokens = from_file(rec, "tokens_consolidated", int)
        thread = from_file(rec, "thread_id", str)
        try:
            thread = check_id(thread, "thread_id") if thread is not None else None
        except InvalidInput:
            thread = None  # a tag from a foreign file that this store cannot hold: dropped, not fatal
        payload = container.encode(container.canonical(dec.state_bytes), win, fingerprint=dec.fingerprint)
        origin_fields = {k: from_file(rec, k, (str, int)) for k in ("id", "agent_id", "seq", "created_at", "reason")}
        return self._save(
            target,
            payload,
            fingerprint=dec.fingerprint,
            shapes=_ssm_shapes(state),
            window_len=len(dec.window),
            reason="import",
            passes=passes if passes is not None and 1 <= passes <= INT32_MAX else 1,
            tokens_consolidated=tokens if tokens is not None and 0 <= tokens <= INT64_MAX else 0,
            parent=parent,
            thread_id=thread,
            metadata={"imported_from": origin_fields},
        )

    # ---------------------------------------------------------------- prune, delete, gc

    @staticmethod
    def _victims(rows: Sequence[tuple[str, int]], keep: int, current: str | None) -> list[str]:
        """Ids to prune from (id, seq) rows: all but the ``keep`` newest and the current one."""
        newest_first = sorted(rows, key=lambda r: r[1], reverse=True)
        kept = {sid for sid, _ in newest_first[:keep]} | ({current} if current else set())
        return [sid for sid, _ in newest_first if sid not in kept]

    def _spare_last_good(self, s: Session, rows: Sequence[tuple[str, int]], victims: list[str]) -> list[str]:
        """``victims`` minus the newest snapshot that verifies, if no kept snapshot verifies: prune never deletes
        the agent's last good memory (a corrupt current snapshot must not take the good older ones with it)."""
        doomed = set(victims)
        newest_first = [sid for sid, _ in sorted(rows, key=lambda r: r[1], reverse=True)]
        if any(self._verifies(s, sid) for sid in newest_first if sid not in doomed):
            return victims
        for sid in newest_first:
            if sid in doomed and self._verifies(s, sid):
                log.warning("prune keeps snapshot %s: no kept snapshot verifies and it is the newest that does", sid)
                return [v for v in victims if v != sid]
        return victims

    def prune_candidates(self, agent_id: str, *, keep: int) -> list[SnapshotRecord]:
        """What `prune` would delete now, oldest first."""
        key = self._key(agent_id)
        self._check_keep(keep)
        with self._read() as s:
            agent = s.get(Agent, key)
            if agent is None:
                raise UnknownAgent(f"no agent {agent_id!r} in the snapshot store")
            rows = [(r[0], r[1]) for r in s.execute(select(Snapshot.id, Snapshot.seq).where(Snapshot.agent_id == key))]
            victims = set(self._spare_last_good(s, rows, self._victims(rows, keep, agent.current_snapshot_id)))
        return [r for r in self.history(agent_id) if r.id in victims]

    @staticmethod
    def _check_keep(keep: int) -> None:
        check_int("keep", keep, 0, INT64_MAX)

    def prune(self, agent_id: str, *, keep: int) -> int:
        """Delete all but the ``keep`` newest snapshots of an agent; the current snapshot is always kept, and so is
        the newest snapshot that verifies when no kept one does (so ``keep=1`` on a corrupt current snapshot keeps
        the good one that ``latest(fallback=True)`` serves).

        Ancestors are not protected: every snapshot is a complete state, so a survivor whose parent is pruned keeps
        loading and its ``parent_id`` becomes NULL (also across agents, for forks). Returns the number deleted.
        Raises `UnknownAgent`, `InvalidInput`.
        """
        key = self._key(agent_id)
        self._check_keep(keep)
        with self._write() as s:
            agent = self._lock_agent(s, key, agent_id)
            rows = [(r[0], r[1]) for r in s.execute(select(Snapshot.id, Snapshot.seq).where(Snapshot.agent_id == key))]
            victims = self._spare_last_good(s, rows, self._victims(rows, keep, agent.current_snapshot_id))
            paths = self._delete_snapshots(s, victims)
        self._release_files(paths)
        log.info("pruned %d snapshots of agent %r (keep=%d)", len(victims), agent_id, keep)
        return len(victims)

    def _delete_snapshots(self, s: Session, ids: Sequence[str]) -> set[str]:
        """Delete snapshot rows (children elsewhere lose their parent link, re-sealed); returns their file paths."""
        doomed = set(ids)
        paths: set[str] = set()
        for i in range(0, len(ids), _CHUNK):
            chunk = list(ids[i : i + _CHUNK])
            for child in s.scalars(select(Snapshot).where(Snapshot.parent_id.in_(chunk))):
                if child.id in doomed:
                    continue
                # What ON DELETE SET NULL would do, plus a new record checksum: only for a row that verified
                # before, so a damaged row is never made to look sound.
                sound = child.record_sha256 == row_digest(child)
                child.parent_id = None
                if sound:
                    child.record_sha256 = row_digest(child)
            s.flush()
            paths.update(
                p for p in s.scalars(select(Snapshot.payload_path).where(Snapshot.id.in_(chunk))) if p is not None
            )
            s.execute(delete(Snapshot).where(Snapshot.id.in_(chunk)), execution_options={"synchronize_session": False})
        return paths

    def delete_agent(self, agent_id: str) -> int:
        """Delete an agent, all its snapshots and its waiting or finished sleep jobs. Returns the number of
        snapshots deleted.

        Snapshots of other agents forked from it keep loading; their ``parent_id`` becomes NULL.
        Raises `UnknownAgent`.
        """
        key = self._key(agent_id)
        with self._write() as s:
            agent = self._lock_agent(s, key, agent_id)
            agent.current_snapshot_id = None
            s.flush()
            ids = list(s.scalars(select(Snapshot.id).where(Snapshot.agent_id == key)))
            paths = self._delete_snapshots(s, ids)
            if self.dialect == "postgresql" and jobs.has_procrastinate_schema(s.connection()):
                jobs.forget_agent_jobs(s, key)
            s.execute(delete(Agent).where(Agent.id == key), execution_options={"synchronize_session": False})
        self._release_files(paths)
        log.info("deleted agent %r and %d snapshots", agent_id, len(ids))
        return len(ids)

    def _release_files(self, paths: set[str]) -> None:
        """Unlink payload files that no row references any more (identical payloads share one file).

        One short transaction per file, holding the file's lock exclusively: a save that wants the file holds it
        shared while it re-checks the file and commits, so either that save's row is counted here, or the save
        finds the file gone and writes it again (`BlobDir.ensure`). A crash before this leaves an unreferenced file
        for `gc_blobs`, never a row without its file.
        """
        if not paths or self.blobs is None:
            return
        for rel in sorted(paths):
            self._unlink_if_unreferenced(rel)

    def _unlink_if_unreferenced(self, rel: str) -> bool:
        assert self.blobs is not None
        sha = rel.rsplit("/", 1)[-1].split(".", 1)[0]
        with self._write() as s:
            self._lock_blob(s, sha, exclusive=True)
            refs = s.scalar(select(func.count()).select_from(Snapshot).where(Snapshot.payload_path == rel))
            if refs:
                return False
            self.blobs.remove(rel)  # before commit: the lock is still held, no save can want it in between
        return True

    def gc_blobs(self, *, grace_s: float = 3600.0) -> int:
        """Remove payload files that no row references and that are older than ``grace_s`` (left by writers killed
        between writing the file and committing the row, or by a save that lost its compare-and-set). Files are
        unlinked under the same per-file lock as `prune`, so a save in flight is never hurt; the grace period only
        spares temporaries still being written."""
        if (
            isinstance(grace_s, bool)
            or not isinstance(grace_s, int | float)
            or not math.isfinite(grace_s)
            or grace_s < 0
        ):
            raise InvalidInput(f"grace_s must be a finite number >= 0, got {grace_s!r}")
        if self.blobs is None:
            return 0
        now = datetime.now(UTC).timestamp()
        old = [rel for rel, m in self.blobs.walk() if now - m > grace_s]
        removed = 0
        for rel in old:
            if BlobDir.is_temporary(rel):
                self.blobs.remove(rel)
                removed += 1
            elif self._unlink_if_unreferenced(rel):
                removed += 1
        return removed

    # ---------------------------------------------------------------- sleep jobs (scale-out, Postgres)

    def _require_queue(self) -> None:
        if self.dialect != "postgresql":
            raise UnsupportedBackend(
                "sleep jobs and sleep workers need a Postgres store (they run on procrastinate, a Postgres task "
                f"queue); this store is {self.dialect}. With SQLite, AgentHost sleeps its agents itself, in process"
            )

    def enqueue_sleep(self, agent_id: str, *, passes: Passes | dict[str, Any] | None = None) -> SleepJobRecord:
        """Queue a sleep (consolidation) of an agent for the sleep workers (`agentsleep sleep-worker`).

        At most one sleep waits per agent: if one is already waiting, that one is returned (a sleep consolidates
        whatever window the agent has when it runs, so the waiting job already is the requested work). One agent's
        sleeps never run at once. ``passes``: N for this job (default: the worker's), or adaptive depth (`AutoPasses`,
        or its JSON form ``{"auto": true, "max_passes": 8, "tol": 0.05}``), stored in the job as JSON.

        Raises:
            UnsupportedBackend: a SQLite store (no workers there; the host sleeps its agents in process).
            UnknownAgent: no such agent. InvalidInput: a bad ``passes``.
            StoreError: the database failed, or procrastinate's schema is missing (opened with ``migrate=False``).
        """
        key = self._key(agent_id)
        depth = None
        if passes is not None:
            depth = passes_to_json(check_passes(passes))
            if isinstance(depth, int):
                check_int("passes", depth, 1, INT32_MAX)
        self._require_queue()
        with self._write() as s:
            agent = s.get(Agent, key)
            if agent is None:
                raise UnknownAgent(f"no agent {agent_id!r} in the snapshot store")
            if not jobs.has_procrastinate_schema(s.connection()):
                raise StoreError("this database has no sleep-job queue (procrastinate's schema); open it with migrate")
            job_id, created = jobs.defer_sleep(s, key, agent.fingerprint, depth)
            (job,) = [j for j in self._jobs(s, key) if j.id == job_id]
        log.info("sleep of agent %r %s as job %d", agent_id, "queued" if created else "already waiting", job_id)
        return job

    def sleep_jobs(self, agent_id: str | None = None) -> list[SleepJobRecord]:
        """Sleep jobs in the queue, oldest first (optionally one agent's); always empty on SQLite."""
        key = self._key(agent_id) if agent_id is not None else None
        if self.dialect != "postgresql":
            return []
        with self._read() as s:
            if not jobs.has_procrastinate_schema(s.connection()):
                return []
            return self._jobs(s, key)

    def _jobs(self, s: Session, key: str | None) -> list[SleepJobRecord]:
        """This tenant's sleep jobs (one agent's with ``key``), with the caller's agent ids."""
        out = []
        for job in jobs.list_sleep_jobs(s, key):
            mine = job.agent_id.startswith(self._prefix) if self._prefix else TENANT_SEP not in job.agent_id
            if mine:
                out.append(replace(job, agent_id=self._name(job.agent_id)) if self._prefix else job)
        return out


@contextmanager
def _db_errors() -> Iterator[None]:
    """Translate driver errors into `StoreError`; our own typed errors pass through untouched."""
    try:
        yield
    except AgentSleepError:
        raise
    except IntegrityError as e:
        raise StoreError(f"the snapshot store rejected a write (constraint violated): {one_line(e.orig)}") from e
    except DBAPIError as e:
        raise StoreError(f"snapshot store database error: {one_line(e.orig)}") from e
    except StatementError as e:  # a value the driver could not send (the checks above should make this unreachable)
        raise InvalidInput(f"a value could not be stored: {one_line(e.orig)}") from e
    except SATimeoutError as e:  # connection pool exhausted
        raise StoreError(f"no free database connection: {e}; raise engine_kwargs pool_size/max_overflow") from e


__all__ = ["DEFAULT_INLINE_LIMIT", "DEFAULT_URL", "MAX_WINDOW_TOKENS", "NO_SNAPSHOT", "SnapshotStore", "same_model"]
