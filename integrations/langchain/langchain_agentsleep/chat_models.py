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
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import tokenizers
from agentsleep.errors import ConfigError, InvalidInput, WindowOverflow
from agentsleep.runtime.chat import TOOL_OPEN, ChatFormat, InvalidToolCall, ParsedReply, ToolCall, parse_reply
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
from langchain_agentsleep.chat_template import (
    METADATA_KEY,
    ChatCodec,
    ChatTemplate,
    TemplateCodec,
    load_tokenizer,
)
from langchain_agentsleep.errors import MessageTooLong

logger = logging.getLogger(__name__)

_DEFAULT_MAX_TOKENS = 32
_EPHEMERAL_PREFIX = "ephemeral-"  # agents made for a call without an agent id, removed after it
_IGNORED_KWARGS = ("snapshot_id", "ls_structured_output_format", "stream", "model", "parallel_tool_calls")
_HONEST_TOOL_CHOICES = (None, "auto", "none")  # allowed without tools: neither asks for a tool call
_FORCING = ("any", "required", True)
LLM_TYPE = "chat-agentsleep"
PROVIDER = "agentsleep"
NO_TOOL_CALLS = (
    "this model cannot call tools (its chat template has no tool-call format); tool_choice={!r} would force a tool "
    "call it cannot make. Leave tool_choice unset (tools are accepted and never called), or use a checkpoint whose "
    "Hugging Face chat template defines tools (an imported Qwen model's; docs/pretrained.md)"
)
NO_STRUCTURED_OUTPUT = (
    "ChatSleepHybrid has no structured output for this model: structured output is a forced tool call, and its chat "
    "template has no tools. Parse its text reply yourself, use a checkpoint whose Hugging Face chat template defines "
    "tools, or use another model for the structured step"
)


@dataclass(frozen=True, slots=True)
class _Reply:
    """One completed call, before it becomes an `AIMessage`."""

    message_id: str
    agent_id: str | None
    body: list[int]  # the reply's tokens as generated (the end-of-message token excluded; a forced opener included)
    text: str  # the reply's content: its text, less reasoning and tool calls where the template has them
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int  # the whole context of this call, excluding S
    generated_tokens: int
    observed_tokens: int  # prompt tokens that actually ran (the rest were in the window already)
    window_tokens: int  # the window after the call
    resynced: bool  # the window did not match the messages and was rebuilt from S
    sleep_count: int
    fingerprint: str
    digest: str  # ChatCodec.reply_digest of the message (text and tool calls): an edited reply is re-rendered
    tool_calls: tuple[ToolCall, ...] = ()
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()
    reasoning: str | None = None

    def message(self, model_name: str) -> AIMessage:
        return AIMessage(
            content=self.text,
            id=self.message_id,
            tool_calls=[c.to_langchain() for c in self.tool_calls],
            invalid_tool_calls=[c.to_langchain() for c in self.invalid_tool_calls],
            additional_kwargs={"reasoning_content": self.reasoning} if self.reasoning else {},
            response_metadata=self.metadata(model_name),
            usage_metadata=self.usage(),
        )

    def metadata(self, model_name: str) -> dict[str, Any]:
        return {
            "model_name": model_name,
            "model_provider": PROVIDER,
            "finish_reason": self.finish_reason,
            METADATA_KEY: {
                "agent_id": self.agent_id,
                "token_ids": list(self.body),
                "digest": self.digest,
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
    chat_template: ChatTemplate | None = Field(
        default=None,
        description="a per-message template; default: config.json's, else the checkpoint's own Hugging Face chat "
        "template (rendered one message at a time, with tools), else the built-in one for the tokenizer",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="variables for the checkpoint's Hugging Face chat template, e.g. enable_thinking"
    )
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
            data["chat_template"] = ChatTemplate.configured(path)  # else the checkpoint's Jinja template, or built in
        return data

    @model_validator(mode="after")
    def _bind(self) -> Self:
        if not isinstance(self.engine, Engine):
            raise ConfigError(f"engine must implement agentsleep's Engine protocol, got {type(self.engine).__name__}")
        tok = _find_tokenizer(self.engine, self.tokenizer)
        self._codec = make_codec(self.engine, tok, self.chat_template, self.chat_template_kwargs)
        if self.profile is None:  # LangChain resolves it before this validator has the codec (tool calling)
            self.profile = self._resolve_model_profile()
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
        kwargs.setdefault("chat_template", ChatTemplate.configured(path))
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
            tool_calling=self._codec.supports_tools,
            structured_output=self._codec.supports_tools,
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
        """Exact window tokens of ``messages`` with ``tools`` in the head.

        A template that shows no tools never renders them: they count zero (see `bind_tools`).
        """
        tools = _schemas(tools) if self._codec.supports_tools else None
        return len(self._codec.leading_ids(messages, tools)) + self._codec.count(messages, tools)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Show ``tools`` to the model through its chat template; its tool calls come back as ``tool_calls``.

        Unreadable calls become ``invalid_tool_calls``. Needs a checkpoint whose Hugging Face chat template defines
        tools (an imported Qwen model's): the tools are rendered into the head of every window (the system prompt, as
        the template puts them), and replies are parsed with `agentsleep.runtime.chat.parse_reply` (Hermes JSON or
        Qwen3.5's XML calls). ``tool_choice``: ``None`` / ``"auto"`` (the model decides), ``"none"`` (tool calls are
        left in the text, unparsed), ``"any"`` / ``"required"`` / ``True`` (a call to some tool) or a tool's name (a
        call to that tool): a forced call starts the reply with the template's tool-call opener, so the model writes
        the rest of a call. Other keyword arguments (``agent_id``...) are bound like ``bind``'s.

        A model whose template shows no tools (the per-message templates of the toys trained here;
        ``profile["tool_calling"]`` is False) accepts them so that `create_agent(..., tools=...)` works, never shows
        them to the model, and never calls them.

        Raises:
            NotImplementedError: a ``tool_choice`` that forces a call, for a model whose template shows no tools.
            InvalidInput: ``tool_choice`` names no given tool.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if not self._codec.supports_tools:
            _check_tool_choice(tool_choice)
            if tool_choice is not None:
                kwargs["tool_choice"] = tool_choice
            return self.bind(tools=formatted, **kwargs)
        if tool_choice is not None:
            kwargs["tool_choice"] = _tool_choice(tool_choice, formatted)
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        """Structured output as a forced call to a tool whose parameters are ``schema``.

        LangChain's tool-calling method: ``bind_tools([schema], tool_choice="any")`` and a tool-call parser.

        Raises:
            NotImplementedError: the model's chat template has no tools.
        """
        if not self._codec.supports_tools:
            raise NotImplementedError(NO_STRUCTURED_OUTPUT)
        method = kwargs.pop("method", "function_calling")
        if method != "function_calling":
            raise NotImplementedError(f"with_structured_output(method={method!r}): only 'function_calling' exists here")
        kwargs.pop("strict", None)
        return super().with_structured_output(schema, include_raw=include_raw, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        reply = self._reply(messages, stop, kwargs)
        return ChatResult(generations=[ChatGeneration(message=reply.message(str(self.model_name)))])

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
        calls = [
            {"name": c.name, "args": json.dumps(c.args, ensure_ascii=False), "id": c.id, "index": i}
            for i, c in enumerate(reply.tool_calls)
        ]
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                id=reply.message_id,
                tool_call_chunks=calls,  # type: ignore[arg-type]
                invalid_tool_calls=[c.to_langchain() for c in reply.invalid_tool_calls],  # type: ignore[misc]
                additional_kwargs={"reasoning_content": reply.reasoning} if reply.reasoning else {},
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
        codec, engine = self._codec, self.engine
        tools = _schemas(kwargs.pop("tools", None))
        choice = kwargs.pop("tool_choice", None)
        if not codec.supports_tools:
            _check_tool_choice(choice)
            tools = None  # a template without tools never shows them; the model answers without calling one
        elif choice is not None:
            choice = _tool_choice(choice, tools or [])
        opener = ""
        if tools and choice not in (None, "auto", "none"):
            opener = codec.tool_call_opener(None if choice == "any" else choice) or ""
        if stop is None:
            stop = self.stop
        for key in _IGNORED_KWARGS:
            kwargs.pop(key, None)
        leading = codec.leading_ids(messages, tools)
        pieces = codec.render(messages, tools)
        opener_ids = codec.encode(opener)
        prompt = [*leading, *(t for p in pieces for t in p), *codec.generation_prefix, *opener_ids]
        L = int(engine.window)
        room = L - len(prompt) - len(codec.end_ids)
        if room < 1:
            check_message_lengths(codec, L, messages, tools)
            raise WindowOverflow(
                f"the prompt takes {len(prompt)} tokens (+{len(codec.end_ids)} to close the reply) but the window "
                f"holds {L}: no room for a reply. Send fewer messages since the last sleep (SleepMemory sleeps "
                "before this happens) or split the input"
            )
        sampling = self._sampling(kwargs, room)
        if kwargs:  # e.g. provider options other integrations bind (strict, parallel_tool_calls): not ours
            logger.debug("ChatSleepHybrid ignores call arguments %s", sorted(kwargs))
        ids_in_window = tuple(m.id for m in messages if m.id)
        head = len(leading)
        for m, piece in zip(messages, pieces):
            if m.id:
                break
            head += len(piece)

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
                generated = out[:-1] if ended else out
                finish: Literal["stop", "length"] = "stop" if ended else "length"
                text = codec.decode(generated)
                cut = _stop_cut(codec, generated, text, stop)
                if cut is not None:  # the window keeps the tokens up to the stop string; the text ends before it
                    (generated, text), finish = cut, "stop"
                body = opener_ids + generated
                text = codec.decode(opener_ids) + text
                target = prompt + generated + codec.end_ids  # the window this call leaves: render(messages + reply)
                now = prompt + out
                if now == target[: len(now)]:
                    if len(target) > len(now):
                        engine.observe(agent, target[len(now) :])  # the reply's end (after its stop token)
                else:
                    _reset_window(engine, agent, target)  # a stop string, or another stop token: roll back
                session = engine.session(agent)
                reply_id = _new_message_id()
                if session.window_tokens == len(target):
                    slot.ledger = _window.WindowLedger((*ids_in_window, reply_id), len(target), head)
                else:  # not expected; the next call resyncs, and no sleep trusts this window meanwhile
                    logger.warning(
                        "agent %r: the window holds %d tokens after the call, expected %d",
                        agent,
                        session.window_tokens,
                        len(target),
                    )
                parsed = self._parse(text, tools, choice)
                draft = AIMessage(content=parsed.content, tool_calls=[c.to_langchain() for c in parsed.tool_calls])
                return _Reply(
                    message_id=reply_id,
                    agent_id=agent_id,
                    body=body,
                    text=parsed.content,
                    finish_reason=finish,
                    prompt_tokens=len(prompt),
                    generated_tokens=len(out),
                    observed_tokens=len(delta),
                    window_tokens=session.window_tokens,
                    resynced=resynced,
                    sleep_count=session.sleep_count,
                    fingerprint=engine.fingerprint,
                    digest=codec.reply_digest(draft),
                    tool_calls=parsed.tool_calls,
                    invalid_tool_calls=parsed.invalid_tool_calls,
                    reasoning=parsed.reasoning,
                )
            finally:
                if ephemeral:
                    engine.remove_agent(agent)
                    _window.forget(engine, agent)

    def _parse(self, text: str, tools: list[dict[str, Any]] | None, choice: Any) -> ParsedReply:
        """The reply's content, tool calls and reasoning.

        Tool calls only where tools were offered (and not refused with ``tool_choice="none"``); reasoning
        (``<think>``) wherever the checkpoint's template is used.
        """
        if not isinstance(self._codec, TemplateCodec):
            return ParsedReply(content=text)
        if tools and choice != "none":
            return parse_reply(text, tools)
        plain = parse_reply(text.replace(TOOL_OPEN, "\x00"), None)  # reasoning only: no block is a tool call
        return ParsedReply(content=plain.content.replace("\x00", TOOL_OPEN), reasoning=plain.reasoning)

    def _pieces(self, reply: _Reply) -> Iterator[str]:
        """The reply's text split at token boundaries (what a token-by-token stream shows)."""
        text, done = reply.text, 0
        if reply.tool_calls or reply.reasoning or reply.invalid_tool_calls or not reply.body:
            if text:  # the content is what is left once reasoning and calls are out: not a token prefix
                yield text
            return
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


def _schemas(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Tools (LangChain tools, functions, Pydantic classes or JSON schemas) as OpenAI JSON schemas; None if none."""
    return [convert_to_openai_tool(t) for t in tools] if tools else None


def _tool_choice(choice: Any, tools: Sequence[dict[str, Any]]) -> str:
    """``tool_choice`` as ``"auto"``, ``"none"``, ``"any"`` or the name of one of ``tools``."""
    names = [t["function"]["name"] for t in tools]
    if choice in _FORCING:
        return "any"
    if choice in ("auto", "none"):
        return str(choice)
    if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}} (OpenAI's form)
        choice = (choice.get("function") or {}).get("name", choice.get("name"))
    if isinstance(choice, str) and choice in names:
        return choice
    raise InvalidInput(f"tool_choice={choice!r} names no given tool {names}; use 'auto', 'none', 'any' or a tool name")


def message_limit(
    codec: ChatCodec, window: int, system: Sequence[BaseMessage] = (), tools: Sequence[Any] | None = None
) -> int:
    """The most tokens one message may have.

    That is the window less the head (system prompt, tools), the reply prefix and end, and one token.
    """
    head = codec.head_ids(system[0] if system else None, tools)
    return window - len(head) - len(codec.generation_prefix) - len(codec.end_ids) - 1


def check_message_lengths(
    codec: ChatCodec, window: int, messages: Sequence[BaseMessage], tools: Sequence[Any] | None = None
) -> None:
    """Raise `MessageTooLong` for the first message that cannot fit the window even alone.

    Alone means beside the head (the system prompt and the tools) and a reply.

    Raises:
        MessageTooLong: with the message's token count and the limit.
    """
    system = [m for m in messages[:1] if m.type == "system"]
    limit = message_limit(codec, window, system, tools)
    for m in messages[len(system) :]:
        n = len(codec.message_ids(m))
        if n > limit:
            raise MessageTooLong(
                f"a {m.type} message of {n} tokens cannot fit the model's window: at most {limit} tokens fit beside "
                f"the system prompt, the tools and a reply (L={window}). Split it into several messages that each "
                "fit (the model folds earlier ones into its fast weights by sleeping), or summarise it first",
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


def _engine_dir(engine: Any) -> Path | None:
    """The checkpoint directory an engine was loaded from (``VLLMEngine.path``, a loaded model's ``source_dir``)."""
    for path in (getattr(engine, "path", None), getattr(getattr(engine, "model", None), "source_dir", None)):
        if isinstance(path, str | os.PathLike) and Path(path).is_dir():
            return Path(path)
    return None


def make_codec(
    engine: Any,
    tokenizer: tokenizers.Tokenizer,
    template: ChatTemplate | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> ChatCodec:
    """How messages become the engine's tokens.

    First match wins: an explicit per-message ``template``; the one in the checkpoint's ``config.json``; the
    checkpoint's own Hugging Face chat template (`TemplateCodec`: an imported model, rendered one message at a time,
    with tools); the built-in per-message default for the tokenizer.

    Raises:
        ConfigError: the checkpoint's chat template cannot be rendered one message at a time.
    """
    fingerprint = engine.fingerprint
    folder = _engine_dir(engine)
    if template is None and folder is not None:
        template = ChatTemplate.configured(folder)
    if template is None:
        text = getattr(engine, "codec", None)
        chat = getattr(text, "chat", None)
        if isinstance(chat, ChatFormat):
            try:
                return TemplateCodec(tokenizer, chat, fingerprint=fingerprint, stop_token_ids=text.stop_token_ids,
                                     template_kwargs=template_kwargs)  # fmt: skip
            except InvalidInput as e:
                raise ConfigError(f"{e}; pass chat_template=ChatTemplate(...) (a per-message template) instead") from e
    if template_kwargs:
        raise ConfigError(
            "chat_template_kwargs apply to a checkpoint's Hugging Face chat template; this model has none"
        )
    return ChatCodec(tokenizer, template or ChatTemplate.default_for(tokenizer), fingerprint=fingerprint)


def sync_window(
    engine: Any,
    codec: ChatCodec,
    agent_id: str,
    messages: Sequence[BaseMessage],
    *,
    head: Sequence[int] | None = None,
    tools: Sequence[Any] | None = None,
) -> int:
    """Make the agent's window hold exactly ``head + render(messages)`` on top of S, and record it in the ledger.

    ``head``: token ids of the window's head (system prompt, tools) when it is not among ``messages`` (a resumed run
    knows it only from the snapshot); default: what `ChatCodec.prompt` opens ``messages`` with under ``tools``.
    Observes only what is missing when the window is a prefix of the rendering, else rebuilds the window from S. The
    rendering must fit the window (the caller checks). Returns the window's length.
    """
    if head is None:
        head = codec.leading_ids(messages, tools)
    target = [*head, *(t for part in codec.render(messages, tools) for t in part)]
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
        for m, part in zip(messages, codec.render(messages, tools)):
            if m.id:
                break
            n_head += len(part)
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


__all__ = ["ChatSleepHybrid", "check_message_lengths", "make_codec", "message_limit", "sync_window"]
