"""`ChatSleepHybrid`: a LangChain chat model over an agentsleep `Engine` (the embedded `TorchEngine` or vLLM).

What the model sees on each call is exactly **the agent's fast weights S + the messages it is given**, rendered with
the checkpoint's chat template (`ChatCodec`). Used under `SleepMemory`, the messages it is given are those since the
agent's last sleep, so a call sees S + the messages since the last sleep.

The engine keeps, per agent, the tokens of its current window. A call renders its messages to token ids and checks
them against that window:

* the window is a prefix of the rendered prompt (the usual case: the previous call left exactly the earlier messages
  and its reply there) → only the new tokens are observed, once;
* anything else (the history was edited or summarised, another model wrote the replies, a fresh agent) → the window
  is reset to S (the state it started from) and the whole prompt is observed.

After generating, the reply's end-of-message tokens are appended if the model did not emit them, and anything past
a stop string is rolled back, so the window again holds exactly ``render(messages + [reply])``. The reply records its
token ids (``response_metadata["agentsleep"]["token_ids"]``) so the next call renders it to the very same tokens.
A call never lets the engine sleep by itself: its reply is capped to the room left in the window, and a prompt that
does not fit raises `WindowOverflow` (`SleepMemory` sleeps before that can happen).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import tokenizers
from agentsleep.errors import ConfigError, WindowOverflow
from agentsleep.runtime.engine import AgentMemory, Engine, SamplingParams
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from langchain_agentsleep import _window
from langchain_agentsleep.chat_template import METADATA_KEY, ChatCodec, ChatTemplate, content_digest, load_tokenizer
from langchain_agentsleep.errors import MessageTooLong

logger = logging.getLogger(__name__)

_DEFAULT_MAX_TOKENS = 32
_EPHEMERAL_PREFIX = "ephemeral-"  # agents made for a call without an agent id, removed after it
_IGNORED_KWARGS = ("snapshot_id", "tools", "ls_structured_output_format", "stream", "model")
_HONEST_TOOL_CHOICES = (None, "auto", "none")  # the hybrid never calls a tool, which both of these allow
LLM_TYPE = "chat-agentsleep"
PROVIDER = "agentsleep"
NO_TOOL_CALLS = (
    "the sleep hybrid cannot call tools yet (its chat template has no tool-call format); tool_choice={!r} would "
    "force a tool call it cannot make. Leave tool_choice unset (tools are accepted and never called) or use another "
    "model for tool calling"
)
NO_STRUCTURED_OUTPUT = (
    "ChatSleepHybrid has no structured output: the hybrid cannot call tools or follow a JSON schema yet. Parse its "
    "text reply yourself, or use another model for the structured step"
)


@dataclass(frozen=True, slots=True)
class _Reply:
    """One completed call, before it becomes an `AIMessage`."""

    message_id: str
    agent_id: str | None
    body: list[int]  # the reply's content tokens (the end-of-message token excluded)
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int  # the whole context of this call, excluding S
    generated_tokens: int
    observed_tokens: int  # prompt tokens that actually ran (the rest were in the window already)
    window_tokens: int  # the window after the call
    resynced: bool  # the window did not match the messages and was rebuilt from S
    sleep_count: int
    fingerprint: str

    def metadata(self, model_name: str) -> dict[str, Any]:
        return {
            "model_name": model_name,
            "model_provider": PROVIDER,
            "finish_reason": self.finish_reason,
            METADATA_KEY: {
                "agent_id": self.agent_id,
                "token_ids": list(self.body),
                "digest": content_digest(self.text),
                "fingerprint": self.fingerprint,
                "window_tokens": self.window_tokens,
                "observed_tokens": self.observed_tokens,
                "resynced": self.resynced,
                "sleep_count": self.sleep_count,
            },
        }

    def usage(self) -> UsageMetadata:
        return UsageMetadata(
            input_tokens=self.prompt_tokens,
            output_tokens=self.generated_tokens,
            total_tokens=self.prompt_tokens + self.generated_tokens,
        )


class ChatSleepHybrid(BaseChatModel):
    """Chat model for the sleep hybrid, served by an agentsleep `Engine`.

    Example:
        .. code-block:: python

            from langchain_agentsleep import ChatSleepHybrid

            model = ChatSleepHybrid(model="checkpoints/gsm-qlast-n2", max_tokens=4)  # an embedded TorchEngine
            model.invoke("V042 = 5 ; Q V042 ; A")  # a throw-away agent: zero S + this message
            model.invoke("V042 = 5 ;", agent_id="alice")  # agent "alice": its S + its window + this message

    ``model`` is the checkpoint directory (it also names the model in traces: ``model_name``, ``ls_model_name``);
    ``engine=`` takes an engine you built instead (a `TorchEngine` with other settings, or vLLM's `VLLMEngine`).
    Unknown keyword arguments are refused (`ConfigError`), as are ``tool_choice`` values that force a tool call and
    ``with_structured_output`` (`NotImplementedError`): the hybrid cannot call tools yet.

    The agent comes from the call's ``agent_id`` keyword (`SleepMemory` binds it per thread through
    ``model_settings``), else from the ``agent_id`` field; with neither, the call runs on a throw-away agent (zero
    fast weights) that is removed afterwards. Calls on one agent are serialised.

    Decoding is greedy unless ``temperature > 0``. ``stop`` strings cut the reply (the window is rolled back to the
    cut); a single-token end-of-message suffix of the chat template stops generation. A message that cannot fit the
    window even alone raises `MessageTooLong` (with its token count) before anything runs.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)

    engine: Any = Field(
        default=None, exclude=True, description="the agentsleep Engine (TorchEngine, VLLMEngine, ...); default: built "
        "from ``model``"
    )  # fmt: skip
    model_name: str | None = Field(
        default=None,
        alias="model",
        description="the checkpoint directory; without ``engine`` an embedded TorchEngine is loaded from it. Default "
        "(engine given): the engine's checkpoint path, else agentsleep-hybrid-<fingerprint>",
    )
    agent_id: str | None = Field(default=None, description="default agent; a call's agent_id keyword wins")
    max_tokens: int = Field(default=_DEFAULT_MAX_TOKENS, ge=1, description="reply tokens at most (capped to the room)")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, description="seed of each call's sampler (temperature > 0)")
    stop: list[str] | None = Field(default=None, description="default stop strings (a call's stop wins)")
    timeout: float | None = Field(
        default=None, gt=0, description="LangChain's standard parameter; the embedded engine makes no network call"
    )
    max_retries: int = Field(
        default=0, ge=0, description="LangChain's standard parameter; the embedded engine makes no network call"
    )
    chat_template: ChatTemplate | None = Field(default=None, description="default: the checkpoint's or the tokenizer's")
    tokenizer: Any = Field(default=None, exclude=True, description="tokenizers.Tokenizer or a tokenizer.json path")
    streaming: bool = False
    cache: Any = False  # replies depend on the agent's memory, never on the prompt alone: never cache them

    _codec: ChatCodec = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one error type for users, as everywhere in agentsleep (still a ValueError)
            raise ConfigError(f"invalid ChatSleepHybrid settings: {_validation_summary(e)}") from e

    @model_validator(mode="before")
    @classmethod
    def _load_checkpoint(cls, data: Any) -> Any:
        """``model="path/to/checkpoint"`` without an engine: an embedded `TorchEngine` on that checkpoint."""
        if not isinstance(data, dict) or data.get("engine") is not None:
            return data
        path = data.get("model", data.get("model_name"))
        if path is None:
            raise ConfigError(
                "ChatSleepHybrid needs a checkpoint: ChatSleepHybrid(model='path/to/checkpoint') (an embedded "
                "TorchEngine), or engine=... (a TorchEngine or VLLMEngine you built)"
            )
        if not isinstance(path, str | os.PathLike) or not Path(path).is_dir():
            raise ConfigError(
                f"model={path!r} is not a checkpoint directory (config.json, model.safetensors, tokenizer.json); "
                "pass the directory, or engine=... for an engine you built"
            )
        from agentsleep.runtime.torch_engine import TorchEngine

        data = {**data, "engine": TorchEngine.from_pretrained(path)}
        data.pop("model_name", None)
        data["model"] = os.fspath(path)
        if data.get("tokenizer") is None:
            data["tokenizer"] = load_tokenizer(path)
        if data.get("chat_template") is None:
            data["chat_template"] = ChatTemplate.from_pretrained(Path(path), data["tokenizer"])
        return data

    @model_validator(mode="after")
    def _bind(self) -> Self:
        if not isinstance(self.engine, Engine):
            raise ConfigError(f"engine must implement agentsleep's Engine protocol, got {type(self.engine).__name__}")
        tok = _find_tokenizer(self.engine, self.tokenizer)
        template = self.chat_template or _engine_template(self.engine, tok)
        self._codec = ChatCodec(tok, template, fingerprint=self.engine.fingerprint)
        if self.model_name is None:
            path = getattr(self.engine, "path", None)
            named = isinstance(path, str | os.PathLike)
            self.model_name = os.fspath(path) if named else f"agentsleep-hybrid-{self.engine.fingerprint[:12]}"
        return self

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        passes: int | None = None,
        device: str = "cpu",
        **kwargs: Any,
    ) -> ChatSleepHybrid:
        """An embedded `TorchEngine` on a checkpoint directory, with the checkpoint's tokenizer and chat template.

        ``ChatSleepHybrid(model=path)`` is the same with the checkpoint's own N and the CPU.

        Args:
            path: the checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``).
            passes: default N for sleeps (default: the checkpoint's).
            device: torch device.
            **kwargs: other fields (``max_tokens``, ``agent_id``, ...).
        """
        from agentsleep.runtime.torch_engine import TorchEngine

        engine = TorchEngine.from_pretrained(path, passes=passes, device=device)
        tok = load_tokenizer(path)
        kwargs.setdefault("chat_template", ChatTemplate.from_pretrained(Path(path), tok))
        kwargs.setdefault("model", os.fspath(path))
        return cls(engine=engine, tokenizer=tok, **kwargs)

    # ------------------------------------------------------------------ LangChain surface

    @property
    def _llm_type(self) -> str:
        return LLM_TYPE

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "fingerprint": self.engine.fingerprint,
            "window": self.engine.window,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _resolve_model_profile(self) -> ModelProfile | None:
        window = int(self.engine.window)
        return ModelProfile(
            max_input_tokens=window,
            max_output_tokens=window,
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            tool_calling=False,
            structured_output=False,
        )

    @property
    def codec(self) -> ChatCodec:
        """The chat template bound to the checkpoint's tokenizer (also an exact LangChain ``TokenCounter``)."""
        return self._codec

    @property
    def window(self) -> int:
        """L: tokens the model attends to on a call (its messages + reply), on top of its fast weights."""
        return int(self.engine.window)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the checkpoint's tokenizer."""
        return self._codec.encode(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Exact window tokens of ``messages`` (tools are never shown to the model, so they count zero)."""
        return self._codec.count(messages)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Accept tools so `create_agent` can bind them (the hybrid cannot call them).

        ``profile["tool_calling"]`` is False and the tools are not rendered into the window. Other keyword arguments
        (``agent_id``...) are bound like ``bind``'s.

        Raises:
            NotImplementedError: ``tool_choice`` asks for a tool call (``"any"``, ``"required"``, a tool's name).
        """
        _check_tool_choice(tool_choice)
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        """Not supported: always raises `NotImplementedError` (the hybrid cannot call tools or follow a schema yet)."""
        raise NotImplementedError(NO_STRUCTURED_OUTPUT)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        reply = self._reply(messages, stop, kwargs)
        message = AIMessage(
            content=reply.text,
            id=reply.message_id,
            response_metadata=reply.metadata(str(self.model_name)),
            usage_metadata=reply.usage(),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The engine is blocking compute: keep it off the event loop.
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        reply = self._reply(messages, stop, kwargs)
        for piece in self._pieces(reply):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece, id=reply.message_id))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                id=reply.message_id,
                response_metadata=reply.metadata(str(self.model_name)),
                usage_metadata=reply.usage(),
                chunk_position="last",
            )
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chunks = await asyncio.to_thread(lambda: list(self._stream(messages, stop, None, **kwargs)))
        for chunk in chunks:
            if run_manager is not None and chunk.message.content:
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ the call

    def _sampling(self, kwargs: dict[str, Any], room: int) -> SamplingParams:
        max_tokens = int(kwargs.pop("max_tokens", self.max_tokens))
        return SamplingParams(
            max_new_tokens=max(0, min(max_tokens, room)),
            temperature=float(kwargs.pop("temperature", self.temperature)),
            top_k=kwargs.pop("top_k", self.top_k),
            top_p=kwargs.pop("top_p", self.top_p),
            seed=kwargs.pop("seed", self.seed),
            stop_tokens=self._codec.stop_token_ids,
        )

    def _reply(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Reply:
        """Sync the agent's window with ``messages``, generate, and leave the window canonical (module docstring)."""
        kwargs = dict(kwargs)
        agent_id = kwargs.pop("agent_id", None) or self.agent_id
        _check_tool_choice(kwargs.pop("tool_choice", None))
        if stop is None:
            stop = self.stop
        for key in _IGNORED_KWARGS:
            kwargs.pop(key, None)
        codec, engine = self._codec, self.engine
        prompt = codec.prompt(messages)
        L = int(engine.window)
        room = L - len(prompt) - len(codec.end_ids)
        if room < 1:
            check_message_lengths(codec, L, messages)
            raise WindowOverflow(
                f"the prompt takes {len(prompt)} tokens (+{len(codec.end_ids)} to close the reply) but the window "
                f"holds {L}: no room for a reply. Send fewer messages since the last sleep (SleepMemory sleeps "
                "before this happens) or split the input"
            )
        sampling = self._sampling(kwargs, room)
        if kwargs:  # e.g. provider options other integrations bind (strict, parallel_tool_calls): not ours
            logger.debug("ChatSleepHybrid ignores call arguments %s", sorted(kwargs))
        ids_in_window = tuple(m.id for m in messages if m.id)
        head = 0
        for m in messages:
            if m.id:
                break
            head += len(codec.message_ids(m))

        ephemeral = agent_id is None
        agent = agent_id or f"{_EPHEMERAL_PREFIX}{uuid.uuid4().hex}"
        slot = _window.slot(engine, agent)
        with slot.lock:
            slot.ledger = None  # unknown until this call has left the window canonical
            slot.head_tokens = head
            slot.head_ids = tuple(prompt[:head])
            try:
                if not engine.has_agent(agent):
                    engine.create_agent(agent)
                window = list(engine.session(agent).window)
                resynced = False
                if len(window) >= len(prompt) or prompt[: len(window)] != window:
                    if window:
                        logger.info(
                            "agent %r: its window (%d tokens) does not match the messages; rebuilding it from S",
                            agent,
                            len(window),
                        )
                        _reset_window(engine, agent, [])
                        resynced = True
                    window = []
                delta = prompt[len(window) :]
                gen = engine.generate(agent, delta, sampling)
                out = list(gen.tokens)
                ended = bool(out) and gen.stop_reason == "stop" and out[-1] in codec.stop_token_ids
                body = out[:-1] if ended else out
                text = codec.decode(body)
                finish: Literal["stop", "length"] = "stop" if ended else "length"
                cut = _stop_cut(codec, body, text, stop)
                if cut is not None:
                    body, text = cut
                    finish = "stop"
                    _reset_window(engine, agent, prompt + body + codec.end_ids)  # roll back what followed the stop
                elif not ended and codec.end_ids:
                    engine.observe(agent, codec.end_ids)
                session = engine.session(agent)
                expected = len(prompt) + len(body) + len(codec.end_ids)
                reply_id = _new_message_id()
                if session.window_tokens == expected:
                    slot.ledger = _window.WindowLedger((*ids_in_window, reply_id), expected, head)
                else:  # not expected; the next call resyncs, and no sleep trusts this window meanwhile
                    logger.warning(
                        "agent %r: the window holds %d tokens after the call, expected %d",
                        agent,
                        session.window_tokens,
                        expected,
                    )
                return _Reply(
                    message_id=reply_id,
                    agent_id=agent_id,
                    body=body,
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=len(prompt),
                    generated_tokens=len(out),
                    observed_tokens=len(delta),
                    window_tokens=session.window_tokens,
                    resynced=resynced,
                    sleep_count=session.sleep_count,
                    fingerprint=engine.fingerprint,
                )
            finally:
                if ephemeral:
                    engine.remove_agent(agent)
                    _window.forget(engine, agent)

    def _pieces(self, reply: _Reply) -> Iterator[str]:
        """The reply's text split at token boundaries (what a token-by-token stream shows)."""
        text, done = reply.text, 0
        for k in range(1, len(reply.body) + 1):
            upto = self._codec.decode(reply.body[:k])
            if not text.startswith(upto[: len(text)]):
                break  # decoding is not monotone here (e.g. a split UTF-8 sequence): send the rest at once
            end = min(len(upto), len(text))
            if end > done:
                yield text[done:end]
                done = end
        if done < len(text):
            yield text[done:]


def _check_tool_choice(tool_choice: Any) -> None:
    if tool_choice not in _HONEST_TOOL_CHOICES:
        raise NotImplementedError(NO_TOOL_CALLS.format(tool_choice))


def message_limit(codec: ChatCodec, window: int, system: Sequence[BaseMessage] = ()) -> int:
    """The most tokens one message may have: the window less the system prompt, the reply prefix and end, one token."""
    return window - codec.count(system) - len(codec.generation_prefix) - len(codec.end_ids) - 1


def check_message_lengths(codec: ChatCodec, window: int, messages: Sequence[BaseMessage]) -> None:
    """Raise `MessageTooLong` for the first message that cannot fit the window even alone (beside the system prompt).

    Raises:
        MessageTooLong: with the message's token count and the limit.
    """
    system = [m for m in messages[:1] if m.type == "system"]
    limit = message_limit(codec, window, system)
    for m in messages[len(system) :]:
        n = len(codec.message_ids(m))
        if n > limit:
            raise MessageTooLong(
                f"a {m.type} message of {n} tokens cannot fit the model's window: at most {limit} tokens fit beside "
                f"the system prompt and a reply (L={window}). Split it into several messages that each fit (the "
                "model folds earlier ones into its fast weights by sleeping), or summarise it first",
                tokens=n,
                limit=limit,
                message_id=m.id,
            )


def _validation_summary(e: ValidationError) -> str:
    """Pydantic's errors in one line each, naming the field (unknown ones: 'extra inputs are not permitted')."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        msg = str(err.get("msg", ""))
        if err.get("type") == "extra_forbidden":
            msg = "unknown argument (see ChatSleepHybrid's fields; provider options of other models do not apply)"
        parts.append(f"{where}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def _new_message_id() -> str:
    # The same shape LangChain gives replies (lc_run--<uuid>); set here so the window's ledger knows it.
    return f"{LC_ID_PREFIX}-{uuid.uuid4()}"


def _find_tokenizer(engine: Any, explicit: Any) -> tokenizers.Tokenizer:
    """The tokenizer to render with: explicit, else the engine's (TorchEngine keeps a `TextCodec`)."""
    if isinstance(explicit, tokenizers.Tokenizer):
        return explicit
    if isinstance(explicit, str | os.PathLike):
        return load_tokenizer(explicit)
    if explicit is not None:
        raise ConfigError(f"tokenizer must be a tokenizers.Tokenizer or a path, got {type(explicit).__name__}")
    for owner in (getattr(engine, "codec", None), engine):
        tok = getattr(owner, "tokenizer", None)
        if isinstance(tok, tokenizers.Tokenizer):
            return tok
    raise ConfigError(
        f"{type(engine).__name__} exposes no tokenizer: pass tokenizer= (a tokenizers.Tokenizer or the checkpoint's "
        "tokenizer.json), or build the model with ChatSleepHybrid.from_pretrained(checkpoint_dir)"
    )


def _engine_template(engine: Any, tokenizer: tokenizers.Tokenizer) -> ChatTemplate:
    """The engine's chat template.

    Its own ``chat_template`` attribute, else its checkpoint directory's (``VLLMEngine.path``), else the built-in
    default for the tokenizer.
    """
    template = getattr(engine, "chat_template", None)
    if isinstance(template, ChatTemplate):
        return template
    path = getattr(engine, "path", None)
    if isinstance(path, str | os.PathLike) and Path(path).is_dir():
        return ChatTemplate.from_pretrained(path, tokenizer)
    return ChatTemplate.default_for(tokenizer)


def sync_window(
    engine: Any, codec: ChatCodec, agent_id: str, messages: Sequence[BaseMessage], *, head: Sequence[int] = ()
) -> int:
    """Make the agent's window hold exactly ``head + render(messages)`` on top of S, and record it in the ledger.

    ``head``: token ids of a system prompt that is not among ``messages`` (a resumed run knows it only from the
    snapshot). Observes only what is missing when the window is a prefix of the rendering, else rebuilds the window
    from S. The rendering must fit the window (the caller checks). Returns the window's length.
    """
    target = [*head, *(t for part in codec.render(messages) for t in part)]
    if len(target) > int(engine.window):
        raise WindowOverflow(f"{len(target)} tokens do not fit the window of {engine.window}")
    slot = _window.slot(engine, agent_id)
    with slot.lock:
        slot.ledger = None
        if not engine.has_agent(agent_id):
            engine.create_agent(agent_id)
        window = list(engine.session(agent_id).window)
        if len(window) > len(target) or target[: len(window)] != window:
            _reset_window(engine, agent_id, [])
            window = []
        if len(target) > len(window):
            engine.observe(agent_id, target[len(window) :])
        n_head = len(head)
        for m in messages:
            if m.id:
                break
            n_head += len(codec.message_ids(m))
        slot.ledger = _window.WindowLedger(tuple(m.id for m in messages if m.id), len(target), n_head)
        slot.head_tokens = n_head
        slot.head_ids = tuple(target[:n_head])
        return len(target)


def _reset_window(engine: Any, agent_id: str, window: list[int]) -> None:
    """Make the agent's window exactly ``window`` on top of the state its current window started from (S)."""
    memory = engine.export_state(agent_id)
    snapshot_id = engine.session(agent_id).snapshot_id
    engine.import_state(
        agent_id,
        AgentMemory(
            state=memory.state,
            window=tuple(window),
            tokens_consolidated=memory.tokens_consolidated,
            sleep_count=memory.sleep_count,
            tokens_seen=memory.tokens_seen,
        ),
        snapshot_id=snapshot_id,
    )


def _stop_cut(codec: ChatCodec, body: list[int], text: str, stop: list[str] | None) -> tuple[list[int], str] | None:
    """If a stop string occurs in ``text``: the tokens up to the one that completes it, and the text before it."""
    if not stop:
        return None
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if not hits:
        return None
    at, s = min(hits)
    for k in range(1, len(body) + 1):
        if s in codec.decode(body[:k]):
            return body[:k], text[:at]
    return body, text[:at]


__all__ = ["ChatSleepHybrid", "check_message_lengths", "message_limit", "sync_window"]
