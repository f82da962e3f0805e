"""vLLM general plugin (entry point ``vllm.general_plugins: agentsleep``): makes vLLM understand agentsleep checkpoints.

vLLM calls `register` in every process it starts (API server, engine core, workers), so it must be cheap and
re-entrant: it registers the architecture lazily as a ``"module:Class"`` string (the model module, which imports vLLM
layers, is imported only when a checkpoint asks for it) and the transformers config class for
``model_type="agentsleep_hybrid"`` (vLLM parses ``config.json`` through transformers' ``AutoConfig``).
"""

from __future__ import annotations

import logging

from agentsleep.model.checkpoint import ARCHITECTURE, MODEL_TYPE

logger = logging.getLogger(__name__)

MODEL_CLASS = "agentsleep.serving.model:SleepHybridForCausalLM"


def register() -> None:
    """Register `SleepHybridForCausalLM` with vLLM's `ModelRegistry` and its config with `AutoConfig` (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from agentsleep.serving.config import SleepHybridHFConfig

    AutoConfig.register(MODEL_TYPE, SleepHybridHFConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
        logger.debug("registered %s -> %s with vLLM", ARCHITECTURE, MODEL_CLASS)


__all__ = ["MODEL_CLASS", "register"]
