"""`SleepMemory`: LLM sleep as an `AgentMiddleware` for `langchain.agents.create_agent`.

One agent per LangGraph thread (the agent id is the thread id unless given). Its memory is the hybrid's fast weights
S plus the messages since its last sleep; a sleep folds those messages into S and they leave the model's view.

A turn, hook by hook:

* ``before_agent`` — tells the scheduler a turn started (pending sleeps wait), waits for a sleep that is already
  running, revives the agent from its latest snapshot if the engine does not hold it (a fresh process), and adopts
  a sleep that committed since the last turn: new ``snapshot_id`` / ``consolidated_through`` / ``sleep_count`` and,
  with ``prune_consolidated`` (default), the consolidated messages leave the message list (`RemoveMessage` by id).
* ``before_model`` — counts the window's tokens exactly (the checkpoint's tokenizer and chat template); only if the
  next call cannot fit the window does it sleep synchronously, and adopts that sleep at once.
* ``wrap_model_call`` — sends only the messages after ``consolidated_through`` and binds the agent id to the model
  (``model_settings``); nothing in the graph state is rewritten for that.
* ``after_agent`` — hands the window size to the `SleepScheduler`, which sleeps in the background, debounced, once
  the policy's soft threshold is reached. It never waits for a sleep.

Sleeps commit in the engine and the snapshot store first (the engine swaps S only after the snapshot is saved); the
graph state learns of them at the next ``before_agent`` (or at once for a synchronous sleep). Between the two, the
engine's ledger (`_window`) says which messages the sleep consolidated, so they are never sent twice.

Failure policy: a failed sleep keeps the last good state (S, window and snapshot unchanged), is logged, and is
retried by the scheduler with backoff; it never fails the agent run. If the store cannot be reached when a thread
must be revived, the revival is retried a few times; after that the turn runs on a throw-away agent (zero S + the
messages since the last sleep) that is never slept or saved, and the next turn tries again, so no committed state is
overwritten. ``on_error="raise"`` propagates instead (for tests). `MissingAgentKey` is always raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired

from agentsleep.errors import (
    ConfigError,
    SleepFailed,
    SnapshotConflict,
    SnapshotMismatch,
    StoreError,
    UnknownAgent,
    UnknownSnapshot,
)
from agentsleep.ids import check_agent_id
from agentsleep.memory.policy import SleepPolicy
from agentsleep.memory.scheduler import SleepOutcome, SleepRecord, SleepRequest, SleepScheduler
from agentsleep.runtime.engine import AgentMemory, AgentSession, Engine, SleepCommit
from agentsleep.runtime.revive import memory_from_snapshot, save_memory
from agentsleep.store import SnapshotStore
from agentsleep.store.store import DEFAULT_URL
from langchain.agents.middleware.types import (
    AgentMiddleware,
    AgentState,
    ContextT,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
    PrivateStateAttr,
    ResponseT,
)
from langchain_core.messages import AnyMessage, BaseMessage, RemoveMessage
from langgraph.runtime import Runtime
from langgraph.types import Command

from langchain_agentsleep import _window
from langchain_agentsleep.chat_models import (
    ChatSleepHybrid,
    _find_tokenizer,
    _schemas,
    check_message_lengths,
    make_codec,
    sync_window,
)
from langchain_agentsleep.chat_template import ChatCodec
from langchain_agentsleep.errors import MessageTooLong, MissingAgentKey
from langchain_agentsleep.tokens import tiktoken_counter

logger = logging.getLogger(__name__)

OnError = Literal["passthrough", "raise"]
OtherModels = Literal["raise", "passthrough"]
STORE_URL_ENV = "AGENTSLEEP_STORE_URL"


class _EnvStore:
    """The default ``store``: ``$AGENTSLEEP_STORE_URL``, else the default SQLite file (``sqlite:///agentsleep.db``)."""

    def __repr__(self) -> str:
        return f"${STORE_URL_ENV} or {DEFAULT_URL!r}"


ENV_STORE = _EnvStore()
AgentKey = Callable[[Runtime[Any]], "str | None"]

_DEFAULT_RESERVE_TOKENS = 32  # room kept for a reply when the chat model's max_tokens is not known yet
_REVIVE_ATTEMPTS = 3
_REVIVE_BACKOFF_SECONDS = 0.05  # doubled per attempt: 0.05, 0.1 (a store that is down "for a moment")


class SleepState(AgentState[ResponseT]):
    """`AgentState` plus `SleepMemory`'s private fields: ids and counters only.

    Never tensors: they would be copied into every LangGraph checkpoint. The fast weights live once per sleep in the
    snapshot store.
    """

    snapshot_id: NotRequired[Annotated[str | None, PrivateStateAttr]]
    """The agent's snapshot after its last adopted sleep."""
    consolidated_through: NotRequired[Annotated[str | None, PrivateStateAttr]]
    """Id of the newest message folded into S; the model is sent only the messages after it."""
    tokens_since_sleep: NotRequired[Annotated[int, PrivateStateAttr]]
    """Window tokens after the last turn (exact, the model's own tokenizer)."""
    sleep_count: NotRequired[Annotated[int, PrivateStateAttr]]
    """Sleeps over the agent's life."""
    sleep_pending: NotRequired[Annotated[str | None, PrivateStateAttr]]
    """Run id of the background sleep scheduled after the last turn, if any."""
    last_sleep_status: NotRequired[Annotated[str | None, PrivateStateAttr]]
    """``completed`` / ``failed`` / ``cancelled`` / ``degraded``; details live in the run records (`history`)."""


@dataclass(frozen=True, slots=True)
class _Commit:
    """A committed sleep (or a revived snapshot), waiting to be adopted by the graph state."""

    snapshot_id: str | None
    through: str | None
    sleep_count: int


@dataclass(eq=False)
class _Book:
    """Per-agent bookkeeping of one `SleepMemory` (process-local)."""

    agent_id: str
    cond: threading.Condition = field(default_factory=lambda: threading.Condition(threading.Lock()))
    thread_id: str | None = None
    in_turn: bool = False  # between before_agent and after_agent
    sleeping: bool = False  # a sleep job is inside the engine
    sync_wanted: bool = False  # this turn asked for a synchronous sleep: it may commit during the turn
    committed: _Commit | None = None
    degraded: bool = False  # this turn runs on a throw-away agent (revival failed)
    refused: MessageTooLong | None = None  # before_agent took an over-long message out; before_model raises this
    last_status: str | None = None
    unreported_failure: SleepRecord | None = None  # for on_error="raise"


class SleepMemory(AgentMiddleware[SleepState[ResponseT], ContextT, ResponseT]):
    """Long-term memory by sleeping: the messages since the last sleep are consolidated into the hybrid's fast weights.

    Example:
        .. code-block:: python

            import sqlite3

            from langchain.agents import create_agent
            from langgraph.checkpoint.sqlite import SqliteSaver
            from langchain_agentsleep import ChatSleepHybrid, SleepMemory

            model = ChatSleepHybrid(model="checkpoints/gsm-qlast-n2", max_tokens=4)
            memory = SleepMemory(store="sqlite:///agents.db")  # the engine is taken from the agent's model
            graph = SqliteSaver(sqlite3.connect("graph.db", check_same_thread=False))
            agent = create_agent(model, middleware=[memory], checkpointer=graph)
            agent.invoke({"messages": [("user", "V042 = 5 ;")]}, {"configurable": {"thread_id": "alice"}})

    Args:
        engine: optional: the `ChatSleepHybrid` the agent uses (its engine, chat template and ``max_tokens`` are
            taken from it), or its `Engine`. Default: the agent's model, at its first model call.
        store: where snapshots go: a `SnapshotStore` or its URL (``sqlite:///agents.db``, ``postgresql+psycopg://...``).
            Default: ``$AGENTSLEEP_STORE_URL``, else ``sqlite:///agentsleep.db`` (a file in the working directory).
            None keeps agents in this process only (nothing survives a restart).
        policy: when and how hard to sleep (default: the engine's L and N, other fields default). ``policy.window``
            may be below L to sleep earlier. ``debounce_seconds`` delays a background sleep after a turn.
        agent_id: use this agent for every thread (default: the LangGraph ``thread_id``).
        agent_key: ``runtime -> agent id`` (e.g. from ``runtime.context``); wins over the thread id.
        reserve_tokens: room kept for the reply when deciding whether the next call fits (default: the chat model's
            ``max_tokens``).
        prune_consolidated: remove consolidated messages from the graph state once their sleep has committed, so the
            LangGraph checkpoint stays bounded. With False they stay (the model still never sees them).
        on_error: ``"passthrough"`` (default): a failed sleep or revival is logged and the run goes on;
            ``"raise"``: it propagates (tests).
        other_models: what to do when the agent's model cannot sleep (not a `ChatSleepHybrid` on this memory's
            engine, nor a served sleep model): ``"raise"`` (default, `ConfigError` at the first model call) or
            ``"passthrough"`` (the call goes through unchanged, without memory; e.g. a fallback model).
        max_workers: background sleeps that may run at once across agents.
        scheduler: a ready `SleepScheduler` (its job must be this middleware's `sleep_job`); default: one is built.

    Failure policy: see the module docstring. In short, the last good state (S, snapshot) is never replaced by a
    failed sleep, every save is a compare-and-set on the agent's current snapshot (a process whose copy of the agent
    is stale never overwrites a newer one), and no sleep error ever fails the agent run unless ``on_error="raise"``.
    """

    state_schema = SleepState  # type: ignore[assignment]

    def __init__(
        self,
        engine: Engine | ChatSleepHybrid | None = None,
        store: SnapshotStore | str | _EnvStore | None = ENV_STORE,
        *,
        policy: SleepPolicy | None = None,
        agent_id: str | None = None,
        agent_key: AgentKey | None = None,
        reserve_tokens: int | None = None,
        prune_consolidated: bool = True,
        on_error: OnError = "passthrough",
        other_models: OtherModels = "raise",
        max_workers: int = 1,
        scheduler: SleepScheduler | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ("passthrough", "raise"):
            raise ConfigError(f"on_error must be 'passthrough' or 'raise', got {on_error!r}")
        if other_models not in ("passthrough", "raise"):
            raise ConfigError(f"other_models must be 'raise' or 'passthrough', got {other_models!r}")
        if reserve_tokens is not None and reserve_tokens < 1:
            raise ConfigError(f"reserve_tokens must be >= 1, got {reserve_tokens}")
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        if agent_id is not None:
            check_agent_id(agent_id)
        if isinstance(store, _EnvStore):
            store = os.environ.get(STORE_URL_ENV) or DEFAULT_URL
        self.store: SnapshotStore | None = SnapshotStore(store) if isinstance(store, str) else store
        if self.store is not None and not isinstance(self.store, SnapshotStore):
            raise ConfigError(f"store must be a SnapshotStore, its URL or None, got {type(store).__name__}")
        self.agent_id = agent_id
        self.agent_key = agent_key
        self.reserve_tokens = reserve_tokens
        self.prune_consolidated = prune_consolidated
        self.on_error: OnError = on_error
        self.other_models: OtherModels = other_models
        self.max_workers = max_workers
        self.model: ChatSleepHybrid | None = None
        self.engine: Engine | None = None
        self.policy: SleepPolicy | None = policy
        self.scheduler: SleepScheduler | None = scheduler
        self._codec: ChatCodec | None = None
        self._books: dict[str, _Book] = {}
        self._books_lock = threading.Lock()
        self._bind_lock = threading.Lock()
        if engine is not None:
            if isinstance(engine, ChatSleepHybrid):
                self._bind(engine.engine, engine)
            elif isinstance(engine, Engine):
                self._bind(engine, None)
            else:
                raise ConfigError(
                    f"SleepMemory needs a ChatSleepHybrid, an agentsleep Engine or nothing (the agent's model is "
                    f"used), got {type(engine).__name__}"
                )

    @property
    def _eng(self) -> Engine:
        return self._require_engine()

    @property
    def _policy(self) -> SleepPolicy:
        if self.policy is None:
            raise ConfigError("this SleepMemory is not bound to a model yet")
        return self.policy

    @property
    def _sched(self) -> SleepScheduler:
        if self.scheduler is None:
            raise ConfigError("this SleepMemory is not bound to a model yet")
        return self.scheduler

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise ConfigError(
                "this SleepMemory is not bound to a model yet: pass SleepMemory(model), or run the agent once (the "
                "first model call binds it to the agent's ChatSleepHybrid)"
            )
        return self.engine

    def _bind(self, engine: Engine, model: ChatSleepHybrid | None) -> None:
        """Attach the engine (once): the policy defaults to its L and N, and the scheduler starts."""
        with self._bind_lock:
            if self.engine is not None:
                if self.model is None and model is not None and model.engine is self.engine:
                    self.model = model
                    self._codec = model.codec
                return
            policy = self.policy or SleepPolicy.with_depth(engine.window, engine.passes)
            if policy.window > engine.window:
                raise ConfigError(
                    f"policy.window={policy.window} exceeds the model's window L={engine.window}; use at most L"
                )
            self.policy = policy
            self.model = model
            self._codec = model.codec if model is not None else _engine_codec(engine)
            if self.scheduler is None:
                self.scheduler = SleepScheduler(
                    self.sleep_job,
                    policy,
                    max_workers=self.max_workers,
                    on_success=self._on_record,
                    on_failure=self._on_record,
                )
            self.engine = engine  # last: hooks treat a set engine as "bound"

    # ------------------------------------------------------------------ public helpers

    @property
    def token_counter(self) -> Callable[[Any], int]:
        """A LangChain ``TokenCounter`` (fits ``SummarizationMiddleware(token_counter=...)``).

        Exact window tokens with the model's tokenizer and chat template when known, else offline tiktoken
        (``cl100k_base``).
        """
        return self._codec if self._codec is not None else tiktoken_counter()

    def history(self, agent_id: str) -> list[SleepRecord]:
        """Run records of the agent's sleeps (status, timings, attempts, errors), oldest first."""
        return self.scheduler.history(agent_id) if self.scheduler is not None else []

    def flush(self, timeout: float | None = None) -> bool:
        """Run every pending sleep now and wait for all of them; False on timeout. For tests and clean shutdown."""
        return self.scheduler.flush(timeout) if self.scheduler is not None else True

    async def aflush(self, timeout: float | None = None) -> bool:
        """Async twin of `flush`."""
        return await self.scheduler.aflush(timeout) if self.scheduler is not None else True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no sleep is pending or running, without hurrying them; False on timeout."""
        return self.scheduler.wait_idle(timeout) if self.scheduler is not None else True

    def close(self, *, wait: bool = True) -> None:
        """Stop the scheduler (with ``wait``, pending sleeps run first)."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=wait)

    def __enter__(self) -> SleepMemory[ResponseT, ContextT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def session(self, agent_id: str) -> AgentSession:
        """The engine's view of a live agent (window, sleep count, snapshot id)."""
        return self._require_engine().session(agent_id)

    def snapshot(self, agent_id: str, *, reason: str = "manual") -> str:
        """Save the agent's current memory (S and its window) now and return the snapshot id.

        The snapshot records which messages its window holds, so a revive from it continues exactly.

        Raises:
            ConfigError: no store. UnknownAgent: the agent is not live. StoreError: the store failed.
        """
        store = self._require_store()
        engine = self._require_engine()
        book = self._book(agent_id)
        slot = _window.slot(engine, agent_id)

        def persist(memory: AgentMemory) -> str:
            ledger = slot.ledger
            meta: dict[str, Any] = {"consolidated_through": book.committed.through if book.committed else None}
            if ledger is not None and ledger.window_tokens == len(memory.window):
                meta["window_message_ids"] = list(ledger.message_ids)
                meta["window_head_tokens"] = ledger.head_tokens
                meta["head_ids"] = list(memory.window[: ledger.head_tokens])
            return save_memory(
                store,
                agent_id,
                memory,
                reason=reason,
                passes=self.policy.nominal_passes,
                metadata=meta,
                thread_id=book.thread_id,
                expect_current=expect,
            ).id

        with slot.lock:
            expect = self._expect_current(agent_id)
            sid = engine.checkpoint(agent_id, persist)
        assert sid is not None  # persist always returns an id
        return sid

    def revive(self, agent_id: str, snapshot_id: str | None = None) -> AgentSession:
        """Load the agent into the engine from its latest snapshot (or ``snapshot_id``), replacing a live one.

        Forking a thread: ``revive("new-thread", snapshot_id=...)`` starts a new thread from any snapshot.

        Raises:
            ConfigError: no store. UnknownAgent / UnknownSnapshot, SnapshotMismatch, SnapshotCorrupt, StoreError.
        """
        store = self._require_store()
        engine = self._require_engine()
        loaded = (
            store.latest(agent_id, fingerprint=engine.fingerprint, fallback=True)
            if snapshot_id is None
            else store.load(snapshot_id, fingerprint=engine.fingerprint)
        )
        return self._install(agent_id, self._book(agent_id), loaded)

    def forget(self, agent_id: str) -> None:
        """Remove a live agent from the engine (its snapshots stay in the store); the next turn revives it."""
        if self.engine is not None:
            self._forget_live(agent_id)
        with self._books_lock:
            self._books.pop(agent_id, None)

    # ------------------------------------------------------------------ hooks

    def before_agent(self, state: SleepState[ResponseT], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Start of a turn: hold background sleeps, revive the agent if needed, adopt a committed sleep.

        A new message that can never fit the window is taken out of the state here; the turn then fails with
        `MessageTooLong` before the model runs (in ``before_model``).
        """
        agent = self._agent_id(runtime)
        book = self._book(agent, _thread_id(runtime))
        with book.cond:
            book.in_turn = False  # a new invocation: whatever an interrupted one left is over
            book.refused = None
        update = self._enter(agent, book, state)
        refused = self._refuse_too_long(agent, book, state, update)
        return {**update, **refused} or None

    async def abefore_agent(self, state: SleepState[ResponseT], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Async twin of `before_agent`."""
        return await asyncio.to_thread(self.before_agent, state, runtime)

    def before_model(self, state: SleepState[ResponseT], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Before a model call: sleep synchronously only if the call cannot fit the window.

        Also where a resumed run (``agent.invoke(None, config)`` after a crash) revives the agent, since
        ``before_agent`` does not run again then.
        """
        agent = self._agent_id(runtime)
        book = self._book(agent, _thread_id(runtime))
        with book.cond:
            refused, book.refused = book.refused, None
        if refused is not None:
            raise refused
        update = self._enter(agent, book, state)
        state = _merged(state, update)
        engine, codec = self.engine, self._codec
        if engine is None or book.degraded or codec is None or not engine.has_agent(agent):
            return update or None
        assert self.policy is not None and self.scheduler is not None  # bound together with the engine
        messages = _after(state["messages"], state.get("consolidated_through"))
        needed, can_sleep = self._needed_tokens(agent, messages, codec)
        if needed <= self.policy.window:
            return update or None
        if not can_sleep:
            logger.info("agent %r: the next call needs %d tokens; the window is resynced by the call", agent, needed)
            return update or None
        logger.info("agent %r: the next call needs %d of %d tokens; sleeping first", agent, needed, self.policy.window)
        with book.cond:
            book.sync_wanted = True
        try:
            self.scheduler.sleep_now(agent, timeout=self.policy.sleep_timeout_seconds)
        except Exception as e:  # SleepFailed, or anything else: the turn goes on
            if self.on_error == "raise":
                raise
            logger.warning(
                "agent %r: synchronous sleep failed (%s); the call falls back to the newest messages", agent, e
            )
            return update or None
        finally:
            with book.cond:
                book.sync_wanted = False
        return {**update, **self._adopt(state, book)} or None

    async def abefore_model(self, state: SleepState[ResponseT], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Async twin of `before_model`."""
        return await asyncio.to_thread(self.before_model, state, runtime)

    def wrap_model_call(
        self,
        request: ModelRequest[ContextT],
        handler: Callable[[ModelRequest[ContextT]], ModelResponse[ResponseT]],
    ) -> ModelResponse[ResponseT] | ExtendedModelResponse[ResponseT]:
        """Send only the messages since the last sleep, with the agent id bound to the model.

        The first call binds a `SleepMemory()` made without an engine to the agent's model. If the agent is not live
        (a resumed run after a crash), it is revived here. If the messages since the last sleep cannot fit the window
        and ``before_model`` could not sleep them (a fresh process revived a thread whose window was nearly full),
        they are slept here first, oldest first, in window-sized groups (a catch-up); the state learns of those sleeps
        through the returned command.
        """
        prepared, update = self._prepare(request)
        return _with_update(handler(prepared), update)

    async def awrap_model_call(
        self,
        request: ModelRequest[ContextT],
        handler: Callable[[ModelRequest[ContextT]], Awaitable[ModelResponse[ResponseT]]],
    ) -> ModelResponse[ResponseT] | ExtendedModelResponse[ResponseT]:
        """Async twin of `wrap_model_call`."""
        prepared, update = await asyncio.to_thread(self._prepare, request)
        return _with_update(await handler(prepared), update)

    def after_agent(self, state: SleepState[ResponseT], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """End of a turn: let the scheduler sleep in the background if the window is full enough. Never blocks."""
        engine, scheduler = self.engine, self.scheduler
        if engine is None or scheduler is None:
            return None  # no model call bound this memory (e.g. a served model): nothing to schedule
        agent = self._agent_id(runtime)
        book = self._book(agent, _thread_id(runtime))
        adopted: dict[str, Any] = {}
        if not engine.has_agent(agent):  # a run resumed after the model call (``invoke(None, config)``)
            adopted = self._enter(agent, book, state)
            self._resync(agent, book, _merged(state, adopted))
        with book.cond:
            book.in_turn = False
            degraded, book.degraded = book.degraded, False
            book.cond.notify_all()
        if degraded:
            # The throw-away agent must not be slept or saved over the committed one: drop it; the next turn revives.
            self._forget_live(agent)
            scheduler.turn_finished(agent, window_tokens=0)
            return {"last_sleep_status": "degraded"}
        try:
            window = engine.session(agent).window_tokens
        except UnknownAgent:  # resumed after the model call: the next turn revives it
            window = 0
        handle = scheduler.turn_finished(agent, window_tokens=window)
        update: dict[str, Any] = {
            **adopted,
            "tokens_since_sleep": window,
            "sleep_pending": handle.run_id if handle is not None and not handle.done() else None,
        }
        if book.last_status is not None and book.last_status != state.get("last_sleep_status"):
            update["last_sleep_status"] = book.last_status
        return update

    async def aafter_agent(self, state: SleepState[ResponseT], runtime: Runtime[ContextT]) -> dict[str, Any] | None:
        """Async twin of `after_agent`."""
        return self.after_agent(state, runtime)  # lock-only work: safe on the event loop

    def _enter(self, agent: str, book: _Book, state: Mapping[str, Any]) -> dict[str, Any]:
        """Make sure the turn has started for ``agent`` (once per invocation, from whichever hook runs first).

        Holds background sleeps, waits for a running one, revives the agent if the engine does not hold it, and
        returns the state update adopting the newest committed sleep. Nothing until an engine is bound.
        """
        if self.engine is None or self.scheduler is None or self.policy is None:
            return {}
        with book.cond:
            started = book.in_turn
        if not started:
            self.scheduler.notify_turn(agent)
            with book.cond:
                deadline = time.monotonic() + self.policy.sleep_timeout_seconds
                while book.sleeping:  # a sleep that had already started: its result is this turn's memory
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        logger.warning("agent %r: a running sleep outlasted the wait; the turn goes on", agent)
                        break
                    book.cond.wait(remaining)
                book.in_turn = True
                book.sync_wanted = False
                book.degraded = False
                failure, book.unreported_failure = book.unreported_failure, None
            if failure is not None and self.on_error == "raise":
                raise SleepFailed(f"the background sleep of agent {agent!r} failed: {failure.error}")
        if not book.degraded:
            try:
                self._ensure_live(agent, book)
            except Exception as e:  # a revival problem never fails the run (unless on_error="raise")
                if self.on_error == "raise":
                    raise
                self._degrade(agent, book, e)
        return self._adopt(state, book)

    def _resync(self, agent: str, book: _Book, state: Mapping[str, Any]) -> None:
        """Rebuild a just-revived agent's window from the state, as the interrupted turn's model call had left it.

        So the sleep this turn ends with consolidates the same messages as in a run that was never interrupted. Needs
        the system prompt's tokens, which the snapshot carries; without them the next model call resyncs instead.
        """
        engine, codec = self._eng, self._codec
        slot = _window.slot(engine, agent)
        if book.degraded or codec is None or slot.head_ids is None or not engine.has_agent(agent):
            return
        messages = _after(state.get("messages", []), state.get("consolidated_through"))
        if not messages or slot.head_tokens + codec.count(messages) > engine.window:
            return
        try:
            sync_window(engine, codec, agent, messages, head=slot.head_ids)
        except Exception as e:  # the next model call resyncs; nothing is lost
            logger.warning("agent %r: rebuilding the window of a resumed turn failed (%s)", agent, e)

    def _refuse_too_long(
        self, agent: str, book: _Book, state: Mapping[str, Any], update: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Take messages that can never fit the window out of the state; the newest one fails this turn."""
        engine, codec = self.engine, self._codec
        if engine is None or codec is None:
            return {}
        merged = _merged(state, dict(update))
        pending = _after(merged.get("messages", []), merged.get("consolidated_through"))
        removed = {m.id for m in update.get("messages", []) if isinstance(m, RemoveMessage)}
        slot = _window.slot(engine, agent)
        limit = engine.window - slot.head_tokens - len(codec.generation_prefix) - len(codec.end_ids) - 1
        drop: list[str] = []
        for m in pending:
            if m.id is None or m.id in removed:
                continue
            n = len(codec.message_ids(m))
            if n <= limit:
                continue
            drop.append(m.id)
            if m is not pending[-1]:  # left by an earlier run that failed on it: just take it out
                logger.warning("agent %r: removing an earlier message of %d tokens that can never fit", agent, n)
                continue
            error = MessageTooLong(
                f"agent {agent!r}: a {m.type} message of {n} tokens cannot fit the model's window: at most {limit} "
                f"tokens fit beside the system prompt and a reply (L={engine.window}). It was taken out of the "
                "conversation. Split it into several messages that each fit (the model folds earlier ones into its "
                "fast weights by sleeping), or summarise it first",
                tokens=n,
                limit=limit,
                message_id=m.id,
            )
            with book.cond:
                book.refused = error
            logger.warning("%s", error)
        if not drop:
            return {}
        return {"messages": [*update.get("messages", []), *(RemoveMessage(id=i) for i in drop)]}

    # ------------------------------------------------------------------ the sleep job (scheduler threads)

    def sleep_job(self, request: SleepRequest) -> SleepOutcome:
        """The `SleepJob` the scheduler runs: sleep the agent's window into S, snapshot it, record what it covered.

        Skips (returns a ``skipped`` outcome) when a turn is running (``after_agent`` reschedules), when the agent
        is not live, or when the window does not hold whole, known messages (the next model call resyncs it).
        Raises — and the agent keeps its last good state — when the engine or the store fails, or when a turn started
        while the sleep computed.
        """
        agent = request.agent_id
        book = self._book(agent)
        with book.cond:
            if book.in_turn and not book.sync_wanted:
                return SleepOutcome(detail={"skipped": "a turn is running; after_agent reschedules"})
            book.sleeping = True
        try:
            return self._sleep(agent, book, request)
        finally:
            with book.cond:
                book.sleeping = False
                book.cond.notify_all()

    def _sleep(self, agent: str, book: _Book, request: SleepRequest) -> SleepOutcome:
        engine = self._eng
        if book.degraded or not engine.has_agent(agent):
            return SleepOutcome(detail={"skipped": "the agent is not live"})
        slot = _window.slot(engine, agent)
        with slot.lock:  # no chat-model call on this agent while it sleeps
            ledger = slot.ledger
            window = engine.session(agent).window_tokens
            if window == 0:
                return SleepOutcome(tokens=0, detail={"skipped": "empty"})
            if ledger is None or ledger.window_tokens != window or ledger.through is None:
                logger.info("agent %r: window of %d tokens holds no known messages; not slept", agent, window)
                return SleepOutcome(detail={"skipped": "the window does not hold whole, known messages"})
            through = ledger.through
            head_ids = list(engine.session(agent).window[: ledger.head_tokens])  # the system prompt's tokens
            store = self.store if request.snapshot else None

            def persist(commit: SleepCommit) -> str | None:
                if commit.tokens != ledger.window_tokens:
                    raise SleepFailed(
                        f"agent {agent!r}: the sleep covered {commit.tokens} tokens but the messages fill "
                        f"{ledger.window_tokens}; not committed"
                    )
                with book.cond:
                    if book.in_turn and not book.sync_wanted:
                        raise SleepFailed(f"agent {agent!r}: a turn started while it slept; retried after the turn")
                if store is None:
                    return None
                return save_memory(
                    store,
                    agent,
                    commit.memory,
                    reason="sleep",
                    passes=commit.passes,
                    thread_id=book.thread_id,
                    metadata={
                        "consolidated_through": through,
                        "head_ids": head_ids,
                        "run_id": request.run_id,
                        "reason": request.reason,
                    },
                    expect_current=expect,
                ).id

            try:
                expect = self._expect_current(agent) if store is not None else None
                result = engine.sleep(agent, request.passes, persist=persist)
            except SnapshotConflict as e:
                # Another process moved this agent on (or this copy never revived it): never overwrite that. Drop the
                # stale copy; the next turn revives the agent's current snapshot.
                logger.error("agent %r: %s; its live copy here is stale and is dropped", agent, e)
                self._forget_live(agent)
                return SleepOutcome(detail={"skipped": "conflict", "error": str(e)})
            if result.skipped is not None:
                return SleepOutcome(detail={"skipped": result.skipped})
            slot.ledger = _window.EMPTY if result.carried == 0 else None
            sleep_count = engine.session(agent).sleep_count
        with book.cond:
            book.committed = _Commit(result.snapshot_id, through, sleep_count)
        logger.info(
            "agent %r slept %d tokens through message %s (N=%d) -> snapshot %s",
            agent,
            result.tokens,
            through,
            result.passes,
            result.snapshot_id,
        )
        return SleepOutcome(
            snapshot_id=result.snapshot_id,
            passes=result.passes,
            tokens=result.tokens,
            detail={"consolidated_through": through, "seconds": result.seconds},
        )

    def _on_record(self, record: SleepRecord) -> None:
        book = self._book(record.agent_id)
        with book.cond:
            book.last_status = record.status
            if record.status == "failed":
                book.unreported_failure = record

    # ------------------------------------------------------------------ internals

    def _agent_id(self, runtime: Runtime[Any] | None) -> str:
        if self.agent_id:
            return self.agent_id
        if self.agent_key is not None and runtime is not None:
            key = self.agent_key(runtime)
            if key:
                return str(key)
        context = getattr(runtime, "context", None)
        key = context.get("agent_id") if isinstance(context, Mapping) else getattr(context, "agent_id", None)
        if key:
            return str(key)
        thread = _thread_id(runtime)
        if thread:
            return thread
        raise MissingAgentKey(
            "SleepMemory cannot tell which agent this run belongs to: run the agent with a checkpointer and "
            "config={'configurable': {'thread_id': ...}}, or pass SleepMemory(agent_id=...) or agent_key=..., or "
            "put 'agent_id' into the runtime context"
        )

    def _book(self, agent_id: str, thread_id: str | None = None) -> _Book:
        with self._books_lock:
            book = self._books.get(agent_id)
            if book is None:
                book = self._books[agent_id] = _Book(agent_id)
            if thread_id is not None:
                book.thread_id = thread_id
            return book

    def _require_store(self) -> SnapshotStore:
        if self.store is None:
            raise ConfigError("this SleepMemory has no snapshot store; pass store=SnapshotStore(...) or a URL")
        return self.store

    def _expect_current(self, agent: str) -> str | None:
        """The snapshot a save of ``agent`` must find current (compare-and-set): the one its live copy came from.

        A live copy that came from no snapshot (a new agent) may only save while the store has none for it either,
        so a copy that started from zero fast weights can never be saved over an agent's existing chain.

        Raises:
            SnapshotConflict: the live copy has no snapshot but the store has one.
        """
        store = self._require_store()
        sid = self._eng.session(agent).snapshot_id
        if sid is not None:
            return sid
        try:
            current = store.agent(agent).current_snapshot_id
        except UnknownAgent:
            return None
        if current is not None:
            raise SnapshotConflict(
                f"agent {agent!r} has snapshot {current!r} in the store, but the copy live here started from zero "
                "fast weights (it was never revived); nothing was saved"
            )
        return None

    def _ensure_live(self, agent: str, book: _Book) -> None:
        """The agent is live in the engine: already, revived from the store, or new."""
        if self._eng.has_agent(agent):
            return
        if self.store is None:
            self._eng.create_agent(agent)
            return
        last: Exception | None = None
        for attempt in range(_REVIVE_ATTEMPTS):
            try:
                loaded = self.store.latest(agent, fingerprint=self._eng.fingerprint, fallback=True)
            except (UnknownAgent, UnknownSnapshot):
                self._eng.create_agent(agent)
                return
            except SnapshotMismatch:
                raise
            except Exception as e:  # the store is unavailable: try again shortly
                last = e
                logger.warning("agent %r: reviving from the store failed (attempt %d): %s", agent, attempt + 1, e)
                time.sleep(_REVIVE_BACKOFF_SECONDS * 2**attempt)
                continue
            self._install(agent, book, loaded)
            return
        raise StoreError(f"cannot revive agent {agent!r}: the snapshot store failed {_REVIVE_ATTEMPTS} times") from last

    def _install(self, agent: str, book: _Book, loaded: Any) -> AgentSession:
        """Make a loaded snapshot the agent's memory and remember what its window holds."""
        session = self._eng.import_state(agent, memory_from_snapshot(loaded), snapshot_id=loaded.record.id)
        meta = loaded.record.meta
        slot = _window.slot(self._eng, agent)
        ids = meta.get("window_message_ids")
        if not loaded.window:
            slot.ledger = _window.EMPTY
        elif isinstance(ids, list) and ids:
            slot.ledger = _window.WindowLedger(tuple(ids), len(loaded.window), int(meta.get("window_head_tokens", 0)))
        else:
            slot.ledger = None
        head = meta.get("head_ids")
        if isinstance(head, list) and all(isinstance(t, int) for t in head):
            slot.head_ids, slot.head_tokens = tuple(head), len(head)
        elif loaded.window and "window_head_tokens" in meta:
            n = int(meta["window_head_tokens"])
            slot.head_ids, slot.head_tokens = tuple(int(t) for t in loaded.window[:n]), n
        with book.cond:
            book.committed = _Commit(loaded.record.id, meta.get("consolidated_through"), session.sleep_count)
        logger.info("agent %r revived from snapshot %s (seq %d)", agent, loaded.record.id, loaded.record.seq)
        return session

    def _degrade(self, agent: str, book: _Book, error: Exception) -> None:
        logger.error(
            "agent %r: %s; this turn runs on a throw-away agent (zero fast weights + the messages since the last "
            "sleep), and the next turn tries to revive it again",
            agent,
            error,
        )
        with book.cond:
            book.degraded = True
            book.last_status = "degraded"
        if not self._eng.has_agent(agent):
            self._eng.create_agent(agent)

    def _forget_live(self, agent: str) -> None:
        """Drop the live agent (not its book or snapshots)."""
        if self._eng.has_agent(agent):
            try:
                self._eng.remove_agent(agent)
            except UnknownAgent:
                pass
        _window.forget(self._eng, agent)

    def _adopt(self, state: Mapping[str, Any], book: _Book) -> dict[str, Any]:
        """State update for the newest committed sleep, if the graph state has not seen it yet."""
        with book.cond:
            c = book.committed
        if c is None:
            return {}
        if (
            state.get("sleep_count") == c.sleep_count
            and state.get("consolidated_through") == c.through
            and state.get("snapshot_id") == c.snapshot_id
        ):
            return {}
        update: dict[str, Any] = {
            "snapshot_id": c.snapshot_id,
            "consolidated_through": c.through,
            "sleep_count": c.sleep_count,
            "sleep_pending": None,
            "last_sleep_status": "completed",
        }
        if self.prune_consolidated and c.through is not None:
            messages: Sequence[BaseMessage] = state.get("messages", [])
            ids = [m.id for m in messages]
            if c.through in ids:
                cut = ids.index(c.through) + 1
                update["messages"] = [RemoveMessage(id=i) for i in ids[:cut] if i]
        return update

    def _needed_tokens(self, agent: str, messages: Sequence[BaseMessage], codec: ChatCodec) -> tuple[int, bool]:
        """(window tokens the next call needs, whether sleeping the current window makes room)."""
        slot = _window.slot(self._eng, agent)
        ledger = slot.ledger
        window = self._eng.session(agent).window_tokens
        tail = len(codec.generation_prefix) + len(codec.end_ids) + self._reserve()
        ids = [m.id for m in messages]
        n = len(ledger.message_ids) if ledger is not None else 0
        if ledger is not None and ledger.window_tokens == window and tuple(ids[:n]) == ledger.message_ids:
            fresh = codec.count(messages[n:])
            if window == 0:
                return slot.head_tokens + fresh + tail, False
            return window + fresh + tail, True
        return slot.head_tokens + codec.count(messages) + tail, False

    def _reserve(self) -> int:
        if self.reserve_tokens is not None:
            return self.reserve_tokens
        if self.model is not None:
            return self.model.max_tokens
        return _DEFAULT_RESERVE_TOKENS

    def _prepare(self, request: ModelRequest[ContextT]) -> tuple[ModelRequest[ContextT], dict[str, Any] | None]:
        """The request the model gets, and a state update (a revival or catch-up sleeps to adopt), if any.

        The model gets the messages after ``consolidated_through``, with the agent id bound.

        Raises:
            ConfigError: the model cannot sleep (and ``other_models="raise"``), or runs on another engine.
            MessageTooLong: a message cannot fit the window even alone.
        """
        model = request.model
        if _is_served(model):
            # The server keeps the agent's memory (S + window) and sleeps it; only the agent id is ours to send.
            agent = self._agent_id(request.runtime)
            return request.override(model_settings={**request.model_settings, "agent_id": agent}), None
        if not isinstance(model, ChatSleepHybrid) or (self.engine is not None and model.engine is not self.engine):
            if self.other_models == "passthrough":
                return request, None
            raise ConfigError(_other_model_message(model, self.engine))
        self._bind(model.engine, model)
        agent = self._agent_id(request.runtime)
        book = self._book(agent, _thread_id(request.runtime))
        update: dict[str, Any] = self._enter(agent, book, request.state)
        state = _merged(request.state, update)
        codec = model.codec
        tools = _schemas(request.tools) if codec.supports_tools else None  # the head shows them (bind_tools)
        system = [request.system_message] if request.system_message is not None else []
        _window.slot(model.engine, agent).head_tokens = len(codec.head_ids(request.system_message, tools))
        messages = _after(request.messages, state.get("consolidated_through"))
        check_message_lengths(codec, model.window, [*system, *messages], tools)
        caught_up = self._catch_up(agent, request, state, messages, model, tools)
        if caught_up:
            update = {**update, **caught_up}
            messages = _after(request.messages, caught_up["consolidated_through"])
        messages = self._fit(agent, request.system_message, messages, model, tools)
        snapshot_id = _merged(request.state, update).get("snapshot_id")
        settings = {**request.model_settings, "agent_id": agent, "snapshot_id": snapshot_id}
        return request.override(messages=messages, model_settings=settings), update or None

    def _catch_up(
        self,
        agent: str,
        request: ModelRequest[ContextT],
        state: Mapping[str, Any],
        messages: list[AnyMessage],
        model: ChatSleepHybrid,
        tools: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Sleep the oldest messages in window-sized groups until the rest fits with room for the reply."""
        book = self._book(agent)
        if book.degraded or not self._eng.has_agent(agent):
            return None
        codec = model.codec
        system = [request.system_message] if request.system_message is not None else []
        head = len(codec.head_ids(request.system_message, tools))
        tail = len(codec.generation_prefix) + len(codec.end_ids) + self._reserve()
        sizes = [len(p) for p in codec.render(messages)]
        start, slept = 0, False
        while head + sum(sizes[start:]) + tail > self._policy.window and start < len(messages) - 1:
            k, used = 0, head
            while start + k < len(messages) - 1 and used + sizes[start + k] <= self._policy.window:
                used += sizes[start + k]
                k += 1
            if k == 0 or messages[start + k - 1].id is None:
                break  # one message alone does not fit: nothing to sleep; the lossy fallback decides
            group = messages[start : start + k]
            logger.info("agent %r: catching up, sleeping %d messages that cannot fit beside the rest", agent, k)
            try:
                sync_window(self._eng, codec, agent, [*system, *group], tools=tools)
                with book.cond:
                    book.sync_wanted = True
                try:
                    self._sched.sleep_now(agent, timeout=self._policy.sleep_timeout_seconds)
                finally:
                    with book.cond:
                        book.sync_wanted = False
            except Exception as e:  # the lossy fallback takes over; the turn goes on
                if self.on_error == "raise":
                    raise
                logger.warning("agent %r: catch-up sleep failed (%s)", agent, e)
                break
            with book.cond:
                committed = book.committed
            if committed is None or committed.through != group[-1].id:
                break
            start += k
            slept = True
        if not slept:
            return None
        return self._adopt(state, book) or None

    def _fit(
        self,
        agent: str,
        system: BaseMessage | None,
        messages: list[AnyMessage],
        model: ChatSleepHybrid,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[AnyMessage]:
        """Drop the oldest messages if the call cannot fit the window even after (a failed) sleep: degraded, logged."""
        codec = model.codec
        head = len(codec.head_ids(system, tools))
        fixed = head + len(codec.generation_prefix) + len(codec.end_ids) + 1  # at least one reply token
        sizes = [len(p) for p in codec.render(messages)]
        total = fixed + sum(sizes)
        start = 0
        while total > self._eng.window and start < len(messages) - 1:
            total -= sizes[start]
            start += 1
        if start:
            logger.warning(
                "agent %r: the messages since the last sleep do not fit the window (the sleep that would have made "
                "room failed); sending the newest %d of %d",
                agent,
                len(messages) - start,
                len(messages),
            )
        return messages[start:]


def _merged(state: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` as it will be after ``update`` (private fields replaced, removed messages gone)."""
    out = {**state, **{k: v for k, v in update.items() if k != "messages"}}
    removed = {m.id for m in update.get("messages", []) if isinstance(m, RemoveMessage)}
    if removed:
        out["messages"] = [m for m in state.get("messages", []) if m.id not in removed]
    return out


def _is_served(model: Any) -> bool:
    """A chat model whose server keeps the agent's memory (`ChatSleepServer`): SleepMemory only names the agent."""
    return bool(getattr(model, "agentsleep_served", False))


def _other_model_message(model: Any, engine: Engine | None) -> str:
    if isinstance(model, ChatSleepHybrid):
        return (
            f"SleepMemory is bound to engine {engine!r}, but this call's ChatSleepHybrid runs on another engine "
            f"({model.engine!r}); use one SleepMemory per engine, or SleepMemory(other_models='passthrough') to let "
            "calls to other models through without memory"
        )
    return (
        f"the agent's model is {type(model).__name__}, which cannot sleep: SleepMemory needs a ChatSleepHybrid (or a "
        "ChatSleepServer for `agentsleep serve`). Pass SleepMemory(other_models='passthrough') to let calls to other "
        "models through without memory (e.g. a fallback model)"
    )


def _with_update(
    response: ModelResponse[ResponseT], update: dict[str, Any] | None
) -> ModelResponse[ResponseT] | ExtendedModelResponse[ResponseT]:
    if not update:
        return response
    return ExtendedModelResponse(model_response=response, command=Command(update=update))


def _thread_id(runtime: Runtime[Any] | None) -> str | None:
    info = getattr(runtime, "execution_info", None)
    thread = getattr(info, "thread_id", None)
    return str(thread) if thread else None


def _after(messages: Sequence[AnyMessage], through: str | None) -> list[AnyMessage]:
    """The messages after ``through`` (all of them if it is None or already pruned)."""
    if through is None:
        return list(messages)
    for i, m in enumerate(messages):
        if m.id == through:
            return list(messages[i + 1 :])
    return list(messages)


def _engine_codec(engine: Engine) -> ChatCodec | None:
    """The engine's chat codec if its tokenizer can be found (else learned from the chat model at its first call)."""
    try:
        tok = _find_tokenizer(engine, None)
    except ConfigError:
        return None
    return make_codec(engine, tok)


__all__ = ["OnError", "SleepMemory", "SleepState"]
