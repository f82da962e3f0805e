"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json`` written by the trainer).

The same directory is what `SleepHybrid.from_pretrained` loads and what vLLM serves, so ``config.json`` carries the
HybridConfig fields plus the Hugging Face names vLLM reads (``architectures``, ``model_type``, ``hidden_size``, …).
Extra keys (training config, seed, eval scores) may ride along under ``"agentsleep"``; loading ignores them.
"""

from __future__ import annotations

import json
import shutil
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
# Files that carry the model's text interface; an imported model's are copied next to its saved weights.
TEXT_FILES = (
    TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "vocab.json", "merges.txt",
)  # fmt: skip


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
        "torch_dtype": str(model.dtype).removeprefix("torch."),
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
    copy_text_files(getattr(model, "source_dir", None), path)
    return path


def copy_text_files(source: Path | None, target: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation defaults of the directory a model was loaded from (an
    imported checkpoint's, say) next to its saved weights, unless the target already has them."""
    copied: list[str] = []
    if source is None or not Path(source).is_dir() or Path(source).resolve() == target.resolve():
        return copied
    for name in TEXT_FILES:
        src = Path(source) / name
        if src.is_file() and not (target / name).exists():
            shutil.copyfile(src, target / name)
            copied.append(name)
    return copied


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: {CONFIG_FILE} is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
    return raw


def load_checkpoint(
    path: Path,
    device: torch.device | str = "cpu",
    *,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> SleepHybrid:
    """Load one of our checkpoint directories; its recorded fingerprint is checked before any override applies."""
    from agentsleep.model.assemble import build, check_overrides
    from agentsleep.model.hybrid import HybridConfig

    if overrides:
        check_overrides(overrides)
    raw = read_config(path)
    fields = {k: v for k, v in raw.items() if k in HybridConfig.model_fields}
    try:
        HybridConfig.model_validate(fields)
    except ValidationError as e:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid model config: {e}") from e
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} lacks {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} could not be read: {e}") from e
    model = build(fields, tensors.items(), device=device, source=f"{weights}")
    fp = model.refresh_fingerprint()
    recorded = [raw["fingerprint"]] if raw.get("fingerprint") is not None else []  # a 0.1.0 checkpoint records v1
    recorded += raw.get("fingerprint_aliases") or []
    if any(r not in fp.accepted for r in recorded):
        raise CheckpointError(
            f"{path}: weights hash to {list(fp.accepted)} but config.json records {recorded}; re-save the checkpoint"
        )
    if overrides or (dtype is not None and dtype != model.dtype):
        model = build(fields, model.state_dict().items(), overrides=overrides, dtype=dtype, device=device,
                      source=f"{weights}")  # fmt: skip
    model.source_dir = path
    return model
