"""`ChatSleepServer`: a LangChain chat model for a remote ``agentsleep serve`` (vLLM) server.

The server keeps each agent's memory (fast weights S + its window) in its snapshot store and sleeps it itself; a
request names the agent (``kv_transfer_params.agent_id``) and carries only the agent's *new input* on
``POST /v1/completions`` (the server's documented format). So a call sends the messages the agent has not heard yet:
those after the newest reply the server gave this agent (found in the messages by its metadata), rendered with the
checkpoint's chat template to token ids, plus the reply prefix. Everything before is already in the server's memory.

Why not ``ChatOpenAI``: it speaks ``/v1/chat/completions`` and sends the whole history each call, while an agent's
request to ``agentsleep serve`` must be a completion of its new input (the server answers a chat request that names
an agent with a 400). The agent id still travels the documented way, ``extra_body={"kv_transfer_params": {...}}``.

The agent is the call's ``agent_id`` (`SleepMemory` binds the thread's), else the ``agent_id`` field, else the
LangGraph thread id of the run the call belongs to. A call outside any agent and thread is stateless (the whole
conversation is sent, without ``kv_transfer_params``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from agentsleep.errors import ConfigError, EngineError, InvalidInput, UnknownAgent, WindowOverflow
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator

from langchain_agentsleep.chat_models import NO_STRUCTURED_OUTPUT, PROVIDER, _check_tool_choice, _validation_summary
from langchain_agentsleep.chat_template import METADATA_KEY, ChatCodec, ChatTemplate, content_digest, load_tokenizer

LLM_TYPE = "chat-agentsleep-server"
_IGNORED_KWARGS = ("snapshot_id", "tools", "ls_structured_output_format", "stream", "model")


class ChatSleepServer(BaseChatModel):
    """Chat model for agents served by ``agentsleep serve``: the server keeps and sleeps each agent's memory.

    Example:
        .. code-block:: python

            # agentsleep serve checkpoints/gsm-qlast-n2 --port 8000     (in another shell)
            from langchain.agents import create_agent
            from langgraph.checkpoint.memory import InMemorySaver
            from langchain_agentsleep import ChatSleepServer

            model = ChatSleepServer(base_url="http://127.0.0.1:8000/v1", checkpoint="checkpoints/gsm-qlast-n2")
            agent = create_agent(model, checkpointer=InMemorySaver())
            agent.invoke({"messages": [("user", "V042 = 5 ;")]}, {"configurable": {"thread_id": "alice"}})

    ``checkpoint`` is a local copy of the served checkpoint directory: its tokenizer and chat template turn messages
    into the token ids the server expects. ``model`` is the served model name (default: the checkpoint directory's
    name, as ``agentsleep serve`` names it). The thread id is the agent id; `SleepMemory` is optional here (it then
    only names the agent: the server sleeps).

    Limits (of the server's protocol): every request generates at least one token, so a listen-only turn
    (``max_tokens=0``) is refused; a request that cannot fit the window is a `WindowOverflow`. ``tool_choice`` that
    forces a tool call and ``with_structured_output`` raise `NotImplementedError`, as for `ChatSleepHybrid`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)
    agentsleep_served: ClassVar[bool] = True  # SleepMemory: the server keeps the memory; only name the agent

    base_url: str = Field(description="the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    checkpoint: str = Field(description="local copy of the served checkpoint directory (tokenizer, chat template)")
    model_name: str | None = Field(default=None, alias="model", description="served model name")
    api_key: SecretStr | None = Field(default=None, description="the server's API key, if it has one")
    agent_id: str | None = Field(default=None, description="default agent; a call's agent_id keyword wins")
    max_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] | None = None
    timeout: float | None = Field(default=120.0, gt=0)
    max_retries: int = Field(
        default=0, ge=0, description="HTTP retries; 0 by default: a retried turn may be stored twice by a server "
        "without turn ids"
    )  # fmt: skip
    chat_template: ChatTemplate | None = Field(default=None, description="default: the checkpoint's")
    streaming: bool = False
    cache: Any = False  # replies depend on the agent's memory, never on the prompt alone

    _codec: ChatCodec = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(f"invalid ChatSleepServer settings: {_validation_summary(e)}") from e

    @model_validator(mode="after")
    def _load(self) -> Self:
        path = Path(self.checkpoint)
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(
                f"checkpoint={self.checkpoint!r} has no tokenizer.json: pass a local copy of the checkpoint directory "
                "the server serves (its tokenizer and chat template encode the messages)"
            )
        tok = load_tokenizer(path)
        template = self.chat_template or ChatTemplate.from_pretrained(path, tok)
        self._codec = ChatCodec(tok, template)
        if self.model_name is None:
            self.model_name = path.resolve().name
        return self

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
        return {"model_name": self.model_name, "base_url": self.base_url, "max_tokens": self.max_tokens}

    @property
    def codec(self) -> ChatCodec:
        """The checkpoint's chat template bound to its tokenizer (also an exact ``TokenCounter``)."""
        return self._codec

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Exact window tokens of ``messages`` with the checkpoint's tokenizer and chat template."""
        return self._codec.count(messages)

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Any:
        """Accept tools so `create_agent` can bind them (the hybrid cannot call them; see `ChatSleepHybrid`)."""
        _check_tool_choice(tool_choice)
        return self.bind(**kwargs)

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        """Not supported: always raises `NotImplementedError`."""
        raise NotImplementedError(NO_STRUCTURED_OUTPUT.replace("ChatSleepHybrid", "ChatSleepServer"))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        from openai import NotFoundError, OpenAI

        request, restorable = self._request(messages, stop, kwargs)
        client = OpenAI(base_url=self.base_url, api_key=self._key(), timeout=self.timeout, max_retries=self.max_retries)
        try:
            response = client.completions.create(**request)
        except NotFoundError as e:
            if restorable:
                raise UnknownAgent(_unknown(request, e)) from e
            request["extra_body"]["kv_transfer_params"]["restore"] = False  # a new agent: start from zero S
            response = client.completions.create(**request)
        except Exception as e:
            raise _translated(e) from e
        return self._result(request, response)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        from openai import AsyncOpenAI, NotFoundError

        request, restorable = self._request(messages, stop, kwargs)
        client = AsyncOpenAI(
            base_url=self.base_url, api_key=self._key(), timeout=self.timeout, max_retries=self.max_retries
        )
        try:
            response = await client.completions.create(**request)
        except NotFoundError as e:
            if restorable:
                raise UnknownAgent(_unknown(request, e)) from e
            request["extra_body"]["kv_transfer_params"]["restore"] = False
            response = await client.completions.create(**request)
        except Exception as e:
            raise _translated(e) from e
        return self._result(request, response)

    # ------------------------------------------------------------------ the request

    def _key(self) -> str:
        return self.api_key.get_secret_value() if self.api_key is not None else "EMPTY"

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """The completion request (new input only, for an agent) and whether the agent already has served replies."""
        kwargs = dict(kwargs)
        agent = kwargs.pop("agent_id", None) or self.agent_id or _thread_id()
        _check_tool_choice(kwargs.pop("tool_choice", None))
        for key in _IGNORED_KWARGS:
            kwargs.pop(key, None)
        max_tokens = kwargs.pop("max_tokens", self.max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInput(
                f"max_tokens={max_tokens!r}: agentsleep serve generates at least one token per request, so a "
                "listen-only turn (max_tokens=0) is not possible over the server; use max_tokens >= 1, or the "
                "embedded ChatSleepHybrid"
            )
        codec = self._codec
        last, closed = _last_served(messages, agent)
        new = messages[last + 1 :] if agent is not None else messages
        ids = ([] if closed else list(codec.end_ids)) + codec.prompt(new)
        body: dict[str, Any] = {"return_token_ids": True}
        if codec.stop_token_ids:
            body["stop_token_ids"] = list(codec.stop_token_ids)
        if agent is not None:
            kv: dict[str, Any] = {"agent_id": agent}
            turn = next((m.id for m in reversed(new) if m.id), None)
            if turn is not None:
                kv["turn_id"] = turn  # the same input after a crash and resume is the same turn (servers with ids)
            body["kv_transfer_params"] = kv
        request: dict[str, Any] = {
            "model": self.model_name,
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": float(kwargs.pop("temperature", self.temperature)),
            "extra_body": body,
        }
        for name in ("top_p", "seed"):
            value = kwargs.pop(name, getattr(self, name))
            if value is not None:
                request[name] = value
        stop = stop if stop is not None else self.stop
        if stop:
            request["stop"] = list(stop)
        return request, last >= 0

    def _result(self, request: dict[str, Any], response: Any) -> ChatResult:
        choice = response.choices[0]
        text = str(choice.text or "")
        token_ids = [int(t) for t in (getattr(choice, "token_ids", None) or [])]
        stops = set(self._codec.stop_token_ids)
        closed = bool(token_ids) and token_ids[-1] in stops
        extra = getattr(response, "model_extra", None) or {}
        kv = extra.get("kv_transfer_params") or {}
        kv_sent = request["extra_body"].get("kv_transfer_params") or {}
        usage = response.usage
        message = AIMessage(
            content=text,
            response_metadata={
                "model_name": self.model_name,
                "model_provider": PROVIDER,
                "finish_reason": choice.finish_reason,
                METADATA_KEY: {
                    "agent_id": kv_sent.get("agent_id"),
                    "served": True,
                    "token_ids": token_ids,
                    "closed": closed or not self._codec.end_ids,
                    "digest": content_digest(text),
                    "snapshot_id": kv.get("snapshot_id"),
                    "window_tokens": kv.get("window_tokens"),
                },
            },
            usage_metadata=UsageMetadata(
                input_tokens=int(usage.prompt_tokens) if usage else len(request["prompt"]),
                output_tokens=int(usage.completion_tokens) if usage else len(token_ids),
                total_tokens=int(usage.total_tokens) if usage else len(request["prompt"]) + len(token_ids),
            ),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


def _thread_id() -> str | None:
    """The LangGraph thread id of the run this call belongs to (None outside a graph run)."""
    try:
        from langgraph.config import get_config

        thread = get_config().get("configurable", {}).get("thread_id")
    except RuntimeError:  # not inside a runnable context
        return None
    return str(thread) if thread else None


def _last_served(messages: Sequence[BaseMessage], agent: str | None) -> tuple[int, bool]:
    """Index of the newest reply the server gave ``agent`` (-1: none) and whether it ended with the end token."""
    if agent is None:
        return -1, True
    for i in range(len(messages) - 1, -1, -1):
        meta = messages[i].response_metadata.get(METADATA_KEY) if isinstance(messages[i], AIMessage) else None
        if isinstance(meta, dict) and meta.get("served") and meta.get("agent_id") == agent:
            return i, bool(meta.get("closed", True))
    return -1, True


def _unknown(request: dict[str, Any], e: Exception) -> str:
    agent = request["extra_body"]["kv_transfer_params"]["agent_id"]
    return (
        f"the server does not know agent {agent!r} although this conversation has its earlier replies (its store was "
        f"reset or is another one): {e}"
    )


def _translated(e: Exception) -> Exception:
    """The server's 4xx answers as agentsleep's typed errors (the message is the server's)."""
    from openai import APIStatusError

    if isinstance(e, APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        kind = str(err.get("type", "")) if isinstance(err, dict) else ""
        message = str(err.get("message", e)) if isinstance(err, dict) else str(e)
        if kind == "WindowOverflow":
            return WindowOverflow(message)
        if e.status_code == 400:
            return InvalidInput(message)
        return EngineError(f"agentsleep serve answered {e.status_code}: {message}")
    return e


__all__ = ["ChatSleepServer"]
