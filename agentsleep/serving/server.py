"""The agent layer of ``agentsleep serve``: an ASGI middleware inside vLLM's own OpenAI-compatible API server.

vLLM's server (``python -m vllm.entrypoints.openai.api_server``) runs the model and the fast-weight connector; this
middleware (``--middleware agentsleep.serving.server.AgentMemoryMiddleware``) turns a completion request that names
an agent into one window of that agent, and owns the agent's memory between requests:

1. ``POST /v1/completions`` with top-level ``"kv_transfer_params": {"agent_id": ...}`` (docs/serving.md). The
   ``prompt`` (text or token ids) is the agent's *new input*, not its history. A server started for agents refuses
   every other generating request with 400 (``--allow-stateless`` lets them through to plain vLLM).
2. The agent's memory comes from this host's resident copy when the store's current snapshot id (one indexed read)
   still names it; otherwise (another host or a sleep moved the agent on) from the store. Unknown agent → 404, a
   snapshot of another model → 409.
3. If the input and ``max_tokens`` do not fit beside the window, the agent sleeps first (`SleepScheduler.sleep_now`,
   the only sleep on the response path).
4. The request goes to vLLM as ``prompt = [BOS] + window + input`` (token ids); the connector restores S into the
   window header (computed once per S, resident in the engine).
5. When vLLM's answer is complete — whatever ended it: length, EOS, a stop string — the turn is saved as (S, window +
   input + reply) with a compare-and-set on the snapshot the turn started from, in a worker thread (the engine loop
   and the event loop stay free), and only then is the reply sent, with ``kv_transfer_params`` reporting the new
   snapshot. A stream sends its tokens as they come and holds the final ``[DONE]`` until the save is durable.
6. A lost compare-and-set (another host saved a turn of the same agent meanwhile) re-runs the turn on the agent's new
   memory, up to ``conflict_retries`` times, then answers 409; a stream cannot be re-run and ends with a 409 error
   event. An acknowledged turn is therefore always in the agent's lineage, and a refused one never is.
7. An optional ``turn_id`` makes a turn idempotent: a repeated id returns the stored reply and saves nothing.

Requests of one agent are served one at a time per host; a background sleep and a request of the same agent exclude
each other. Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) and never stop the
server. Configuration: ``AGENTSLEEP_SERVE_*`` environment variables (`ServeSettings`, set by ``agentsleep serve``);
the sleep policy: ``AGENTSLEEP_SLEEP_*`` (`SleepPolicy.from_env`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentsleep.errors import (
    AgentSleepError,
    ConfigError,
    InvalidInput,
    SleepFailed,
    SnapshotConflict,
    SnapshotCorrupt,
    SnapshotMismatch,
    StoreError,
    UnknownAgent,
    UnknownSnapshot,
    WindowOverflow,
)
from agentsleep.memory.policy import ENV_PREFIX as POLICY_ENV_PREFIX
from agentsleep.memory.policy import SleepPolicy
from agentsleep.runtime.text import TOKENIZER_FILE, TextCodec
from agentsleep.serving.params import FIELD, AgentParams
from agentsleep.serving.reference import reference_model
from agentsleep.serving.turns import AgentTurns, Turn
from agentsleep.store import SnapshotRecord, SnapshotStore

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

SERVE_ENV_PREFIX = "AGENTSLEEP_SERVE_"
AGENT_PATH = "/v1/completions"
AGENT_ONLY_PATHS = ("/v1/chat/completions", "/v1/responses")  # agent fields there: "use /v1/completions"
HARMLESS_POSTS = ("/tokenize", "/detokenize")  # served without an agent even when stateless requests are refused


class ServeSettings(BaseSettings):
    """What the middleware needs to know (``AGENTSLEEP_SERVE_<FIELD>``; written by ``agentsleep serve``)."""

    model_config = SettingsConfigDict(env_prefix=SERVE_ENV_PREFIX, extra="ignore")

    checkpoint: Path
    store_url: str = "sqlite:///agentsleep.db"
    blob_dir: str | None = None
    sleep_workers: int = 1
    allow_stateless: bool = False  # let requests without an agent through to plain vLLM
    resident_agents: int = 256  # agents whose memory (S + window) this host keeps between turns
    conflict_retries: int = 3  # re-runs of a turn whose compare-and-set lost to another host


class HTTPError(Exception):
    """An error to answer with, OpenAI style."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()


def http_error(e: BaseException) -> HTTPError:
    """Map an agentsleep error to its HTTP status."""
    if isinstance(e, HTTPError):
        return e
    msg = str(e)
    if isinstance(e, UnknownAgent | UnknownSnapshot):
        return HTTPError(404, msg, type(e).__name__, FIELD)
    if isinstance(e, SnapshotMismatch):
        return HTTPError(409, msg, type(e).__name__, f"{FIELD}.snapshot_id")
    if isinstance(e, SnapshotConflict):
        return HTTPError(409, msg, type(e).__name__, f"{FIELD}.agent_id")
    if isinstance(e, WindowOverflow):
        return HTTPError(400, msg, type(e).__name__, "prompt")
    if isinstance(e, InvalidInput):
        return HTTPError(400, msg, type(e).__name__, None)
    if isinstance(e, SnapshotCorrupt):
        return HTTPError(500, msg, type(e).__name__, None)
    if isinstance(e, SleepFailed | StoreError):
        return HTTPError(503, msg, type(e).__name__, None)
    if isinstance(e, AgentSleepError):
        return HTTPError(500, msg, type(e).__name__, None)
    return HTTPError(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError", None)


# ---------------------------------------------------------------------------------------------------- ASGI plumbing


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


async def _send_json(send: Send, status: int, payload: dict[str, Any] | bytes) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _no_agent_message(body: Any) -> str:
    msg = (
        f"this server serves agents: send {AGENT_PATH} with {FIELD}.agent_id (see docs/serving.md), or start it "
        "with --allow-stateless to serve requests without memory"
    )
    if isinstance(body, dict):
        if "agent_id" in body:
            msg += f"; agent_id goes inside {FIELD}, not at the top level"
        near = difflib.get_close_matches(FIELD, [k for k in body if isinstance(k, str)], n=1)
        if near and near[0] != FIELD:
            msg += f"; did you mean {FIELD!r} instead of {near[0]!r}?"
    return msg


@dataclass
class _Outcome:
    """What vLLM answered to one turn attempt."""

    status: int = 500
    reply_ids: list[int] = field(default_factory=list)
    reply: dict[str, Any] = field(default_factory=dict)  # text, finish_reason, stop_reason
    restored: bool | None = None  # the connector's report (None: not reported)
    error: str | None = None  # why the answer cannot be the agent's reply


class AgentMemoryMiddleware:
    """ASGI middleware for vLLM's API server (``--middleware agentsleep.serving.server.AgentMemoryMiddleware``)."""

    def __init__(self, app: App) -> None:
        self.app = app
        try:
            settings = ServeSettings()  # type: ignore[call-arg]  # from the environment
        except ValidationError as e:
            raise ConfigError(
                f"AgentMemoryMiddleware is configured by {SERVE_ENV_PREFIX}* environment variables, which "
                f"`agentsleep serve` sets ({SERVE_ENV_PREFIX}CHECKPOINT is required): {e}"
            ) from e
        self.settings = settings
        model = reference_model(settings.checkpoint)  # the model the connector's `model_fingerprint` reads, too
        tok = settings.checkpoint / TOKENIZER_FILE
        codec = TextCodec.from_file(tok) if tok.is_file() else None
        # The checkpoint's L and N unless the environment says otherwise (SleepPolicy.from_env lets arguments win).
        defaults = {"window": model.config.window, "passes": model.config.passes}
        unset = {k: v for k, v in defaults.items() if f"{POLICY_ENV_PREFIX}{k.upper()}" not in os.environ}
        policy = SleepPolicy.from_env(**unset)
        store = SnapshotStore(settings.store_url, blob_dir=settings.blob_dir)
        self.turns = AgentTurns(model, store, codec, policy, sleep_workers=settings.sleep_workers,
                                resident_agents=settings.resident_agents)  # fmt: skip
        # Plans and saves block on the store; threads of their own keep them off the event loop (and vLLM's engine
        # loop runs in its own process), out of the way of vLLM's use of the default executor. SQLite takes one
        # writer at a time and makes the others poll with growing sleeps (up to 100 ms), so on SQLite this host's
        # saves queue on one writer thread instead; Postgres locks per agent row and writes in parallel.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="agentsleep-turn")
        self._writer = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentsleep-save")
            if store.dialect == "sqlite"
            else self._pool
        )
        logger.info(
            "agent memory on %s (L=%d, N=%d, store %s%s)",
            settings.checkpoint,
            model.config.window,
            policy.passes,
            store.url,
            ", stateless requests allowed" if settings.allow_stateless else "",
        )

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _save(self, turn: Turn, out: _Outcome) -> SnapshotRecord:
        """The turn's save, written behind on a store thread; the caller awaits it before acknowledging the turn."""
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, self.turns.commit, turn, out.reply_ids, out.reply
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        try:
            raw = await _read_body(receive)
        except ConnectionError:
            return None
        try:
            body = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        kv = body.get(FIELD) if isinstance(body, dict) else None
        if path == AGENT_PATH and isinstance(body, dict) and kv is not None:
            try:
                params = AgentParams.parse(kv)
            except InvalidInput as e:
                return await _send_json(send, 400, http_error(e).body())
            return await self._turn(scope, receive, send, params, body)
        if path in AGENT_ONLY_PATHS and kv is not None:
            err = HTTPError(400, f"agent requests go to {AGENT_PATH} (the prompt is the agent's new input)",
                            "InvalidInput", FIELD)  # fmt: skip
            return await _send_json(send, 400, err.body())
        if self.settings.allow_stateless or path in HARMLESS_POSTS:
            return await self.app(scope, _replay(raw, receive), send)
        return await _send_json(send, 400, HTTPError(400, _no_agent_message(body), "InvalidInput", FIELD).body())

    # ------------------------------------------------------------------ one agent turn

    async def _turn(self, scope: Scope, receive: Receive, send: Send, params: AgentParams, body: dict) -> None:
        turns = self.turns
        try:
            ids, max_tokens = turns.check(body)
        except AgentSleepError as e:
            return await _send_json(send, 400, http_error(e).body())
        stream = bool(body.get("stream"))
        attempts = 1 + (0 if stream else max(0, self.settings.conflict_retries))
        async with turns.request_lock(params.agent_id):
            for attempt in range(1, attempts + 1):
                try:
                    turn = await self._run(turns.plan, params, body, ids, max_tokens)
                except Exception as e:
                    if not isinstance(e, AgentSleepError):
                        logger.exception("agent request of %r failed before reaching vLLM", params.agent_id)
                    return await _send_json(send, http_error(e).status, http_error(e).body())
                window_tokens: int | None = None
                try:
                    if turn.replay is not None:
                        return await self._send_replay(send, turn, body, stream)
                    if stream:
                        window_tokens = await self._stream(scope, receive, send, turn, body)
                        return None
                    again, window_tokens = await self._complete(scope, receive, send, turn, body, attempt, attempts)
                    if not again:
                        return None
                finally:
                    turns.release(turn, window_tokens)
        return None

    def _report(self, turn: Turn, rec: SnapshotRecord, attempt: int) -> dict[str, Any]:
        """The reply's ``kv_transfer_params``: where the turn started, what it saved."""
        out: dict[str, Any] = {
            "agent_id": turn.agent_id,
            "snapshot_id": rec.id,
            "restored_from": turn.base.record.id if turn.base is not None else None,
            "window_tokens": rec.window_len,
            "replayed": False,
            "attempts": attempt,
        }
        if turn.params.turn_id is not None:
            out["turn_id"] = turn.params.turn_id
        return out

    async def _call(self, scope: Scope, receive: Receive, turn: Turn, on_event: Callable[..., Awaitable[None]]) -> None:
        data = json.dumps(turn.body).encode()
        await self.app(_with_length(scope, data), _replay(data, receive), on_event)

    def _check_connector(self, turn: Turn, out: _Outcome) -> None:
        """A reply computed from the wrong state is not the agent's: the restore must have happened as planned."""
        if out.error is None and turn.base is not None and out.restored is not True:
            out.error = "the agent's state was not restored into the request (see the server log)"

    async def _complete(
        self, scope: Scope, receive: Receive, send: Send, turn: Turn, body: dict, attempt: int, attempts: int
    ) -> tuple[bool, int | None]:
        """A non-streamed turn: vLLM's whole answer, the save, then the reply. Returns (run again, window tokens)."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(msg: Message) -> None:
            nonlocal start
            if msg["type"] == "http.response.start":
                start = msg
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self._call(scope, receive, turn, capture)
        payload = b"".join(chunks)
        status = int(start["status"]) if start is not None else 500
        if status != 200:  # vLLM's own error (bad sampling parameters, client gone, ...): nothing to save
            headers = [(k, v) for k, v in (start or {}).get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return False, None
        out = _Outcome(status=status)
        try:
            response = json.loads(payload)
            choice = response["choices"][0]
            out.reply_ids = [int(t) for t in choice["token_ids"]]
            out.reply = {k: choice.get(k) for k in ("text", "finish_reason", "stop_reason")}
            # The connector's report is missing when vLLM's front end ended the request (a stop string); the
            # restore also shows as the one cached prompt token (the header), which is always reported.
            kv = response.get(FIELD) or {}
            details = (response.get("usage") or {}).get("prompt_tokens_details") or {}
            out.restored = kv.get("restored", details.get("cached_tokens") == 1)
            out.error = kv.get("error")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            response, out.error = {}, f"unreadable answer from vLLM ({type(e).__name__}: {e})"
        self._check_connector(turn, out)
        if out.error is not None:
            err = HTTPError(500, f"agent {turn.agent_id!r}: {out.error}; nothing was saved", "EngineError", FIELD)
            await _send_json(send, 500, err.body())
            return False, None
        try:
            rec = await self._save(turn, out)
        except SnapshotConflict as e:
            if attempt < attempts:
                logger.info("agent %r: turn lost its compare-and-set (attempt %d/%d); re-running it on the new "
                            "memory", turn.agent_id, attempt, attempts)  # fmt: skip
                return True, None
            err = HTTPError(409, f"agent {turn.agent_id!r} is being changed by another host: {e} (tried {attempts} "
                            "times; retry the turn)", "SnapshotConflict", f"{FIELD}.agent_id")  # fmt: skip
            await _send_json(send, 409, err.body())
            return False, None
        except Exception as e:
            logger.exception("agent %r: saving the turn failed", turn.agent_id)
            await _send_json(send, http_error(e).status, http_error(e).body())
            return False, None
        response[FIELD] = self._report(turn, rec, attempt)
        if not body.get("return_token_ids"):
            for c in response.get("choices", []):
                c.pop("token_ids", None)
                c.pop("prompt_token_ids", None)
        else:
            for c in response.get("choices", []):
                c["prompt_token_ids"] = turn.input_ids  # the agent's input, not the composed window
        await _send_json(send, 200, response)
        return False, rec.window_len

    async def _stream(self, scope: Scope, receive: Receive, send: Send, turn: Turn, body: dict) -> int | None:
        """A streamed turn: vLLM's events go to the client as they come (token ids and the usage chunk this server
        asked for are taken out unless the client asked too); the final ``[DONE]`` waits for the save. Returns the
        saved window's size, or None when nothing was saved."""
        want_ids = bool(body.get("return_token_ids"))
        want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        out = _Outcome()
        state = {"started": False, "done": False, "finish": None, "cached": None, "failed": False}
        buf = bytearray()
        meta: dict[str, Any] = {}

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def on_event(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                out.status = int(msg["status"])
                state["started"] = True
                await send(msg)
                return
            if msg["type"] != "http.response.body":
                return
            if out.status != 200:
                await send(msg)  # vLLM's error answer, passed through
                return
            buf.extend(msg.get("body", b""))
            while (end := buf.find(b"\n\n")) >= 0:
                event = bytes(buf[: end + 2])
                del buf[: end + 2]
                await handle(event)

        async def handle(event: bytes) -> None:
            data = event.strip()
            if not data.startswith(b"data:"):
                return await emit(event)
            data = data[5:].strip()
            if data == b"[DONE]":
                state["done"] = True
                return None  # held until the turn is saved
            try:
                obj = json.loads(data)
            except ValueError:
                return await emit(event)
            if "error" in obj:
                state["failed"] = True
                return await emit(event)
            meta.update({k: obj[k] for k in ("id", "created", "model") if k in obj})
            choices = obj.get("choices") or []
            if not choices:  # the usage chunk: the connector's restore shows as one cached prompt token
                details = (obj.get("usage") or {}).get("prompt_tokens_details") or {}
                state["cached"] = details.get("cached_tokens")
                return await emit(event) if want_usage else None
            for c in choices:
                out.reply_ids.extend(int(t) for t in c.get("token_ids") or [])
                out.reply["text"] = out.reply.get("text", "") + (c.get("text") or "")
                if c.get("finish_reason") is not None:
                    state["finish"] = c["finish_reason"]
                    out.reply.update(finish_reason=c["finish_reason"], stop_reason=c.get("stop_reason"))
                if not want_ids:
                    c.pop("token_ids", None)
                    c.pop("prompt_token_ids", None)
                elif c.get("prompt_token_ids") is not None:
                    c["prompt_token_ids"] = turn.input_ids
            return await emit(_sse(obj))

        await self._call(scope, receive, turn, on_event)
        if not state["started"] or out.status != 200:
            if state["started"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return None
        if state["failed"] or not state["done"] or state["finish"] is None:
            # vLLM reported an error, or the stream was cut (client gone): not a complete turn, nothing saved
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return None
        out.restored = state["cached"] == 1 if turn.base is not None else None
        self._check_connector(turn, out)
        rec: SnapshotRecord | None = None
        error: HTTPError | None = None
        if out.error is not None:
            error = HTTPError(500, f"agent {turn.agent_id!r}: {out.error}; nothing was saved", "EngineError", FIELD)
        else:
            try:
                rec = await self._save(turn, out)
            except SnapshotConflict as e:
                error = HTTPError(
                    409,
                    f"agent {turn.agent_id!r} was changed by another host during this stream: "
                    f"{e}; nothing was saved, retry the turn",
                    "SnapshotConflict",
                    f"{FIELD}.agent_id",
                )
            except Exception as e:
                logger.exception("agent %r: saving the streamed turn failed", turn.agent_id)
                error = http_error(e)
        if error is not None:
            await emit(_sse(error.payload()))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return None
        assert rec is not None
        final = {**meta, "object": "text_completion", "choices": [], FIELD: self._report(turn, rec, 1)}
        await emit(_sse(final))
        await send({"type": "http.response.body", "body": _sse("[DONE]"), "more_body": False})
        return rec.window_len

    async def _send_replay(self, send: Send, turn: Turn, body: dict, stream: bool) -> None:
        """A repeated turn id: the stored reply, as it was first sent (nothing is run or saved)."""
        rec = turn.replay
        assert rec is not None
        stored = rec.meta.get("turn") or {}
        report = {
            "agent_id": turn.agent_id,
            "snapshot_id": rec.id,
            "restored_from": rec.parent_id,
            "window_tokens": rec.window_len,
            "replayed": True,
            "attempts": 0,
            "turn_id": turn.params.turn_id,
        }
        choice: dict[str, Any] = {
            "index": 0,
            "text": stored.get("text") or "",
            "logprobs": None,
            "finish_reason": stored.get("finish_reason"),
            "stop_reason": stored.get("stop_reason"),
        }
        if body.get("return_token_ids"):
            choice["token_ids"] = list(stored.get("token_ids") or [])
            choice["prompt_token_ids"] = turn.input_ids
        head = {"id": f"cmpl-replay-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model")}  # fmt: skip
        n_out = len(stored.get("token_ids") or [])
        usage = {"prompt_tokens": len(turn.input_ids), "completion_tokens": n_out,
                 "total_tokens": len(turn.input_ids) + n_out}  # fmt: skip
        if not stream:
            return await _send_json(send, 200, {**head, "choices": [choice], "usage": usage, FIELD: report})
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        events = [_sse({**head, "choices": [choice]})]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(_sse({**head, "choices": [], "usage": usage}))
        events += [_sse({**head, "choices": [], FIELD: report}), _sse("[DONE]")]
        await send({"type": "http.response.body", "body": b"".join(events), "more_body": False})


__all__ = ["AGENT_PATH", "SERVE_ENV_PREFIX", "AgentMemoryMiddleware", "HTTPError", "ServeSettings", "http_error"]
