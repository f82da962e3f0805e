"""vLLM serving of the sleep hybrid: the model plugin, the per-agent fast-weight connector, `VLLMEngine`, and the
OpenAI-compatible server (``agentsleep serve``). See docs/serving.md.

Importing this package does not import vLLM; the names below load their modules on first use:

    from agentsleep.serving import VLLMEngine, load_engine
    engine = load_engine("vllm", "checkpoints/depo-micro-n4")     # or "torch": the same Engine protocol
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agentsleep.runtime.engine import Engine

EngineKind = Literal["torch", "vllm"]
ENGINE_KINDS: tuple[str, ...] = ("torch", "vllm")

_LAZY = {
    "VLLMEngine": "agentsleep.serving.engine",
    "FastWeightConnector": "agentsleep.serving.connector",
    "SleepHybridForCausalLM": "agentsleep.serving.model",
    "SleepHybridHFConfig": "agentsleep.serving.config",
    "AgentMemoryMiddleware": "agentsleep.serving.server",
    "AgentTurns": "agentsleep.serving.turns",
    "AgentParams": "agentsleep.serving.params",
    "ConnectorParams": "agentsleep.serving.params",
    "register": "agentsleep.serving.plugin",
    "serve": "agentsleep.serving.cli",
}


def load_engine(kind: EngineKind, checkpoint: str | os.PathLike[str], **kwargs: Any) -> Engine:
    """The engine a command asked for (``--engine torch|vllm``), loaded from a checkpoint directory.

    ``kwargs`` go to `TorchEngine.from_pretrained` or `VLLMEngine`. Raises `ConfigError` for an unknown kind or when
    vLLM is not installed.
    """
    from agentsleep.errors import ConfigError

    if kind == "torch":
        from agentsleep.runtime import TorchEngine

        return TorchEngine.from_pretrained(checkpoint, **kwargs)
    if kind == "vllm":
        from agentsleep.serving.engine import VLLMEngine

        return VLLMEngine(checkpoint, **kwargs)
    raise ConfigError(f"engine must be one of {ENGINE_KINDS}, got {kind!r}")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agentsleep.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["ENGINE_KINDS", "EngineKind", "load_engine", *sorted(_LAZY)]
