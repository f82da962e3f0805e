"""Build a `SleepHybrid` from config fields and named tensors, with the overrides of `SleepHybrid.from_pretrained`.

Shared by the project's own checkpoint directories and imported Hugging Face ones. The model is built on the meta
device and the loaded tensors become its parameters (``load_state_dict(assign=True)``), so loading allocates the
weights once and runs no random initialisation, except for memory layers inserted by ``insert_memory``.

``insert_memory=[i, ...]`` inserts a fresh Gated DeltaNet block without MLP after each listed block (paper §2.4: Ouro
1.4B + 6 memory layers). Its output projection starts at zero, so at insertion the model computes exactly what it
computed before; Algorithm-1 fine-tuning (docs/training.md) teaches it to use its state. ``loop=(start, end)`` and the
``insert_memory`` indices count the blocks of the directory being loaded; memory layers inserted after a looped block
loop with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from agentsleep.errors import CheckpointError, ConfigError, InvalidInput
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.model.layers import Block

logger = logging.getLogger(__name__)

STRUCTURAL = frozenset({"insert_memory"})  # overrides that are operations, not HybridConfig fields


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Raise `InvalidInput` for an override that is neither a HybridConfig field nor ``insert_memory``."""
    unknown = sorted(set(overrides) - set(HybridConfig.model_fields) - STRUCTURAL)
    if unknown:
        raise InvalidInput(
            f"unknown override(s) {unknown}: overrides are HybridConfig fields (window, passes, eviction, loop, ...) "
            "or insert_memory=[block, ...]"
        )


def with_memory_layers(fields: dict[str, Any], after: Sequence[int]) -> tuple[dict[str, Any], list[int], list[int]]:
    """Insert a GDN block without MLP after each block in ``after``.

    Returns (new fields, new index of every old block, indices of the inserted blocks).
    """
    layout: str = fields["layout"]
    n = len(layout)
    spots = list(after)
    bad = [i for i in spots if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad or len(set(spots)) != len(spots):
        raise InvalidInput(
            f"insert_memory={list(after)} must list distinct block indices in [0, {n}) (insert after those blocks)"
        )
    mlp = fields.get("mlp_layout") or "d" * n
    new_layout, new_mlp, old_to_new, inserted = "", "", [], []
    for i in range(n):
        old_to_new.append(len(new_layout))
        new_layout, new_mlp = new_layout + layout[i], new_mlp + mlp[i]
        if i in spots:
            inserted.append(len(new_layout))
            new_layout, new_mlp = new_layout + "g", new_mlp + "-"
    return {**fields, "layout": new_layout, "mlp_layout": new_mlp}, old_to_new, inserted


def remap_loop(loop: Sequence[int], old_to_new: list[int], n_new: int) -> tuple[int, int]:
    """A loop range over the old blocks, in the new numbering (memory layers after a looped block join the loop)."""
    if len(loop) != 2:
        raise InvalidInput(f"loop must be (start, end), got {loop!r}")
    start, end = int(loop[0]), int(loop[1])
    n_old = len(old_to_new)
    if not 0 <= start < end <= n_old:
        raise ConfigError(
            f"loop={tuple(loop)} must be a block range [start, end) with 0 ≤ start < end ≤ {n_old} (the checkpoint "
            f"has {n_old} blocks; indices count them before any insert_memory)"
        )
    return old_to_new[start], (old_to_new[end] if end < n_old else n_new)


def fresh_memory_block(config: HybridConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Parameters of one inserted memory layer: the model's own init, output projection zero (outputs unchanged)."""
    blk = Block(config, "g", "-")
    for m in blk.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0.0, config.init_std)
    torch.nn.init.zeros_(blk.linear_attn.out_proj.weight)
    return {k: v.detach().to(dtype) for k, v in blk.state_dict().items()}


def build(
    fields: Mapping[str, Any],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    source: str = "checkpoint",
) -> SleepHybrid:
    """A model from config ``fields`` and ``(name, tensor)`` pairs in our names, with ``overrides`` applied.

    Raises:
        InvalidInput: an unknown override or bad insert_memory indices.
        ConfigError: the resulting config is invalid (a window or loop range that does not fit the model, ...).
        CheckpointError: a tensor's shape does not match the config, or tensors are missing / unexpected.
    """
    overrides = dict(overrides or {})
    check_overrides(overrides)
    insert = overrides.pop("insert_memory", None) or []
    loop = overrides.pop("loop", fields.get("loop"))
    fields = {**fields, **overrides}
    n_old = len(fields["layout"])
    old_to_new, inserted = list(range(n_old)), []
    if insert:
        fields, old_to_new, inserted = with_memory_layers(fields, insert)
    if loop is not None:
        fields["loop"] = remap_loop(loop, old_to_new, len(fields["layout"]))
    config = HybridConfig(**fields)
    with torch.device("meta"):
        model = SleepHybrid(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    for name, t in tensors:
        if name.startswith("layers."):
            idx, rest = name[len("layers.") :].split(".", 1)
            if not idx.isdigit() or int(idx) >= n_old:
                raise CheckpointError(
                    f"{source}: tensor {name!r} belongs to a block beyond the {n_old} that config.json declares: the "
                    "config and the weights do not belong together"
                )
            name = f"layers.{old_to_new[int(idx)]}.{rest}"
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
        if name in want and tuple(t.shape) != want[name]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)} but config.json implies {want[name]}: the "
                "config and the weights do not belong together"
            )
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
    dtype = dtype or torch.float32
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
        if "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
    for j in inserted:
        state.update({f"layers.{j}.{k}": v for k, v in fresh_memory_block(config, dtype).items()})
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not match config.json: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device).eval()
    if inserted:
        logger.info("inserted %d memory layers at blocks %s (outputs unchanged until trained)", len(inserted), inserted)
    return model


def _few(names: list[str], k: int = 6) -> str:
    return "[]" if not names else f"{names[:k]}" + (f" and {len(names) - k} more" if len(names) > k else "")
