"""Hugging Face checkpoints in: one module per architecture family (declared weight names + config translation).

Supported ``model_type``: ``qwen3_5_text`` and the text model of ``qwen3_5``, ``qwen3_next``, ``qwen3``, ``qwen2``.
Entry point: `SleepHybrid.from_pretrained(path, **overrides)`; see docs/pretrained.md.
"""

from agentsleep.model.hf.loader import SUPPORTED_MODEL_TYPES, hf_fields, load_hf

__all__ = ["SUPPORTED_MODEL_TYPES", "hf_fields", "load_hf"]
