"""`ReplyBudget`: a per-run reply length and stop string, taken from the run's context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langchain.agents.middleware.types import AgentMiddleware, ModelRequest, ModelResponse


class ReplyBudget(AgentMiddleware):
    """Per-run ``max_tokens`` and ``stop`` from ``context={"max_tokens": n, "stop": s}``.

    A turn that only tells the agent something (a fact, a document) can run with ``max_tokens=0``: its message enters
    the window and is consolidated at the next sleep, and no reply tokens are generated. Runs without those keys are
    left untouched.
    """

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], ModelResponse[Any]]
    ) -> Any:
        """Override the model settings of this call from the run's context."""
        ctx = request.runtime.context if request.runtime is not None else None
        if not isinstance(ctx, dict) or "max_tokens" not in ctx:
            return handler(request)
        settings = {**request.model_settings, "max_tokens": int(ctx["max_tokens"])}
        if ctx.get("stop"):
            settings["stop"] = [str(ctx["stop"])]
        return handler(request.override(model_settings=settings))


__all__ = ["ReplyBudget"]
