"""The agent layer of ``agentsleep serve``: an ASGI middleware inside vLLM's own OpenAI-compatible API server.

vLLM's server (``python -m vllm.entrypoints.openai.api_server``) runs the model and the fast-weight connector; this
middleware (``--middleware agentsleep.serving.server.AgentMemoryMiddleware``) turns a completion request that names
an agent into one window of that agent and keeps the agent's memory between requests:

1. ``POST /v1/completions`` with top-level ``"kv_transfer_params": {"agent_id": ...}`` (other requests pass through
   untouched). The ``prompt`` (text or token ids) is the agent's *new input*, not its history.
2. The agent's current snapshot is looked up in the `SnapshotStore`: unknown agent → 404, a snapshot of another model
   → 409 (send ``"restore": false`` to start an agent from zero state).
3. If the input and ``max_tokens`` do not fit beside the window, the agent sleeps first (`SleepScheduler.sleep_now`,
   the only sleep on the response path); input that cannot fit even an empty window → 400.
4. The request is rewritten to ``prompt = [BOS] + window + input`` (token ids) with the snapshot to restore, and
   vLLM serves it; the connector saves (S, window + input + reply) as the agent's new snapshot before the response
   is sent, and the response's ``kv_transfer_params`` report it.
5. The scheduler is told the new window size and sleeps the agent in the background once the policy's threshold is
   reached (PyTorch, same weights), so sleep stays off the response path.

Requests of one agent are served one at a time; a background sleep and a request of the same agent exclude each
other. Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) and never stop the server.

Configuration comes from ``AGENTSLEEP_SERVE_*`` environment variables (`ServeSettings`, set by ``agentsleep serve``)
and the sleep policy from ``AGENTSLEEP_SLEEP_*`` (`SleepPolicy.from_env`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentsleep.errors import (
    AgentSleepError,
    ConfigError,
    InvalidInput,
    SleepFailed,
    SnapshotCorrupt,
    SnapshotMismatch,
    UnknownAgent,
    UnknownSnapshot,
    WindowOverflow,
)
from agentsleep.memory.policy import ENV_PREFIX as POLICY_ENV_PREFIX
from agentsleep.memory.policy import SleepPolicy
from agentsleep.memory.scheduler import SleepOutcome, SleepRequest, SleepScheduler
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime.engine import check_token_ids
from agentsleep.runtime.text import TOKENIZER_FILE, TextCodec
from agentsleep.serving.params import AgentParams
from agentsleep.serving.reference import reference_model
from agentsleep.store import LoadedSnapshot, SnapshotStore

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SERVE_ENV_PREFIX = "AGENTSLEEP_SERVE_"
AGENT_PATH = "/v1/completions"
OTHER_PATHS = ("/v1/chat/completions", "/v1/responses")
DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default
# Request fields an agent turn cannot honour: several choices would each continue the same memory; prompt log-probs
# make vLLM skip the connector (the restored S would be silently dropped); streaming is not implemented here.
UNSUPPORTED = {"stream": (False, None), "n": (1, None), "best_of": (1, None), "echo": (False, None),
               "prompt_logprobs": (None,), "suffix": (None,)}  # fmt: skip


class ServeSettings(BaseSettings):
    """What the middleware needs to know (``AGENTSLEEP_SERVE_<FIELD>``; written by ``agentsleep serve``)."""

    model_config = SettingsConfigDict(env_prefix=SERVE_ENV_PREFIX, extra="ignore")

    checkpoint: Path
    store_url: str = "sqlite:///agentsleep.db"
    blob_dir: str | None = None
    sleep_workers: int = 1


class HTTPError(Exception):
    """An error to answer with, OpenAI style."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> bytes:
        err = {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        return json.dumps({"error": err}).encode()


def http_error(e: BaseException) -> HTTPError:
    """Map an agentsleep error to its HTTP status."""
    if isinstance(e, HTTPError):
        return e
    msg = str(e)
    if isinstance(e, UnknownAgent | UnknownSnapshot):
        return HTTPError(404, msg, type(e).__name__, "kv_transfer_params")
    if isinstance(e, SnapshotMismatch):
        return HTTPError(409, msg, type(e).__name__, "kv_transfer_params.snapshot_id")
    if isinstance(e, WindowOverflow):
        return HTTPError(400, msg, type(e).__name__, "prompt")
    if isinstance(e, InvalidInput):
        return HTTPError(400, msg, type(e).__name__, None)
    if isinstance(e, SnapshotCorrupt):
        return HTTPError(500, msg, type(e).__name__, None)
    if isinstance(e, SleepFailed):
        return HTTPError(503, msg, type(e).__name__, None)
    if isinstance(e, AgentSleepError):
        return HTTPError(500, msg, type(e).__name__, None)
    return HTTPError(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError", None)


@dataclass
class Turn:
    """One agent request after `AgentTurns.prepare`: the rewritten body and what to report afterwards."""

    agent_id: str
    body: dict[str, Any]
    lock: threading.Lock


class AgentTurns:
    """Agents' memories on the server side: snapshot lookups, window composition, and sleeps through the scheduler.

    Args:
        model: the reference model (sleeps run on it, in PyTorch); its config gives L, N and the BOS.
        store: the snapshot store shared with the connector.
        codec: the tokenizer for text prompts (None: token-id prompts only).
        policy: when to sleep (default: L and N of the model).
    """

    def __init__(
        self,
        model: SleepHybrid,
        store: SnapshotStore,
        codec: TextCodec | None = None,
        policy: SleepPolicy | None = None,
        *,
        sleep_workers: int = 1,
    ) -> None:
        cfg = model.config
        if cfg.bos_token_id is None:
            raise InvalidInput("agentsleep serve needs a checkpoint with bos_token_id: every window opens with it")
        self.model, self.store, self.codec = model, store, codec
        self.L = cfg.window
        self.policy = policy or SleepPolicy(window=cfg.window, passes=cfg.passes)
        self.scheduler = SleepScheduler(self._sleep_job, self.policy, max_workers=sleep_workers)
        self._locks: dict[str, threading.Lock] = {}
        self._async_locks: dict[str, asyncio.Lock] = {}
        self._guard = threading.Lock()

    def close(self) -> None:
        self.scheduler.shutdown(wait=False, cancel_pending=True)

    def agent_lock(self, agent_id: str) -> threading.Lock:
        """Excludes a background sleep and a request of the same agent from each other."""
        with self._guard:
            return self._locks.setdefault(agent_id, threading.Lock())

    def request_lock(self, agent_id: str) -> asyncio.Lock:
        """Serialises requests of one agent (event-loop side)."""
        return self._async_locks.setdefault(agent_id, asyncio.Lock())

    # ------------------------------------------------------------------ request path (called in worker threads)

    def input_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            if len(prompt) != 1:
                raise InvalidInput("an agent request takes one prompt (one turn), not a batch of prompts")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.codec is None:
                raise InvalidInput("this checkpoint has no tokenizer.json: send the prompt as token ids")
            return check_token_ids(self.codec.encode(prompt), self.model.config.vocab_size, what="prompt")
        return check_token_ids(prompt, self.model.config.vocab_size, what="prompt")

    def snapshot(self, params: AgentParams) -> LoadedSnapshot | None:
        """The snapshot the turn starts from (None: zero state, empty window)."""
        if not params.restore:
            return None
        fp = self.model.fingerprint
        if params.snapshot_id is not None:
            return self.store.load(params.snapshot_id, fingerprint=fp)
        try:
            return self.store.latest(params.agent_id, fingerprint=fp)
        except UnknownAgent as e:
            raise UnknownAgent(
                f"unknown agent {params.agent_id!r}: no snapshot in the store; send kv_transfer_params.restore=false "
                "to start a new agent"
            ) from e

    def prepare(self, params: AgentParams, body: dict[str, Any]) -> Turn:
        """Validate, make room (sleeping if needed), and compose the vLLM request. Runs with no lock held."""
        for key, allowed in UNSUPPORTED.items():
            if key in body and body[key] not in allowed:
                raise InvalidInput(f"{key}={body[key]!r} is not supported for agent requests (kv_transfer_params)")
        if params.sleep or not params.save:
            raise InvalidInput("agent requests always save their turn; 'sleep' and 'save' are for VLLMEngine")
        ids = self.input_ids(body)
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInput(f"max_tokens must be a positive integer, got {max_tokens!r}")
        incoming = len(ids) + max_tokens
        if incoming > self.L + 1:  # the window (L) plus the reply's last token, which is never fed
            raise WindowOverflow(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) do not fit one window "
                f"(L={self.L}, +1 for the reply's last token); shorten them or split the input into several turns"
            )
        self.scheduler.notify_turn(params.agent_id)
        try:
            return self._compose(params, body, ids, incoming)
        except BaseException:
            self.scheduler.turn_finished(params.agent_id)  # release the sleeps this turn held
            raise

    def _compose(self, params: AgentParams, body: dict[str, Any], ids: list[int], incoming: int) -> Turn:
        snap = self.snapshot(params)
        if snap is not None and params.snapshot_id is None and self._must_sleep(len(snap.window), incoming):
            self.scheduler.sleep_now(params.agent_id)  # the only sleep on the response path
        lock = self.agent_lock(params.agent_id)
        lock.acquire()
        try:
            if params.restore and params.snapshot_id is None:
                snap = self.snapshot(params)  # re-read under the lock: a sleep may have just committed
            window = list(snap.window) if snap is not None else []
            if len(window) + incoming > self.L + 1:
                raise WindowOverflow(
                    f"snapshot {snap.record.id if snap else None} holds {len(window)} window tokens; with this "
                    f"input ({incoming} tokens incl. max_tokens) it exceeds the window L={self.L}; revive it and sleep "
                    "first"
                )
            out = {k: v for k, v in body.items() if k not in ("kv_transfer_params", "prompt")}
            out["prompt"] = [self.model.config.bos_token_id, *window, *ids]
            out["kv_transfer_params"] = {
                "agent_id": params.agent_id,
                "snapshot_id": snap.record.id if snap is not None else None,
                "restore": snap is not None,
                "save": True,
            }
            return Turn(params.agent_id, out, lock)
        except BaseException:
            lock.release()
            raise

    def _must_sleep(self, window_tokens: int, incoming: int) -> bool:
        limit = min(self.policy.window, self.L) + 1
        return window_tokens > 0 and window_tokens + incoming > limit

    def finish(self, turn: Turn, status: int, response: dict[str, Any] | None) -> None:
        """After vLLM answered: release the agent and let the scheduler plan a background sleep."""
        try:
            kv = (response or {}).get("kv_transfer_params") or {}
            window_tokens = kv.get("window_tokens") if status == 200 else None
            self.scheduler.turn_finished(turn.agent_id, window_tokens=window_tokens)
        finally:
            turn.lock.release()

    # ------------------------------------------------------------------ sleeping (scheduler worker threads)

    def _sleep_job(self, request: SleepRequest) -> SleepOutcome:
        """Consolidate the agent's window (from its current snapshot) with N passes; save (S', carried tokens)."""
        agent_id = request.agent_id
        with self.agent_lock(agent_id):
            snap = self.store.latest(agent_id, fingerprint=self.model.fingerprint)
            window = list(snap.window)
            if not window:
                return SleepOutcome(snapshot_id=snap.record.id, passes=0, tokens=0)
            n = min(len(window), self.L)  # a window of L + 1 holds one waiting reply token: it opens the next one
            tokens = torch.tensor([window[:n]], dtype=torch.long, device=self.model.device)
            with torch.no_grad():
                state = self.model.sleep(tokens, snap.state.to(self.model.device), request.passes).to("cpu")
            meta = dict(snap.record.meta)
            rec = self.store.save(
                agent_id,
                state,
                window[n:],
                reason="sleep",
                passes=request.passes,
                tokens_consolidated=snap.record.tokens_consolidated + n,
                parent_id=snap.record.id,
                metadata={**meta, "engine": "vllm-server", "sleep_count": int(meta.get("sleep_count", 0)) + 1},
            )
        logger.info("agent %r slept: %d tokens, N=%d -> snapshot %s", agent_id, n, request.passes, rec.id)
        return SleepOutcome(snapshot_id=rec.id, passes=request.passes, tokens=n)


# ---------------------------------------------------------------------------------------------------- ASGI


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_length(scope: Scope, body: bytes) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers}


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AgentMemoryMiddleware:
    """ASGI middleware for vLLM's API server (``--middleware agentsleep.serving.server.AgentMemoryMiddleware``)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        try:
            settings = ServeSettings()  # type: ignore[call-arg]  # from the environment
        except ValidationError as e:
            raise ConfigError(
                f"AgentMemoryMiddleware is configured by {SERVE_ENV_PREFIX}* environment variables, which "
                f"`agentsleep serve` sets ({SERVE_ENV_PREFIX}CHECKPOINT is required): {e}"
            ) from e
        model = reference_model(settings.checkpoint)
        tok = settings.checkpoint / TOKENIZER_FILE
        codec = TextCodec.from_file(tok) if tok.is_file() else None
        # The checkpoint's L and N unless the environment says otherwise (SleepPolicy.from_env lets arguments win).
        defaults = {"window": model.config.window, "passes": model.config.passes}
        unset = {k: v for k, v in defaults.items() if f"{POLICY_ENV_PREFIX}{k.upper()}" not in os.environ}
        policy = SleepPolicy.from_env(**unset)
        store = SnapshotStore(settings.store_url, blob_dir=settings.blob_dir)
        self.turns = AgentTurns(model, store, codec, policy, sleep_workers=settings.sleep_workers)
        logger.info("agent memory on %s (L=%d, N=%d, store %s)", settings.checkpoint, model.config.window,
                    policy.passes, store.url)  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path != AGENT_PATH and path not in OTHER_PATHS:
            return await self.app(scope, receive, send)
        try:
            raw = await _read_body(receive)
        except ConnectionError:
            return None
        try:
            body = json.loads(raw) if raw else None
            params = AgentParams.parse(body.get("kv_transfer_params")) if isinstance(body, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return await self.app(scope, _replay(raw, receive), send)  # vLLM answers malformed JSON itself
        except InvalidInput as e:
            return await _send_json(send, 400, http_error(e).body())
        if params is None:
            return await self.app(scope, _replay(raw, receive), send)
        if path != AGENT_PATH:
            err = HTTPError(400, f"agent requests go to {AGENT_PATH} (the prompt is the agent's new input)",
                            "InvalidInput", "kv_transfer_params")  # fmt: skip
            return await _send_json(send, 400, err.body())
        async with self.turns.request_lock(params.agent_id):
            try:
                turn = await asyncio.to_thread(self.turns.prepare, params, body)
            except Exception as e:
                if not isinstance(e, AgentSleepError):
                    logger.exception("agent request of %r failed before reaching vLLM", params.agent_id)
                err = http_error(e)
                return await _send_json(send, err.status, err.body())
            status, response = 500, None
            try:
                status, response = await self._forward(scope, receive, send, turn)
            finally:
                await asyncio.to_thread(self.turns.finish, turn, status, response)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, turn: Turn) -> tuple[int, dict | None]:
        """Run the rewritten request through vLLM, buffering the answer to check and report it."""
        body = json.dumps(turn.body).encode()
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(msg: Message) -> None:
            nonlocal start
            if msg["type"] == "http.response.start":
                start = msg
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self.app(_with_length(scope, body), _replay(body, receive), capture)
        payload = b"".join(chunks)
        status = int(start["status"]) if start is not None else 500
        response = None
        try:
            response = json.loads(payload) if payload else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            response = None
        kv = (response or {}).get("kv_transfer_params") if isinstance(response, dict) else None
        if status == 200 and isinstance(kv, dict) and kv.get("error"):
            # The reply was computed from the wrong state (or not saved): do not hand it out as the agent's answer.
            err = HTTPError(500, f"agent {turn.agent_id!r}: {kv['error']}", "EngineError", "kv_transfer_params")
            await _send_json(send, 500, err.body())
            return 500, None
        headers = [(k, v) for k, v in (start or {}).get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return status, response if isinstance(response, dict) else None


__all__ = [
    "AGENT_PATH",
    "SERVE_ENV_PREFIX",
    "AgentMemoryMiddleware",
    "AgentTurns",
    "HTTPError",
    "ServeSettings",
    "Turn",
    "http_error",
]
