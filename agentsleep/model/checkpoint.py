"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json`` written by the trainer).

The same directory is what `SleepHybrid.from_pretrained` loads and what vLLM serves, so ``config.json`` carries the
HybridConfig fields plus the Hugging Face names vLLM reads (``architectures``, ``model_type``, ``hidden_size``, …).
Extra keys (training config, seed, eval scores) may ride along under ``"agentsleep"``; loading ignores them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from agentsleep.errors import CheckpointError

if TYPE_CHECKING:
    from agentsleep.model.hybrid import SleepHybrid

ARCHITECTURE = "SleepHybridForCausalLM"
MODEL_TYPE = "agentsleep_hybrid"
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


def hf_config(model: SleepHybrid) -> dict[str, Any]:
    cfg = model.config
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **cfg.model_dump(),
        # Hugging Face / vLLM spellings of the same facts
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.attn_heads,
        "num_key_value_heads": cfg.attn_kv_heads,
        "head_dim": cfg.attn_head_dim,
        "max_position_embeddings": cfg.window + 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        # the current-rule fingerprint and the legacy ones of the same model (docs/store.md, "Fingerprints"): the vLLM
        # connector reads them instead of hashing the weights
        "fingerprint": str(model.fingerprint),
        "fingerprint_aliases": list(model.fingerprint.aliases),
    }


def save_checkpoint(model: SleepHybrid, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # safetensors refuses shared storage; re-tied on load
    model.refresh_fingerprint()
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt", "fingerprint": model.fingerprint})
    config = hf_config(model)
    if extra:
        config["agentsleep"] = dict(extra)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: {CONFIG_FILE} is missing")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> SleepHybrid:
    from agentsleep.model.hybrid import HybridConfig, SleepHybrid

    raw = read_config(path)
    fields = {k: v for k, v in raw.items() if k in HybridConfig.model_fields}
    try:
        config = HybridConfig.model_validate(fields)
    except ValidationError as e:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid model config: {e}") from e
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} lacks {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} could not be read: {e}") from e
    model = SleepHybrid(config)
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{weights} does not match its config: {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
    model.to(device).eval()
    fp = model.refresh_fingerprint()
    recorded = [raw["fingerprint"]] if raw.get("fingerprint") is not None else []  # a 0.1.0 checkpoint records v1
    recorded += raw.get("fingerprint_aliases") or []
    if any(r not in fp.accepted for r in recorded):
        raise CheckpointError(
            f"{path}: weights hash to {list(fp.accepted)} but config.json records {recorded}; re-save the checkpoint"
        )
    return model
