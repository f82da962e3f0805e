"""What every engine shares: the book of live agents, their locks, and the bookkeeping of a sleep's commit.

An engine keeps each live agent in a record (`LiveAgent`): the tokens of its current window, the generated token
waiting for the next window, its life counters and snapshot id, and the lock that serialises calls on it. `EngineBase`
is the part of the `Engine` protocol that never runs the model: creating, listing, removing and importing agents,
sessions, export and checkpoint, the checks of a batch, and committing a sleep (persist, then swap the new window in).
A backend adds what is its own (`TorchEngine`: a `WindowCache` per agent and `SleepHybrid.extend` / `sleep_window`;
`VLLMEngine`: the state the window started from, vLLM requests and the connector) by subclassing the record
(`LiveAgent.start_state`, `LiveAgent.take_window`) and the engine (`_open`, `_restore`, `_stream`).

Concurrency, the same in every engine: a record's fields are read and written with its ``lock`` held; ``epoch`` is
bumped whenever the window is replaced (a sleep's commit, an import, a removal), so a sleep computed off the lock can
tell that its window went stale; a batch takes its agents' locks in one global order (sorted ids), so batches cannot
deadlock. `_wait_commit` is where an engine that persists a requested sleep *outside* the agent's lock
(`TorchEngine`) makes whatever would replace the window wait for that sleep; here it waits for nothing, which is right
for an engine that persists with the agent locked (`VLLMEngine`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import torch
from torch import Tensor

from agentsleep.errors import InvalidInput, UnknownAgent, WindowOverflow
from agentsleep.ids import check_agent_id
from agentsleep.model.adaptive import Passes, check_passes
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.model.state import FastWeights
from agentsleep.runtime.engine import (
    AgentMemory,
    AgentSession,
    GenerateRequest,
    Generation,
    PersistMemory,
    PersistSleep,
    SamplingParams,
    SleepCommit,
    SleepTrigger,
    check_token_ids,
)
from agentsleep.runtime.text import TextCodec

if TYPE_CHECKING:
    from agentsleep.store import SnapshotStore

logger = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class LiveAgent:
    """One live agent's books. Every field is read and written with ``lock`` held.

    A backend subclasses it with its own view of the window and says where the window's start state lives
    (`start_state`) and how a new window replaces the current one (`take_window`).
    """

    agent_id: str
    window: list[int] = field(default_factory=list)  # tokens of the current window (≤ L)
    pending: list[int] = field(default_factory=list)  # taken in, not yet run (the last generated token)
    sleep_count: int = 0
    tokens_consolidated: int = 0
    tokens_seen: int = 0
    snapshot_id: str | None = None
    epoch: int = 0  # bumped whenever the window is replaced (sleep commit, import, removal)
    removed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start_state(self) -> FastWeights:
        """The state the current window started from (not a copy)."""
        raise NotImplementedError

    def take_window(self, other: Self) -> None:
        """Make ``other``'s window (its tokens and the backend's view of them) this agent's; the counters stay."""
        raise NotImplementedError


LiveT = TypeVar("LiveT", bound=LiveAgent)


@dataclass(eq=False, kw_only=True)
class Stream(Generic[LiveT]):
    """One request of `generate` / `generate_batch`, read and written with its agent's lock held."""

    live: LiveT
    prompt: list[int]
    sampling: SamplingParams
    new: list[int] = field(default_factory=list)
    step_logits: list[Tensor] = field(default_factory=list)
    prompt_logits: list[Tensor] | None = None  # pieces of the prompt's logits; None where the backend gives none
    sleeps: int = 0  # window-full sleeps the call waited for
    done: bool = False

    def result(self, keep: bool) -> Generation:
        """What `generate` returns for this stream (logits, on the CPU, only if ``keep``)."""
        stop = bool(self.new) and self.new[-1] in self.sampling.stop_tokens
        return Generation(
            agent_id=self.live.agent_id,
            tokens=tuple(self.new),
            stop_reason="stop" if stop else "length",
            prompt_tokens=len(self.prompt),
            sleeps=self.sleeps,
            window_tokens=len(self.live.window) + len(self.live.pending),
            logits=torch.stack(self.step_logits).cpu() if keep and self.step_logits else None,
            prompt_logits=torch.cat(self.prompt_logits).cpu() if keep and self.prompt_logits is not None else None,
        )


StreamT = TypeVar("StreamT", bound="Stream[Any]")


class EngineBase(Generic[LiveT, StreamT]):
    """The backend-independent half of an `Engine`: live agents and their books (see the module docstring).

    A subclass supplies `_open` (a window opened on a state), `_restore` (the same for a state handed in from
    outside), `_stream` (a generation request), and the model calls: `observe`, `generate`, `sleep`, ...
    """

    def __init__(self, model: SleepHybrid, passes: Passes | None) -> None:
        self.model = model
        self._passes = self._check_passes(passes, model.config.passes)
        self._agents: dict[str, LiveT] = {}
        self._registry = threading.Lock()

    # ------------------------------------------------------------------ facts

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def window(self) -> int:
        return self.model.config.window

    @property
    def passes(self) -> Passes:
        """The default sleep depth: N, or `AutoPasses` (stop once S has converged)."""
        return self._passes

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    # ------------------------------------------------------------------ text

    codec: TextCodec | None = None  # set by a subclass that has the checkpoint's tokenizer

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of a turn's text (see `TextCodec.encode` for what is rejected)."""
        if self.codec is None:
            raise InvalidInput("this engine has no tokenizer (no tokenizer.json in the checkpoint): pass token ids")
        return check_token_ids(self.codec.encode(text), self.vocab_size, what="encoded text")

    def decode(self, ids: Sequence[int]) -> str:
        if self.codec is None:
            raise InvalidInput("this engine has no tokenizer (no tokenizer.json in the checkpoint): it cannot decode")
        return self.codec.decode(ids)

    # ------------------------------------------------------------------ agents

    def create_agent(self, agent_id: str) -> AgentSession:
        """A new agent with zero fast weights and an empty window (S is zero once per agent, paper §3.1).

        Raises:
            InvalidInput: the id is taken (use `import_state` to replace an agent's memory).
        """
        check_agent_id(agent_id)
        live = self._build(agent_id, AgentMemory(self.model.init_state(1)), snapshot_id=None)
        with self._registry:
            if agent_id in self._agents:
                raise InvalidInput(f"agent {agent_id!r} already exists; use import_state to replace its memory")
            self._agents[agent_id] = live
        return self._session(live)

    def has_agent(self, agent_id: str) -> bool:
        return agent_id in self._agents

    def agent_ids(self) -> list[str]:
        with self._registry:
            return sorted(self._agents)

    def remove_agent(self, agent_id: str) -> None:
        """Forget a live agent (its snapshots stay in any store). A sleep of it still computing is dropped."""
        with self._registry:
            live = self._agents.pop(agent_id, None)
        if live is None:
            raise UnknownAgent(f"no live agent {agent_id!r} in this engine")
        with live.lock:
            self._wait_commit(live)
            live.removed = True
            live.epoch += 1

    def session(self, agent_id: str) -> AgentSession:
        live = self._live(agent_id)
        with live.lock:
            self._check_alive(live)
            return self._session(live)

    # ------------------------------------------------------------------ memory in and out

    def export_state(self, agent_id: str) -> AgentMemory:
        """The agent's memory now: the state its window started from (a copy) and the window's tokens."""
        live = self._live(agent_id)
        with live.lock:
            self._check_alive(live)
            return self._memory(live)

    def checkpoint(self, agent_id: str, persist: PersistMemory) -> str | None:
        """Call ``persist`` with the agent's current memory (agent locked, so nothing changes in between) and record
        the snapshot id it returns as the agent's current one."""
        live = self._live(agent_id)
        with live.lock:
            self._wait_commit(live)  # a sleep's snapshot is on its way: this one must come after it
            self._check_alive(live)
            sid = persist(self._memory(live))
            if sid is not None:
                live.snapshot_id = sid
            return sid

    def import_state(self, agent_id: str, memory: AgentMemory, *, snapshot_id: str | None = None) -> AgentSession:
        """Make ``memory`` the agent's memory (creating the agent if needed): a window opened on ``memory.state``
        holding ``memory.window``. A sleep of the agent still computing is dropped.

        Raises:
            SnapshotMismatch: the state belongs to another model or does not fit it.
            WindowOverflow: the window holds more than L tokens (+ one waiting token).
            InvalidInput: bad agent id, not an `AgentMemory`, bad token ids.
        """
        check_agent_id(agent_id)
        fresh = self._build(agent_id, memory, snapshot_id=snapshot_id)
        while True:
            live = self._agents.get(agent_id)
            if live is None:
                with self._registry:
                    if agent_id not in self._agents:
                        self._agents[agent_id] = fresh
                        return self._session(fresh)
                continue  # someone created it meanwhile: replace that one in place
            with live.lock:
                self._wait_commit(live)
                if live.removed:
                    continue  # removed meanwhile: insert ours
                live.take_window(fresh)
                live.sleep_count, live.tokens_consolidated = fresh.sleep_count, fresh.tokens_consolidated
                live.tokens_seen, live.snapshot_id = fresh.tokens_seen, fresh.snapshot_id
                live.epoch += 1
                return self._session(live)

    def revive(self, agent_id: str, store: SnapshotStore, snapshot_id: str | None = None) -> AgentSession:
        """Load the agent from ``store`` (its latest snapshot, or ``snapshot_id``) into this engine."""
        from agentsleep.runtime.revive import revive

        return revive(self, store, agent_id, snapshot_id)  # type: ignore[arg-type]  # a subclass is an Engine

    # ------------------------------------------------------------------ backend hooks

    def _open(self, agent_id: str, state: FastWeights, tail: list[int]) -> LiveT:
        """A record holding a new window opened on ``state`` with ``tail`` in it (its first L tokens; a token past L
        waits); its counters are the caller's to set."""
        raise NotImplementedError

    def _restore(self, agent_id: str, state: FastWeights, tail: list[int]) -> LiveT:
        """`_open` for a state handed in from outside (the engine makes it its own)."""
        raise NotImplementedError

    def _stream(self, request: GenerateRequest, prompt: list[int]) -> StreamT:
        """The stream of one checked `generate_batch` request (looks its agent up)."""
        raise NotImplementedError

    def _wait_commit(self, live: LiveT) -> None:
        """Wait until no requested sleep of this agent is persisting (called with the agent locked). Nothing to wait
        for here: see the module docstring."""

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_passes(passes: Passes | None, default: Passes) -> Passes:
        """N (an int >= 1) or `AutoPasses` (adaptive depth); None: the engine's default."""
        return check_passes(default if passes is None else passes)

    def _live(self, agent_id: str) -> LiveT:
        live = self._agents.get(agent_id)
        if live is None:
            raise UnknownAgent(
                f"no live agent {agent_id!r} in this engine; create_agent() it, or revive it from a snapshot store"
            )
        return live

    @staticmethod
    def _check_alive(live: LiveAgent) -> None:
        if live.removed:
            raise UnknownAgent(f"agent {live.agent_id!r} was removed from this engine")

    @staticmethod
    def _session(live: LiveAgent) -> AgentSession:
        return AgentSession(
            agent_id=live.agent_id,
            window=tuple(live.window + live.pending),
            sleep_count=live.sleep_count,
            snapshot_id=live.snapshot_id,
            tokens_consolidated=live.tokens_consolidated,
            tokens_seen=live.tokens_seen,
        )

    @staticmethod
    def _memory(live: LiveAgent) -> AgentMemory:
        return AgentMemory(
            state=live.start_state().clone(),
            window=tuple(live.window + live.pending),
            tokens_consolidated=live.tokens_consolidated,
            sleep_count=live.sleep_count,
            tokens_seen=live.tokens_seen,
        )

    def _build(self, agent_id: str, memory: AgentMemory, snapshot_id: str | None) -> LiveT:
        """A live agent from a memory: check it, then open a window on its state with its tokens in it."""
        if not isinstance(memory, AgentMemory):
            raise InvalidInput(f"memory must be an AgentMemory, got {type(memory).__name__}")
        state = self.model.adopt_state(memory.state, batch=1)  # a legacy-tagged state is re-tagged as current
        window = check_token_ids(memory.window, self.vocab_size, what="memory.window", allow_empty=True)
        L = self.window
        if len(window) > L + 1:
            raise WindowOverflow(
                f"memory.window holds {len(window)} tokens but a window holds L={L} (+1 waiting): it is not a "
                "memory of this model's windows"
            )
        live = self._restore(agent_id, state, window)
        live.sleep_count = memory.sleep_count
        live.tokens_consolidated = memory.tokens_consolidated
        live.tokens_seen = max(memory.tokens_seen, memory.tokens_consolidated + len(window))
        live.snapshot_id = snapshot_id
        return live

    @staticmethod
    def _after_sleep(live: LiveAgent, new_state: FastWeights, n: int, tail: list[int]) -> AgentMemory:
        """The agent's memory once a sleep of its first ``n`` window tokens commits, ``tail`` carried over."""
        return AgentMemory(
            state=new_state,
            window=tuple(tail),
            tokens_consolidated=live.tokens_consolidated + n,
            sleep_count=live.sleep_count + 1,
            tokens_seen=live.tokens_seen,
        )

    @staticmethod
    def _swap_in(live: LiveAgent, nxt: LiveAgent, n: int, sid: str | None) -> None:
        """Commit a sleep of ``n`` window tokens: ``nxt``'s window replaces the agent's (plain assignments)."""
        live.take_window(nxt)
        live.epoch += 1
        live.sleep_count += 1
        live.tokens_consolidated += n
        if sid is not None:
            live.snapshot_id = sid

    def _commit(
        self,
        live: LiveT,
        new_state: FastWeights,
        n: int,
        tail: list[int],
        passes: int,  # passes the sleep used
        trigger: SleepTrigger,
        persist: PersistSleep | None,
        *,
        tolerate: bool,
    ) -> str | None:
        """Open the next window on ``new_state`` with ``tail`` carried into it, persist, then swap it in (agent
        locked). Anything raised before the swap leaves the agent as it was, except that with ``tolerate`` a failing
        ``persist`` is logged and the sleep stands (a window-full sleep: the call cannot go on otherwise)."""
        nxt = self._open(live.agent_id, new_state, tail)
        sid = None
        if persist is not None:
            commit = SleepCommit(
                agent_id=live.agent_id,
                memory=self._after_sleep(live, new_state, n, tail),
                passes=passes,
                tokens=n,
                trigger=trigger,
            )
            try:
                sid = persist(commit)
            except Exception:
                if not tolerate:
                    raise
                logger.warning(
                    "agent %r: persisting its window-full sleep failed; the sleep stands, the store lags until the "
                    "next snapshot",
                    live.agent_id,
                    exc_info=True,
                )
        self._swap_in(live, nxt, n, sid)
        return sid

    def _streams(self, requests: Sequence[GenerateRequest], passes: Passes | None) -> tuple[Passes, list[StreamT]]:
        """Check a non-empty `generate_batch` call and open its streams: (N, one stream per request)."""
        ids_seen = [r.agent_id for r in requests]
        if len(set(ids_seen)) != len(ids_seen):
            raise InvalidInput("generate_batch: each agent may appear only once per batch")
        N = self._check_passes(passes, self._passes)
        streams = []
        for r in requests:
            check_token_ids(list(r.sampling.stop_tokens), self.vocab_size, what="stop_tokens", allow_empty=True)
            prompt = check_token_ids(r.prompt, self.vocab_size, what=f"prompt of {r.agent_id!r}")
            streams.append(self._stream(r, prompt))
        return N, streams

    @contextlib.contextmanager
    def _locked(self, streams: list[StreamT]) -> Iterator[None]:
        """Hold every stream's agent lock, taken in one global order (no deadlock), each agent checked alive."""
        with contextlib.ExitStack() as locks:
            for s in sorted(streams, key=lambda s: s.live.agent_id):
                locks.enter_context(s.live.lock)
                self._check_alive(s.live)
            yield


__all__ = ["EngineBase", "LiveAgent", "Stream", "check_agent_id"]
