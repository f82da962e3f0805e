"""`VLLMEngine`: the `Engine` protocol on vLLM — many agents, their fast weights carried by the KV connector.

vLLM keeps nothing between calls. Each agent's memory is held here exactly as `TorchEngine` holds it (the state its
window started from, the window's tokens, and at most one generated token waiting for the next window), and every
model call is one vLLM request ``[BOS] + window``: the connector restores S (`agentsleep.serving.connector`) and vLLM
re-runs the window in one prefill, then decodes. A request never crosses a window: when the window is full the agent
sleeps and the next request opens the next window (the same rule as `TorchEngine`, paper.md §5). The agents' books
are `agentsleep.runtime.base.EngineBase`, shared with `TorchEngine`; unlike it, `sleep` persists with the agent locked.

S reaches the connector through a private, engine-owned `SnapshotStore` (a temporary SQLite file by default; the
"state transport"), written only when S changes (create, import, sleep), each write a compare-and-set like every save;
the connector keeps the window header of each S resident (keyed by its content), so a turn reads nothing from it. It
is not the product's store: snapshots for users go through the same ``persist`` / ``on_sleep`` callbacks and `revive`
as for any engine.

Sleep runs in PyTorch on the same weights by default (the float32 reference; it is offline work and matches
`TorchEngine`). ``sleep_backend="vllm"`` runs a one-pass sleep (N=1) on vLLM instead: the window is prefilled and the
connector copies the GDN state out of vLLM's pages (bf16 compute; see docs/serving.md for the measured difference).

Differences from `TorchEngine` (docs/serving.md): bf16 on vLLM against the float32 reference (greedy tokens agree on
the tested models, logits to a stated bound); ``return_logits`` gives the generated tokens' distributions as
log-probabilities (logits minus their log-sum-exp, so argmax and softmax are unchanged) and no ``prompt_logits``:
asking vLLM for prompt log-probs makes it skip the connector's cache hit, i.e. drop the restored S. Sampled
(temperature > 0) tokens come from vLLM's sampler, so they are not bit-equal to `TorchEngine`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from agentsleep.errors import ConfigError, EngineError, InvalidInput, SleepFailed
from agentsleep.model.state import FastWeights
from agentsleep.runtime.base import EngineBase, LiveAgent, Stream
from agentsleep.runtime.engine import (
    GenerateRequest,
    Generation,
    ObserveResult,
    PersistSleep,
    SamplingParams,
    SleepResult,
    TokenIds,
    check_token_ids,
)
from agentsleep.runtime.text import TOKENIZER_FILE, TextCodec
from agentsleep.serving.params import ConnectorParams
from agentsleep.serving.reference import reference_model
from agentsleep.serving.resident import state_key
from agentsleep.serving.settings import (
    DEFAULT_KV_CACHE_BYTES,
    apply_env_defaults,
    bound_cpus,
    kv_transfer_config,
    on_gpu,
    require_vllm,
)
from agentsleep.store import SnapshotStore
from agentsleep.store.store import NO_SNAPSHOT

logger = logging.getLogger(__name__)

SleepBackend = Literal["torch", "vllm"]
_STATE_KEEP = 2  # transport snapshots kept per agent (the newest is all a request needs; one spare for safety)


@dataclass(eq=False, kw_only=True)
class _Agent(LiveAgent):
    """One live agent: the state its window started from and the window's tokens (run by the next request; the
    pending token is the last generated one, not yet fed). Fields are read and written with ``lock`` held."""

    state: FastWeights  # the state the current window started from
    state_id: str | None  # its transport snapshot (None while S is zero: nothing to restore)
    state_key: str | None  # resident.state_key(state): the connector's resident header for it

    def start_state(self) -> FastWeights:
        return self.state

    def take_window(self, other: _Agent) -> None:
        self.state, self.state_id, self.state_key = other.state, other.state_id, other.state_key
        self.window, self.pending = other.window, other.pending


@dataclass(eq=False, kw_only=True)
class _Stream(Stream[_Agent]):
    """One request of `generate_batch`. ``prompt_logits`` stays None: vLLM skips external cache hits when prompt
    logprobs are asked for (see the module docstring)."""

    seed: int | None


class VLLMEngine(EngineBase[_Agent, _Stream]):
    """Many agents on one in-process vLLM engine serving a `SleepHybrid` checkpoint.

    Args:
        checkpoint: the checkpoint directory (`SleepHybrid.save_pretrained`; ``tokenizer.json`` optional).
        passes: default N for sleeps (default the checkpoint's).
        sleep_backend: ``"torch"`` (default: the float32 reference, any N) or ``"vllm"`` (N=1 on vLLM).
        state_dir: directory of the private state-transport store (default: a temporary directory).
        dtype: vLLM compute dtype; the CPU GDN kernels need ``"bfloat16"``.
        max_num_seqs: requests vLLM runs in one batch.
        kv_cache_memory_bytes: vLLM's KV/state cache size (default: 64 MiB on CPU; on a GPU vLLM sizes it from
            ``gpu_memory_utilization``, which ``llm_kwargs`` may set).
        enforce_eager: skip torch.compile and CUDA graphs (default: True on CPU, where it saves ~25 s of start-up;
            False on a GPU, where CUDA graphs pay for themselves in decode).
        seed: vLLM's seed.
        llm_kwargs: anything else for `vllm.LLM`.

    Environment: `agentsleep.serving.settings.ENV_DEFAULTS` are applied where unset (in-process engine core, CPU
    thread binding). Thread safety: one lock per agent plus one around the vLLM engine; threads may drive different
    agents at once, their model calls are serialised (batch agents with `generate_batch`).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        passes: int | None = None,
        sleep_backend: SleepBackend = "torch",
        state_dir: str | os.PathLike[str] | None = None,
        dtype: str = "bfloat16",
        max_num_seqs: int = 8,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        apply_env_defaults()  # before vLLM reads its environment
        require_vllm()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise ConfigError("VLLMEngine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (an in-process engine core)")
        if sleep_backend not in ("torch", "vllm"):
            raise InvalidInput(f"sleep_backend must be 'torch' or 'vllm', got {sleep_backend!r}")
        self.path = Path(checkpoint).resolve()
        model = reference_model(self.path)  # sleeps, state checks, config
        cfg = model.config
        if cfg.bos_token_id is None:
            raise ConfigError("VLLMEngine needs a checkpoint with bos_token_id: every window opens with the BOS")
        if cfg.eviction != "hard":
            raise ConfigError(
                f"VLLMEngine serves hard eviction only (this checkpoint: {cfg.eviction!r}); use TorchEngine"
            )
        super().__init__(model, passes)
        self.sleep_backend: SleepBackend = sleep_backend
        tok = self.path / TOKENIZER_FILE
        self.codec = TextCodec.from_file(tok) if tok.is_file() else None
        self._tmp = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="agentsleep-vllm-")
        root = Path(state_dir) if state_dir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        root.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{root / 'vllm-state.db'}"
        # A cache, not the product's store: losing it on a crash loses nothing (memories live in the engine).
        self._states = SnapshotStore(url, sqlite_synchronous="OFF")

        from vllm import LLM
        from vllm.config import KVTransferConfig

        gpu = on_gpu()
        if kv_cache_memory_bytes is None and not gpu:
            kv_cache_memory_bytes = DEFAULT_KV_CACHE_BYTES
        threads = bound_cpus(os.environ["VLLM_CPU_OMP_THREADS_BIND"])
        if not gpu and threads is not None and torch.get_num_threads() != threads:
            # vLLM pins its OpenMP threads to the bound CPUs but keeps torch's thread count: more threads than CPUs
            # spin against each other (settings.apply_env_defaults)
            logger.info("torch threads %d -> %d (VLLM_CPU_OMP_THREADS_BIND)", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)
        kwargs: dict[str, Any] = {
            "model": str(self.path),
            "skip_tokenizer_init": True,
            "dtype": dtype,
            "distributed_executor_backend": "uni",
            "enforce_eager": (not gpu) if enforce_eager is None else enforce_eager,
            "enable_prefix_caching": False,
            "async_scheduling": False,  # the connector needs it off (connector.check_supported); GPUs default to on
            "max_model_len": cfg.window + 2,  # BOS + L + the sampled token that is never fed (config.py)
            "max_num_seqs": max_num_seqs,
            "max_logprobs": cfg.vocab_size,  # return_logits asks for the whole distribution
            "seed": seed,
            "kv_transfer_config": KVTransferConfig(**kv_transfer_config(url)),
        }
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        kwargs.update(llm_kwargs or {})
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        logger.info("vLLM engine for %s ready in %.1f s", self.path, time.perf_counter() - t0)
        self._vllm = threading.Lock()  # vllm.LLM is not thread-safe

    def __repr__(self) -> str:
        return f"VLLMEngine({str(self.path)!r}, L={self.window}, N={self.passes}, agents={len(self._agents)})"

    def close(self) -> None:
        """Release the vLLM engine and the transport store."""
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        self._states.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ facts

    @property
    def states(self) -> SnapshotStore:
        """The private state-transport store the connector restores S from (see the module docstring)."""
        return self._states

    @property
    def bos(self) -> int:
        return int(self.model.config.bos_token_id)  # type: ignore[arg-type]  # checked in __init__

    # ------------------------------------------------------------------ wake

    def observe(
        self,
        agent_id: str,
        tokens: TokenIds,
        *,
        return_logits: bool = False,
        passes: int | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> ObserveResult:
        """Append tokens to the agent's window, sleeping whenever it is full (as `TorchEngine.observe`).

        No model call is needed: the window is re-run by the next `generate`. ``return_logits`` is not supported
        here (InvalidInput): use `generate` with ``return_logits``.
        """
        if return_logits:
            raise InvalidInput("VLLMEngine.observe cannot return logits; use generate(..., return_logits=True)")
        ids = check_token_ids(tokens, self.vocab_size)
        N = self._check_passes(passes, self._passes)
        agent = self._live(agent_id)
        with agent.lock:
            self._check_alive(agent)
            sleeps = self._feed(agent, ids, N, on_sleep)
            return ObserveResult(agent_id, len(ids), sleeps, len(agent.window) + len(agent.pending))

    def generate(
        self,
        agent_id: str,
        prompt: TokenIds,
        sampling: SamplingParams | None = None,
        *,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
        passes: int | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> Generation:
        """Take the prompt in and generate (as `TorchEngine.generate`); one vLLM request per window touched."""
        req = GenerateRequest(agent_id, prompt, sampling or SamplingParams(), generator)
        return self.generate_batch([req], return_logits=return_logits, passes=passes, on_sleep=on_sleep)[0]

    def generate_batch(
        self,
        requests: Sequence[GenerateRequest],
        *,
        return_logits: bool = False,
        passes: int | None = None,
        on_sleep: PersistSleep | None = None,
    ) -> list[Generation]:
        """`generate` for several agents at once: every round submits one request per unfinished agent to vLLM,
        which batches them (continuous batching). Each agent appears at most once."""
        if not requests:
            return []
        N, streams = self._streams(requests, passes)
        with self._locked(streams):
            for s in streams:
                s.sleeps = self._feed(s.live, s.prompt, N, on_sleep)
                s.done = s.sampling.max_new_tokens == 0
            while active := [s for s in streams if not s.done]:
                for s in active:
                    self._make_room(s, N, on_sleep)
                self._round(active, return_logits=return_logits)
            return [s.result(return_logits) for s in streams]

    # ------------------------------------------------------------------ sleep

    def sleep(self, agent_id: str, passes: int | None = None, *, persist: PersistSleep | None = None) -> SleepResult:
        """Consolidate the window into S with N passes and clear it (as `TorchEngine.sleep`: computed without
        holding the agent, committed atomically after ``persist``; on any failure the agent is unchanged)."""
        N = self._check_passes(passes, self._passes)
        agent = self._live(agent_id)
        t0 = time.perf_counter()
        with agent.lock:
            self._check_alive(agent)
            if agent.pending and len(agent.window) + len(agent.pending) <= self.window:
                agent.window += agent.pending  # the waiting token joins this window before it is consolidated
                agent.pending = []
            if not agent.window:
                return SleepResult(agent_id, N, 0, "empty", None, time.perf_counter() - t0)
            state, window, epoch, state_id = agent.state, list(agent.window), agent.epoch, agent.state_id
        new_state = self._sleep_state(agent_id, state, state_id, window, N)
        with agent.lock:
            if agent.epoch != epoch or agent.removed:
                logger.info("sleep of agent %r superseded while it computed; result dropped", agent_id)
                return SleepResult(agent_id, N, 0, "superseded", None, time.perf_counter() - t0)
            tail = agent.window[len(window) :] + agent.pending
            sid = self._commit(agent, new_state, len(window), tail, N, "sleep", persist, tolerate=False)
        return SleepResult(agent_id, N, len(window), None, sid, time.perf_counter() - t0, carried=len(tail))

    def flush(self) -> None:
        """Step the engine until every sleep copy-out (``sleep_backend="vllm"``) is saved: offline `vllm.LLM` stops
        stepping when its last request finishes, and the copy runs in the step after (spec/vllm-cpu.md §8.8)."""
        engine = self.llm.llm_engine
        core = engine.engine_core.engine_core  # InprocClient -> EngineCore (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        for _ in range(1000):
            if not core.scheduler.has_requests():
                return
            engine.step()
        raise EngineError("vLLM did not finish its pending state copies within 1000 steps")

    # ------------------------------------------------------------------ internals

    def _open(self, agent_id: str, state: FastWeights, tail: list[int]) -> _Agent:
        """A window on ``state`` holding ``tail`` (run by the next request); S goes to the transport store."""
        L, state_id = self.window, self._store_state(agent_id, state)
        key = state_key(state) if state_id is not None else None
        return _Agent(
            agent_id=agent_id, state=state, state_id=state_id, state_key=key, window=tail[:L], pending=tail[L:]
        )

    def _restore(self, agent_id: str, state: FastWeights, tail: list[int]) -> _Agent:
        """`_open` on a copy of a state from outside, on the CPU."""
        return self._open(agent_id, state.clone().to("cpu"), tail)

    def _stream(self, request: GenerateRequest, prompt: list[int]) -> _Stream:
        sp = request.sampling
        seed = sp.seed
        if request.generator is not None:  # vLLM samples with its own generator: derive its seed from the caller's
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=request.generator))
        return _Stream(live=self._live(request.agent_id), prompt=prompt, sampling=sp, seed=seed)

    def _store_state(self, agent_id: str, state: FastWeights) -> str | None:
        """Put S where the connector can restore it; None for S = 0 (a request then simply starts from zero)."""
        if all(not bool(s.any()) for s in state.ssm):
            return None
        expect = self._states.current_id(agent_id) or NO_SNAPSHOT  # a compare-and-set, like every save
        rec = self._states.save(
            agent_id, state, [], reason="transport", metadata={"engine": "vllm"}, expect_current=expect
        )
        self._states.prune(agent_id, keep=_STATE_KEEP)
        return rec.id

    def _feed(self, agent: _Agent, ids: list[int], passes: int, on_sleep: PersistSleep | None) -> int:
        """Append ``ids``, sleeping whenever the window is full (`TorchEngine._feed`'s rule). Returns the sleeps."""
        L = self.window
        sleeps = 0
        if len(agent.window) + len(agent.pending) > L:  # a waiting token that no longer fits opens the next window
            self._forced_sleep(agent, passes, on_sleep)
            sleeps += 1
        pos = 0
        while pos < len(ids):
            room = L - len(agent.window) - len(agent.pending)
            if room <= 0:
                agent.window += agent.pending  # the waiting token still fits the old window
                agent.pending = []
                self._forced_sleep(agent, passes, on_sleep)
                sleeps += 1
                continue
            agent.window += agent.pending + ids[pos : pos + room]
            agent.pending = []
            agent.tokens_seen += min(room, len(ids) - pos)
            pos += room
        return sleeps

    def _make_room(self, s: _Stream, passes: int, on_sleep: PersistSleep | None) -> None:
        """Before a decode round: a full window sleeps first, and the token sampled from its last slot (``s.new[-1]``,
        never fed yet) opens the new window."""
        agent = s.live
        if s.new and len(agent.window) >= self.window:
            self._forced_sleep(agent, passes, on_sleep)
            s.sleeps += 1
        if s.new:
            agent.window.append(s.new[-1])
            agent.tokens_seen += 1

    def _forced_sleep(self, agent: _Agent, passes: int, on_sleep: PersistSleep | None) -> None:
        n = len(agent.window)
        try:
            new_state = self._sleep_state(agent.agent_id, agent.state, agent.state_id, list(agent.window), passes)
            self._commit(agent, new_state, n, list(agent.pending), passes, "window_full", on_sleep, tolerate=True)
        except Exception as e:
            raise SleepFailed(
                f"agent {agent.agent_id!r}: the window is full and its sleep failed ({type(e).__name__}: {e}); the "
                "agent keeps its last good state"
            ) from e

    def _sleep_state(
        self, agent_id: str, state: FastWeights, state_id: str | None, window: list[int], passes: int
    ) -> FastWeights:
        """S after ``passes`` passes over ``[BOS] + window`` from ``state``."""
        if self.sleep_backend == "vllm" and passes == 1:
            key = state_key(state) if state_id is not None else None
            return self._sleep_on_vllm(agent_id, state_id, key, window)
        tokens = torch.tensor([window], dtype=torch.long, device=self.model.device)
        return self.model.sleep(tokens, state.to(self.model.device), passes).to("cpu")

    def _sleep_on_vllm(self, agent_id: str, state_id: str | None, key: str | None, window: list[int]) -> FastWeights:
        """One pass on vLLM: prefill ``[BOS] + window`` and let the connector copy S out of the pages."""
        from vllm import SamplingParams as VSampling

        before = self._states.current_id(agent_id)
        params = ConnectorParams(
            agent_id, restore=state_id is not None, snapshot_id=state_id, state_key=key, sleep=True,
            expect_current=before or NO_SNAPSHOT,
        )  # fmt: skip
        extra = {"kv_transfer_params": params.to_dict()}
        sp = VSampling(max_tokens=1, temperature=0.0, ignore_eos=True, extra_args=extra)
        with self._vllm:
            out = self.llm.generate([{"prompt_token_ids": [self.bos, *window]}], sp, use_tqdm=False)[0]
            self.flush()
        self._check_output(out, agent_id)
        after = self._states.current_id(agent_id)
        if after is None or after == before:
            raise EngineError(f"vLLM did not save the sleep state of agent {agent_id!r}")
        loaded = self._states.load(after, fingerprint=self.fingerprint)
        if loaded.record.reason != "sleep":
            raise EngineError(f"vLLM did not save the sleep state of agent {agent_id!r}")
        return loaded.state

    def _round(self, streams: list[_Stream], *, return_logits: bool) -> None:
        """One vLLM request per stream: ``[BOS] + window``, decoding until the window is full or the stream ends."""
        from vllm import SamplingParams as VSampling

        L, V = self.window, self.vocab_size
        inputs, params = [], []
        for s in streams:
            agent, sp = s.live, s.sampling
            # g tokens: the first g-1 are fed into this window, the g-th waits (or opens the next window)
            room = L - len(agent.window) + 1
            kv = ConnectorParams(
                agent.agent_id,
                restore=agent.state_id is not None,
                snapshot_id=agent.state_id,
                state_key=agent.state_key,
            ).to_dict()
            params.append(
                VSampling(
                    max_tokens=min(sp.max_new_tokens - len(s.new), room),
                    temperature=sp.temperature,
                    top_k=sp.top_k if sp.top_k is not None else 0,
                    top_p=sp.top_p if sp.top_p is not None else 1.0,
                    seed=s.seed if s.seed is None else s.seed + len(s.new),
                    stop_token_ids=list(sp.stop_tokens),
                    ignore_eos=True,  # stopping is the caller's stop_tokens only, as in TorchEngine
                    logprobs=V if return_logits else None,
                    extra_args={"kv_transfer_params": kv},
                )
            )
            inputs.append({"prompt_token_ids": [self.bos, *agent.window]})
        with self._vllm:
            outs = self.llm.generate(inputs, params, use_tqdm=False)
        for s, out in zip(streams, outs):
            self._check_output(out, s.live.agent_id)
            comp = out.outputs[0]
            toks = [int(t) for t in comp.token_ids]
            if not toks:
                raise EngineError(f"vLLM returned no token for agent {s.live.agent_id!r}")
            if return_logits:
                s.step_logits += [_dense(lp, V) for lp in comp.logprobs or []]
            s.new += toks
            s.live.window += toks[:-1]
            s.live.tokens_seen += len(toks) - 1
            stop = toks[-1] in s.sampling.stop_tokens
            if stop or len(s.new) >= s.sampling.max_new_tokens:
                s.live.pending.append(toks[-1])
                s.live.tokens_seen += 1
                s.done = True

    @staticmethod
    def _check_output(out: Any, agent_id: str) -> None:
        kv = out.kv_transfer_params or {}
        if kv.get("error"):
            raise EngineError(f"vLLM could not serve agent {agent_id!r}: {kv['error']}")


def _dense(logprobs: Any, vocab: int) -> torch.Tensor:
    """vLLM's {token id: Logprob} for one position -> a dense [vocab] float32 vector (-inf where absent)."""
    out = torch.full((vocab,), float("-inf"))
    if logprobs:
        for tok, lp in logprobs.items():
            out[int(tok)] = float(lp.logprob)
    return out


__all__ = ["SleepBackend", "VLLMEngine"]
