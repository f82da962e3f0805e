"""Read a Hugging Face checkpoint directory: ``config.json``, ``model.safetensors`` or shards listed in
``model.safetensors.index.json``; the tokenizer files are read by `agentsleep.runtime.text`.

`load_hf` picks the family by ``model_type``, translates the config, streams the tensors shard by shard under our
names and hands both to `agentsleep.model.assemble.build`, which applies the overrides.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from agentsleep.errors import CheckpointError
from agentsleep.model.hf import qwen2, qwen3, qwen3_5, qwen3_next
from agentsleep.model.hf.base import Family

logger = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = (qwen3_5.TEXT, qwen3_5.MULTIMODAL, qwen3_next.FAMILY, qwen3.FAMILY, qwen2.FAMILY)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(BY_MODEL_TYPE))
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


def family_of(raw: Mapping[str, Any], path: Path) -> Family:
    """The family of a checkpoint's ``config.json``.

    Raises:
        CheckpointError: an unsupported ``model_type``.
    """
    model_type = raw.get("model_type")
    family = BY_MODEL_TYPE.get(str(model_type))
    if family is None:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; agentsleep imports {list(SUPPORTED_MODEL_TYPES)} "
            "and reads its own checkpoints (model_type 'agentsleep_hybrid')"
        )
    return family


def hf_fields(raw: Mapping[str, Any], path: Path) -> tuple[Family, dict[str, Any]]:
    """The family and the `HybridConfig` fields of a Hugging Face ``config.json``."""
    family = family_of(raw, path)
    text = dict(family.text_config(raw))
    if family.text_config_key is not None and "tie_word_embeddings" in raw:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]  # the multimodal wrapper decides tying
    return family, family.translate(text)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(raw: Mapping[str, Any], family: Family) -> torch.dtype | None:
    """The dtype config.json declares (``dtype``, or the older ``torch_dtype``), if any."""
    text = family.text_config(raw)
    name = text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype")
    return DTYPES.get(str(name)) if name else None


def weight_files(path: Path) -> tuple[list[Path], set[str] | None]:
    """The safetensors files of a checkpoint and, for a sharded one, the tensor names its index promises.

    Raises:
        CheckpointError: no weights, an unreadable index, or a shard the index names that is not on disk.
    """
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); download it again") from e
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: shard(s) {missing} listed in {INDEX_FILE} are missing ({len(files) - len(missing)} of "
                f"{len(files)} present); download the missing shards into the directory"
            )
        return [path / f for f in files], set(weight_map)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    others = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(
        f"{path} holds no {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {others}: add their index)" if others else "; .bin weights are not read: convert to safetensors")
    )


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CHUNK_BYTES = 64 << 20  # dtype conversion maps this much of a tensor at a time


def _header(file: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (name -> dtype, shape, data_offsets) and where the data starts: an 8-byte little-endian
    length, then that much JSON (huggingface/safetensors, "Format")."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return header, 8 + n


def _read_as(fh: Any, begin: int, end: int, src: torch.dtype, shape: list[int], dtype: torch.dtype) -> Tensor:
    """One tensor's bytes [begin, end) of the open file ``fh``, converted to ``dtype`` a window at a time: each window
    is mapped, converted and unmapped, so memory holds the converted tensor plus one window, never the source (a
    whole-file map would keep every source page resident until the last tensor is read)."""
    out = torch.empty(shape, dtype=dtype).reshape(-1)
    size = torch.empty((), dtype=src).element_size()
    step = max(size, CHUNK_BYTES // size * size)
    done = 0
    for pos in range(begin, end, step):
        n = min(step, end - pos)
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        window = mmap.mmap(fh.fileno(), length=pos + n - base, offset=base, access=mmap.ACCESS_COPY)
        chunk = torch.frombuffer(window, dtype=src, count=n // size, offset=pos - base)
        out[done : done + n // size] = chunk
        done += n // size
        del chunk
        window.close()
    return out.reshape(shape)


def hf_tensors(path: Path, family: Family, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """``(our name, tensor)`` for every tensor the model uses, shard by shard (vision/MTP tensors skipped).

    Tensors already in ``dtype`` (or all, if None) come straight from the file's memory map (no copy: pages are read
    on first use and shared with the page cache); the others are read and converted chunk by chunk.

    Raises:
        CheckpointError: a shard that cannot be read, or tensors the index promises but no shard holds.
    """
    files, promised = weight_files(path)
    seen: set[str] = set()
    for file in files:
        try:
            header, start = _header(file)
            with safe_open(str(file), framework="pt") as f, open(file, "rb") as fh:
                for key in f.keys():
                    seen.add(key)
                    ours = family.our_name(key)
                    if ours is None:
                        continue
                    info = header[key]
                    src = SAFETENSORS_DTYPES.get(info["dtype"])
                    if dtype is None or src is None or src == dtype:
                        yield ours, f.get_tensor(key)
                    else:
                        begin, end = info["data_offsets"]
                        yield ours, _read_as(fh, start + begin, start + end, src, info["shape"], dtype)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{file} could not be read ({type(e).__name__}: {e}); download it again") from e
    if promised is not None and promised - seen:
        lost = sorted(promised - seen)
        raise CheckpointError(f"{path}: {len(lost)} tensors named in {INDEX_FILE} are in no shard, e.g. {lost[:3]}")


def load_hf(
    path: Path,
    raw: Mapping[str, Any],
    *,
    overrides: Mapping[str, Any],
    dtype: torch.dtype | None,
    device: torch.device | str,
) -> Any:
    """A `SleepHybrid` from a Hugging Face checkpoint directory (see `SleepHybrid.from_pretrained`)."""
    from agentsleep.model.assemble import build

    family, fields = hf_fields(raw, path)
    dtype = dtype or stored_dtype(raw, family)
    logger.info("importing %s checkpoint %s (%d blocks, layout %s)", family.name, path, len(fields["layout"]),
                fields["layout"])  # fmt: skip
    tensors = hf_tensors(path, family, dtype)
    return build(fields, tensors, overrides=overrides, dtype=dtype, device=device, source=str(path))


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "family_of", "hf_fields", "hf_tensors", "load_hf", "weight_files"]
