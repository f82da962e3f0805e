"""The snapshot container: fast weights + window token ids in one self-describing safetensors file. Never pickle.

Layout (safetensors, little-endian):

- tensor ``state``: ``uint8 [n]``, the exact bytes of `FastWeights.to_bytes()` (itself safetensors with a
  checksummed header, so the inner state verifies on its own);
- tensor ``window``: ``int64 [w]``, the token ids of the agent's current attention window (``w`` may be 0);
- metadata: ``format`` = ``agentsleep.snapshot``, ``format_version``, ``fingerprint``, ``window_len``,
  ``content_sha256`` (sha256 of the state bytes followed by the window's int64 bytes) and, in exported files only,
  ``record`` (the snapshot's metadata as JSON, so an import can restore reason, passes, lineage hints).

The database stores this container as the payload and its sha256 in a column, so a load checks integrity before
parsing anything. An exported file is the same container with ``record`` filled in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from agentsleep.errors import InvalidInput, SnapshotCorrupt, SnapshotMismatch

FORMAT_NAME = "agentsleep.snapshot"
FORMAT_VERSION = 1
_MAX_HEADER = 1 << 20  # the container header is ~300 bytes plus the record; refuse absurd lengths before json
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class Decoded:
    """A parsed container: the raw fast-weight bytes (not yet parsed), the window and the metadata."""

    state_bytes: bytes
    window: list[int]
    fingerprint: str
    format_version: int
    record: dict[str, Any] | None


def window_array(window: Sequence[int]) -> np.ndarray:
    """Validate token ids and return them as ``int64 [w]``; raises `InvalidInput` for anything else."""
    if isinstance(window, str | bytes | bytearray):
        raise InvalidInput(f"window must be a sequence of int token ids, got {type(window).__name__}")
    try:
        # numpy arrays and torch tensors: tolist() yields Python ints (or floats, rejected below)
        ids = window.tolist() if hasattr(window, "tolist") else list(window)
    except TypeError as e:
        raise InvalidInput(f"window must be a sequence of int token ids, got {type(window).__name__}") from e
    for i, t in enumerate(ids):
        # bool is an int subclass but never a token id; numpy integers are fine
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise InvalidInput(f"window[{i}] = {t!r} is not an int token id")
        if not _INT64_MIN <= int(t) <= _INT64_MAX:
            raise InvalidInput(f"window[{i}] = {t} does not fit in int64")
    return np.asarray([int(t) for t in ids], dtype=np.int64).reshape(-1)


def content_sha256(state_bytes: bytes, window: np.ndarray) -> str:
    h = hashlib.sha256(state_bytes)
    h.update(window.astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def canonical(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted-key, compact form.

    safetensors writes metadata in hash-map order, so two saves of one state differ byte-wise. Canonical bytes make
    the payload (and its sha256) a function of the content alone, so identical snapshots share one content-addressed
    file. Tensor data and offsets are untouched; the header is re-padded with spaces to 8 bytes as the format asks.
    """
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n <= 0 or n > _MAX_HEADER or 8 + n > len(data):
        raise SnapshotCorrupt("not a safetensors payload (bad header length): truncated or damaged")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotCorrupt(f"safetensors header is not valid JSON ({e}): damaged") from e
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def encode(
    state_bytes: bytes, window: Sequence[int] | np.ndarray, *, fingerprint: str, record: dict[str, Any] | None = None
) -> bytes:
    """Pack fast-weight bytes and window token ids into one container (see module docstring)."""
    win = window if isinstance(window, np.ndarray) and window.dtype == np.int64 else window_array(window)
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "fingerprint": fingerprint,
        "window_len": str(int(win.shape[0])),
        "content_sha256": content_sha256(state_bytes, win),
    }
    if record is not None:
        meta["record"] = json.dumps(record, sort_keys=True, default=str)
    tensors = {"state": np.frombuffer(state_bytes, dtype=np.uint8), "window": win}
    return canonical(st_save(tensors, metadata=meta))


def read_meta(data: bytes) -> dict[str, str]:
    """Validate and return the container's metadata without touching tensor data.

    Raises `SnapshotCorrupt` for bytes that are not an agentsleep snapshot (including a bare `FastWeights` file or
    any other safetensors file), `SnapshotMismatch` for a container version newer than this code.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"snapshot data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise SnapshotCorrupt(f"not an agentsleep snapshot: only {len(data)} bytes (empty or truncated)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > _MAX_HEADER or 8 + n > len(data):
        raise SnapshotCorrupt("not an agentsleep snapshot (no valid safetensors header): truncated or another file")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotCorrupt(f"snapshot header is not valid JSON ({e}): damaged or not a snapshot") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        what = meta.get("format") if isinstance(meta, dict) else None
        raise SnapshotCorrupt(
            f"not an agentsleep snapshot (format {what!r}, expected {FORMAT_NAME!r}); "
            "export snapshots with `agentsleep snapshots export`"
        )
    missing = {"format_version", "fingerprint", "window_len", "content_sha256"} - meta.keys()
    if missing:
        raise SnapshotCorrupt(f"snapshot header lacks {sorted(missing)}")
    try:
        version = int(meta["format_version"])
    except ValueError as e:
        raise SnapshotCorrupt(f"bad snapshot format_version {meta['format_version']!r}") from e
    if version > FORMAT_VERSION:
        raise SnapshotMismatch(
            f"snapshot container version {version} is newer than this agentsleep understands ({FORMAT_VERSION}); "
            "upgrade agentsleep"
        )
    return meta


def decode(data: bytes) -> Decoded:
    """Parse and verify a container. The fast-weight bytes inside are returned unparsed (see `FastWeights.from_bytes`).

    Raises:
        SnapshotCorrupt: not a snapshot, truncated, or the content checksum does not match.
        SnapshotMismatch: a container version newer than this code.
    """
    meta = read_meta(data)
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise SnapshotCorrupt(f"snapshot data could not be parsed ({e}): truncated or damaged") from e
    state, window = tensors.get("state"), tensors.get("window")
    if state is None or window is None or set(tensors) != {"state", "window"}:
        raise SnapshotCorrupt(f"snapshot holds tensors {sorted(tensors)}, expected ['state', 'window']")
    if state.dtype != np.uint8 or window.dtype != np.int64 or state.ndim != 1 or window.ndim != 1:
        raise SnapshotCorrupt("snapshot tensors have the wrong dtype or rank (state uint8[n], window int64[w])")
    state_bytes = state.tobytes()
    if content_sha256(state_bytes, window) != meta["content_sha256"]:
        raise SnapshotCorrupt("snapshot content checksum mismatch: the bytes were altered or damaged")
    if str(window.shape[0]) != meta["window_len"]:
        raise SnapshotCorrupt(f"header says window_len={meta['window_len']} but the data holds {window.shape[0]}")
    record: dict[str, Any] | None = None
    if "record" in meta:
        try:
            record = json.loads(meta["record"])
        except json.JSONDecodeError as e:
            raise SnapshotCorrupt(f"snapshot record is not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise SnapshotCorrupt("snapshot record is not a JSON object")
    return Decoded(
        state_bytes=state_bytes,
        window=[int(t) for t in window.tolist()],
        fingerprint=meta["fingerprint"],
        format_version=int(meta["format_version"]),
        record=record,
    )


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Decoded",
    "canonical",
    "content_sha256",
    "decode",
    "encode",
    "read_meta",
    "window_array",
]
