"""`TorchEngine`: the embedded, in-process engine — the reference every other engine is tested against.

Each live agent owns a `WindowCache` (the state its window started from, the window's K/V and pass-1 features) and a
lock. `observe` and `generate` run one pass per token through `SleepHybrid.extend`; when the window is full and more
tokens must go in, the call sleeps first (paper.md §5: "sleep whenever the window is full") and goes on in a new
window. That is the only sleep on the response path; the host (`agentsleep.memory.host`) schedules the others in the
background between turns through `sleep`.

A requested `sleep` never holds the agent while it works, so the agent keeps serving turns meanwhile: it freezes a
copy of the window, runs passes 2..N over its cached pass-1 features, builds the next window, calls ``persist`` (the
snapshot), and only then, locked for a moment, swaps the new memory in. A failure anywhere leaves the agent exactly as
it was. Tokens that arrived in the meantime are carried into the new window (replayed through pass 1). While a sleep
is being persisted nothing else may replace the window (an import, a window-full sleep, a checkpoint waits for it),
so the store never receives snapshots out of order; if the window was replaced while the sleep computed, its stale
result is dropped.

The last token `generate` emits joins the window but runs through the model only with the agent's next input: its
logits would predict the *next* turn, so computing them at once would put a pass on the response path for nothing.

The agents' books (registry, locks, sessions, import / export, the commit of a sleep) are `agentsleep.runtime.base`,
shared with `VLLMEngine`; this module holds what is the torch backend's own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
from torch import Tensor

from agentsleep.errors import InvalidInput, SleepFailed
from agentsleep.model.adaptive import Passes, nominal_passes, sleep_cache
from agentsleep.model.hybrid import SleepHybrid, WindowCache
from agentsleep.model.state import FastWeights
from agentsleep.runtime.base import EngineBase, LiveAgent, Stream, check_agent_id
from agentsleep.runtime.caches import batch_key, copy_cache, split_cache, stack_caches
from agentsleep.runtime.engine import (
    GenerateRequest,
    Generation,
    ObserveResult,
    PersistSleep,
    SamplingParams,
    SleepCommit,
    SleepResult,
    TokenIds,
    check_token_ids,
)
from agentsleep.runtime.sampling import sample_next
from agentsleep.runtime.text import TOKENIZER_FILE, TextCodec

logger = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class _Live(LiveAgent):
    """One live agent: ``window`` holds the real tokens already run through pass 1 (≤ L), ``cache`` their K/V and
    pass-1 features on the state the window started from. Every field is read and written with ``lock`` held."""

    cache: WindowCache
    committing: bool = False  # a requested sleep is persisting its result; the window may only grow meanwhile
    cond: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    def start_state(self) -> FastWeights:
        return self.cache.state

    def take_window(self, other: _Live) -> None:
        self.cache, self.window, self.pending = other.cache, other.window, other.pending


@dataclass(eq=False, kw_only=True)
class _Stream(Stream[_Live]):
    """One request of `generate` / `generate_batch`; ``last``: the logits the next token is drawn from."""

    generator: torch.Generator | None
    last: Tensor | None = None


class TorchEngine(EngineBase[_Live, _Stream]):
    """Many agents on one in-process `SleepHybrid`.

    Args:
        model: the hybrid (put into eval mode; its weights are never changed).
        passes: default N for sleeps (default ``model.config.passes``).
        tokenizer: a `TextCodec`, a `tokenizers.Tokenizer`, or a path to ``tokenizer.json`` / a checkpoint directory;
            only needed for `encode` / `decode`.

    Thread safety: one lock per agent; any number of threads may drive different agents at once. The engine never
    changes torch's thread settings.
    """

    def __init__(
        self,
        model: SleepHybrid,
        *,
        passes: Passes | None = None,
        tokenizer: TextCodec | tokenizers.Tokenizer | str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(model, SleepHybrid):
            raise InvalidInput(f"TorchEngine needs a SleepHybrid, got {type(model).__name__}")
        super().__init__(model.eval(), passes)
        if tokenizer is None or isinstance(tokenizer, TextCodec):
            self.codec = tokenizer
        elif isinstance(tokenizer, tokenizers.Tokenizer):
            self.codec = TextCodec(tokenizer)
        else:
            self.codec = TextCodec.from_file(tokenizer)
        if self.codec is not None and self.codec.vocab_size > model.config.vocab_size:
            logger.warning(
                "tokenizer has %d ids but the model only %d: text using the extra ids will be rejected",
                self.codec.vocab_size,
                model.config.vocab_size,
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        passes: Passes | None = None,
        device: torch.device | str = "cpu",
        **model_kwargs: Any,
    ) -> TorchEngine:
        """Load a checkpoint directory (``config.json``, weights, and ``tokenizer.json`` with the chat template if
        present): ours, or a Hugging Face one. ``model_kwargs`` go to `SleepHybrid.from_pretrained` (``dtype``,
        overrides such as ``window=2048``, ``insert_memory=[...]``)."""
        model = SleepHybrid.from_pretrained(path, device=device, **model_kwargs)
        tok = Path(path) / TOKENIZER_FILE
        return cls(model, passes=passes, tokenizer=tok if tok.is_file() else None)

    def __repr__(self) -> str:
        return f"TorchEngine(fingerprint={self.fingerprint!r}, L={self.window}, N={self.passes}, agents={len(self)})"

    def __len__(self) -> int:
        return len(self._agents)

    # ------------------------------------------------------------------ facts

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ wake

    def observe(
        self,
        agent_id: str,
        tokens: TokenIds,
        *,
        return_logits: bool = False,
        passes: Passes | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> ObserveResult:
        """Append tokens to the agent's window, one pass each; if the window fills, sleep and go on in a new one.

        Args:
            tokens: token ids (non-empty).
            return_logits: return ``logits[i]`` ([n, vocab], CPU) predicting the token after tokens[i].
            passes: N for a window-full sleep (default the engine's).
            on_sleep: persists a window-full sleep (see `PersistSleep`); if it raises, the sleep still commits
                (the call cannot go on otherwise) and the failure is logged.

        Raises:
            UnknownAgent, InvalidInput, SleepFailed (a window-full sleep could not be computed: the tokens before
            that window boundary were taken in, the rest were not).
        """
        ids = check_token_ids(tokens, self.vocab_size)
        N = self._check_passes(passes, self._passes)
        live = self._live(agent_id)
        with live.lock, torch.no_grad():
            self._check_alive(live)
            outs, _, sleeps = self._feed(live, ids, N, on_sleep, keep=return_logits)
            return ObserveResult(
                agent_id=agent_id,
                tokens=len(ids),
                sleeps=sleeps,
                window_tokens=len(live.window) + len(live.pending),
                logits=torch.cat(outs).cpu() if return_logits else None,
            )

    def generate(
        self,
        agent_id: str,
        prompt: TokenIds,
        sampling: SamplingParams | None = None,
        *,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
        passes: Passes | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> Generation:
        """Take the prompt in and generate up to ``sampling.max_new_tokens`` tokens, one pass per token (wake).

        Greedy by default; see `SamplingParams` for temperature / top-k / top-p / seed / stop tokens. ``generator``
        overrides ``sampling.seed``. Generated tokens join the window; when it fills mid-generation the call sleeps
        (N = ``passes``) and continues in the new window, exactly like `observe`.

        Raises:
            UnknownAgent, InvalidInput (empty prompt, bad ids or sampling parameters), SleepFailed.
        """
        sp = sampling or SamplingParams()
        ids = check_token_ids(prompt, self.vocab_size, what="prompt")
        check_token_ids(list(sp.stop_tokens), self.vocab_size, what="stop_tokens", allow_empty=True)
        N = self._check_passes(passes, self._passes)
        gen = generator if generator is not None else sp.make_generator()
        live = self._live(agent_id)
        with live.lock, torch.no_grad():
            self._check_alive(live)
            s = _Stream(live=live, prompt=ids, sampling=sp, generator=gen)
            self._prefill(s, N, on_sleep, return_logits)
            while not s.done:
                self._make_room(s, N, on_sleep)
                s.last = self._extend(live, [s.new[-1]])[-1]
                self._pick(s, return_logits)
            return s.result(return_logits)

    def generate_batch(
        self,
        requests: Sequence[GenerateRequest],
        *,
        return_logits: bool = False,
        passes: Passes | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> list[Generation]:
        """`generate` for several agents at once: prompts are taken in one agent at a time (their lengths differ),
        then the decode steps of agents whose windows have the same shape run as one batch.

        Gives the same tokens as calling `generate` per request (logits agree to float rounding: a batched matmul
        may round differently). Each agent appears at most once. See docs/runtime.md for when it pays.
        """
        if not requests:
            return []
        N, streams = self._streams(requests, passes)
        with self._locked(streams), torch.no_grad():
            for s in streams:
                self._prefill(s, N, on_sleep, return_logits)
            while True:
                active = [s for s in streams if not s.done]
                if not active:
                    break
                groups: dict[tuple[int, int, int], list[_Stream]] = defaultdict(list)
                for s in active:
                    self._make_room(s, N, on_sleep)
                    groups[batch_key(s.live.cache)].append(s)
                for group in groups.values():
                    self._step_group(group)
                for s in active:
                    self._pick(s, return_logits)
            return [s.result(return_logits) for s in streams]

    # ------------------------------------------------------------------ sleep

    def sleep(self, agent_id: str, passes: Passes | None = None, *, persist: PersistSleep | None = None) -> SleepResult:
        """Consolidate the agent's window into S with N passes and clear the window.

        Works without holding the agent (turns go on meanwhile): computes, builds the next window, calls ``persist``,
        and only then swaps the new memory in. If the computation or ``persist`` raises, the exception propagates
        and the agent keeps its old memory, so the caller may simply retry. An empty window is not slept
        (``skipped="empty"``); a window replaced while the sleep computed drops the result (``"superseded"``).

        Raises:
            UnknownAgent, InvalidInput (passes < 1), and whatever the model or ``persist`` raised.
        """
        N = self._check_passes(passes, self._passes)
        live = self._live(agent_id)
        t0 = time.perf_counter()
        with live.lock, torch.no_grad():
            self._wait_commit(live)
            self._check_alive(live)
            if live.pending and len(live.window) + len(live.pending) <= self.window:
                self._extend(live, [])  # the waiting token joins this window before it is consolidated
            if not live.window:
                return SleepResult(agent_id, nominal_passes(N), 0, "empty", None, time.perf_counter() - t0)
            frozen, epoch, n = copy_cache(live.cache), live.epoch, len(live.window)
        with torch.no_grad():
            # passes 2..N over the frozen window's pass-1 features (N "auto": until S has converged)
            new_state, used = sleep_cache(self.model, frozen, N)
        with live.lock:
            self._wait_commit(live)
            if live.epoch != epoch or live.removed:
                logger.info("sleep of agent %r superseded while it computed; result dropped", agent_id)
                return SleepResult(agent_id, used, 0, "superseded", None, time.perf_counter() - t0)
            tail = live.window[n:] + live.pending
            memory = self._after_sleep(live, new_state, n, tail)
            live.committing = True  # from here until the swap, the window may only grow
        try:
            with torch.no_grad():
                nxt = self._open(agent_id, new_state, tail)
            sid = persist(SleepCommit(agent_id, memory, used, n, "sleep")) if persist is not None else None
        except BaseException:
            with live.lock:
                live.committing = False
                live.cond.notify_all()
            raise
        with live.lock, torch.no_grad():
            try:
                late = live.window[n:] + live.pending
                if len(late) > len(tail):  # tokens taken in while persisting: bring the new window up to date
                    if len(late) <= self.window:
                        self.model.extend(nxt.cache, self._ids(late[len(tail) :]))
                        nxt.window, nxt.pending = late, []
                    else:
                        nxt = self._open(agent_id, new_state, late)
                self._swap_in(live, nxt, n, sid)
            finally:
                live.committing = False
                live.cond.notify_all()
        return SleepResult(agent_id, used, n, None, sid, time.perf_counter() - t0, carried=len(late))

    # ------------------------------------------------------------------ internals (agent lock held)

    def _wait_commit(self, live: _Live) -> None:
        """Wait (lock released meanwhile) until no requested sleep is persisting for this agent (`sleep` persists
        outside the lock). The agent may have been removed meanwhile: callers check what they need."""
        while live.committing:
            live.cond.wait()

    def _ids(self, ids: list[int]) -> Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _open(self, agent_id: str, state: FastWeights, tail: list[int]) -> _Live:
        """A window opened on ``state`` with ``tail`` replayed through pass 1 (a token past L is left waiting)."""
        cache = self.model.start_window(state)
        run, wait = tail[: self.window], tail[self.window :]
        if run:
            self.model.extend(cache, self._ids(run))
        return _Live(agent_id=agent_id, cache=cache, window=run, pending=wait)

    def _restore(self, agent_id: str, state: FastWeights, tail: list[int]) -> _Live:
        """`_open` on a state from outside, moved to the model's device (one prefill of ``tail``)."""
        with torch.no_grad():
            return self._open(agent_id, state.to(self.device), tail)

    def _stream(self, request: GenerateRequest, prompt: list[int]) -> _Stream:
        sp = request.sampling
        gen = request.generator if request.generator is not None else sp.make_generator()
        return _Stream(live=self._live(request.agent_id), prompt=prompt, sampling=sp, generator=gen)

    def _extend(self, live: _Live, ids: list[int]) -> Tensor:
        """Run the waiting token(s) and ``ids`` through pass 1; return the logits of ``ids`` ([len(ids), V]).

        Works on a copy and swaps it in at the end, so an exception leaves the agent as it was.
        """
        todo = live.pending + ids
        cache = copy_cache(live.cache)
        logits = self.model.extend(cache, self._ids(todo))[0]
        live.cache = cache
        live.window.extend(todo)
        waited = len(live.pending)
        live.pending = []
        live.tokens_seen += len(ids)
        return logits[waited:]

    def _feed(
        self, live: _Live, ids: list[int], passes: Passes, on_sleep: PersistSleep | None, *, keep: bool
    ) -> tuple[list[Tensor], Tensor | None, int]:
        """Take ``ids`` in, sleeping whenever the window is full. Returns (logits pieces if ``keep``, logits of the
        last id, window-full sleeps)."""
        L = self.window
        sleeps = 0
        while len(live.window) + len(live.pending) > L:  # a waiting token that no longer fits opens the next window
            sleeps += self._forced_sleep(live, passes, on_sleep, taken=0, total=len(ids))
        outs: list[Tensor] = []
        last: Tensor | None = None
        pos = 0
        while pos < len(ids):
            room = L - len(live.window) - len(live.pending)
            if room <= 0:
                if live.pending:
                    self._extend(live, [])  # the waiting token still fits the old window
                sleeps += self._forced_sleep(live, passes, on_sleep, taken=pos, total=len(ids))
                continue
            lg = self._extend(live, ids[pos : pos + room])
            if keep:
                outs.append(lg)
            last = lg[-1]
            pos += min(room, len(ids) - pos)
        return outs, last, sleeps

    def _forced_sleep(
        self, live: _Live, passes: Passes, on_sleep: PersistSleep | None, *, taken: int, total: int
    ) -> int:
        """The window is full and more must go in: sleep now, on the caller's time (the one synchronous sleep).

        If a requested sleep is just persisting its result, wait for it instead (it empties the window) and return 0;
        the caller looks at the window again.
        """
        if live.committing:
            self._wait_commit(live)
            self._check_alive(live)
            return 0
        n = len(live.window)
        try:
            new_state, used = sleep_cache(self.model, live.cache, passes)
            self._commit(live, new_state, n, list(live.pending), used, "window_full", on_sleep, tolerate=True)
        except Exception as e:
            raise SleepFailed(
                f"agent {live.agent_id!r}: the window is full and its sleep failed ({type(e).__name__}: {e}); "
                f"{taken} of {total} tokens were taken in, the agent keeps its last good state"
            ) from e
        logger.debug("agent %r slept on a full window (%d tokens, N=%d)", live.agent_id, n, used)
        return 1

    # -------------------------------------------------------- generation steps (agent lock held)

    def _prefill(self, s: _Stream, passes: Passes, on_sleep: PersistSleep | None, keep: bool) -> None:
        outs, s.last, s.sleeps = self._feed(s.live, s.prompt, passes, on_sleep, keep=keep)
        s.prompt_logits = outs
        if s.sampling.max_new_tokens == 0:
            s.done = True
        else:
            self._pick(s, keep)

    def _pick(self, s: _Stream, keep: bool) -> None:
        """Draw the next token from ``s.last``; the last one of a generation waits in the window (see module doc)."""
        assert s.last is not None
        tok = sample_next(s.last, s.sampling, s.generator)
        s.new.append(tok)
        if keep:
            s.step_logits.append(s.last)
        if tok in s.sampling.stop_tokens or len(s.new) >= s.sampling.max_new_tokens:
            s.live.pending.append(tok)
            s.live.tokens_seen += 1
            s.done = True

    def _make_room(self, s: _Stream, passes: Passes, on_sleep: PersistSleep | None) -> None:
        live = s.live
        while len(live.window) + len(live.pending) >= self.window:
            s.sleeps += self._forced_sleep(live, passes, on_sleep, taken=len(s.prompt), total=len(s.prompt))

    def _step_group(self, group: list[_Stream]) -> None:
        """Feed each stream's newest token; agents with equal window shapes share one batched pass."""
        if len(group) == 1:
            s = group[0]
            s.last = self._extend(s.live, [s.new[-1]])[-1]
            return
        caches = [s.live.cache for s in group]
        batched = stack_caches(caches)
        toks = torch.tensor([[s.new[-1]] for s in group], dtype=torch.long, device=self.device)
        logits = self.model.extend(batched, toks)[:, -1]  # [n, V]
        for i, s in enumerate(group):
            s.live.cache = split_cache(batched, i, caches[i])
            s.live.window.append(s.new[-1])
            s.live.tokens_seen += 1
            s.last = logits[i]


__all__ = ["TorchEngine", "check_agent_id"]
