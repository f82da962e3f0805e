"""`ReplyBudget`: a per-run reply length and stop string, taken from the run's context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from agentsleep.errors import InvalidInput
from langchain.agents.middleware.types import AgentMiddleware, ModelRequest, ModelResponse


class ReplyBudget(AgentMiddleware):
    """Per-run ``max_tokens`` and ``stop`` from ``context={"max_tokens": n, "stop": s}``.

    A turn that only tells the agent something (a fact, a document) can run with ``max_tokens=0``: its message enters
    the window and is consolidated at the next sleep, and no reply tokens are generated. Runs without those keys are
    left untouched. Works under ``invoke``/``stream`` and ``ainvoke``/``astream`` alike.

    Raises:
        InvalidInput: ``max_tokens`` is not an int >= 0, or ``stop`` is not a string (before the model runs).
    """

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], ModelResponse[Any]]
    ) -> Any:
        """Override the model settings of this call from the run's context."""
        return handler(_budgeted(request))

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]
    ) -> Any:
        """Async twin of `wrap_model_call`."""
        return await handler(_budgeted(request))


def _budgeted(request: ModelRequest[Any]) -> ModelRequest[Any]:
    ctx = request.runtime.context if request.runtime is not None else None
    if not isinstance(ctx, dict) or "max_tokens" not in ctx:
        return request
    n, stop = ctx["max_tokens"], ctx.get("stop")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidInput(f"context max_tokens must be an int >= 0, got {n!r}")
    if stop is not None and not isinstance(stop, str):
        raise InvalidInput(f"context stop must be a string, got {stop!r}")
    settings = {**request.model_settings, "max_tokens": n}
    if stop:
        settings["stop"] = [stop]
    return request.override(model_settings=settings)


__all__ = ["ReplyBudget"]
