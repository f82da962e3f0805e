"""One float32 PyTorch `SleepHybrid` per checkpoint directory and process, shared by the connector (window headers)
and `VLLMEngine` (sleep runs in PyTorch on the same weights; it is offline work)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agentsleep.model.hybrid import SleepHybrid

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_models: dict[Path, SleepHybrid] = {}


def reference_model(path: str | Path) -> SleepHybrid:
    """The reference model of the checkpoint at ``path`` (loaded once per process, eval mode, CPU, float32)."""
    key = Path(path).resolve()
    with _lock:
        model = _models.get(key)
        if model is None:
            model = SleepHybrid.from_pretrained(key)
            _models[key] = model
            logger.info("loaded reference model %s (fingerprint %s)", key, model.fingerprint)
        return model


def model_fingerprint(path: str | Path) -> str:
    """The fingerprint snapshots of the checkpoint at ``path`` must carry. Every check in `agentsleep.serving` (server,
    connector, `VLLMEngine`) asks here, and hands it to `SnapshotStore.load` / `latest`, which compare."""
    return reference_model(path).fingerprint


__all__ = ["model_fingerprint", "reference_model"]
