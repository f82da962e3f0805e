"""Checks on everything a caller hands the store, so that bad input is a typed error before anything is written,
and the same error on SQLite and Postgres (one backend would otherwise accept what the other refuses: Postgres'
``integer`` and JSON are stricter than SQLite's). See docs/store.md, "What the store refuses".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agentsleep.errors import AgentSleepError, InvalidInput, SnapshotCorrupt, UnknownSnapshot
from agentsleep.ids import check_id
from agentsleep.model.state import FastWeights
from agentsleep.store import payload as container

# A window longer than this is refused even when the caller names no model limit (``max_window``): 1M tokens is far
# beyond any attention window L, so a longer one is a bug upstream, not a memory (its payload would be 8 MiB+).
MAX_WINDOW_TOKENS = 1 << 20
MAX_METADATA_BYTES = 1 << 20  # metadata is for tags and counters; megabytes of it would be a bug upstream
INT32_MAX = (1 << 31) - 1  # Postgres ``integer`` (passes); SQLite would take more, so both refuse more
INT64_MAX = (1 << 63) - 1  # Postgres ``bigint`` and SQLite's INTEGER (tokens_consolidated)
SNAPSHOT_ID_LEN = 32


def check_snapshot_id(value: object, what: str = "snapshot id") -> str:
    """A snapshot id to look up. Anything that cannot be a stored id (too long, control characters, lone
    surrogates) is `UnknownSnapshot` at once, the same on both backends (Postgres would refuse to encode it)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a str, got {type(value).__name__}")
    if not value or len(value) > SNAPSHOT_ID_LEN or not value.isascii() or not value.isprintable():
        raise UnknownSnapshot(f"no snapshot {value!r} in the snapshot store")
    return value


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def check_state(state: object) -> FastWeights:
    """The state a save accepts: `FastWeights` of one stream, float32 and finite, carrying its model fingerprint
    (possibly with no tensor at all: a model without GDN layers carries nothing across windows under hard eviction).

    The store never casts (a float64 or bfloat16 state is refused rather than silently rounded) and never saves a
    diverged state (NaN/inf): a revived agent would carry it forever.
    """
    if not isinstance(state, FastWeights):
        raise InvalidInput(f"state must be FastWeights, got {type(state).__name__}")
    if not state.fingerprint:
        raise InvalidInput("state has no model fingerprint; states from SleepHybrid always carry one")
    check_id(state.fingerprint, "the state's model fingerprint")
    tensors = state.tensors()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InvalidInput(f"state tensor {name} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype != torch.float32:
            raise InvalidInput(
                f"state tensor {name} is {t.dtype}; fast weights are float32 (the store never casts: convert "
                "explicitly if that is what you mean)"
            )
        if not bool(torch.isfinite(t).all()):
            raise InvalidInput(
                f"state tensor {name} holds NaN or inf values: a diverged state is not saved (the agent keeps its "
                "last good snapshot)"
            )
    if state.batch_size != 1:
        raise InvalidInput(f"an agent's state is one stream (batch 1); this state has batch {state.batch_size}")
    pointers = [t.data_ptr() for t in tensors.values() if t.numel()]
    if len(set(pointers)) != len(pointers):
        # Two layers holding one tensor object (e.g. the same zeros): safetensors refuses shared memory, so the
        # bytes are written from copies. Same values, same digest.
        return FastWeights(
            ssm=[t.clone() for t in state.ssm],
            kv=[(k.clone(), v.clone()) for k, v in state.kv],
            kv_valid=None if state.kv_valid is None else state.kv_valid.clone(),
            fingerprint=state.fingerprint,
            batch=state.batch,
        )
    return state


def check_window(window: Sequence[int], max_window: int | None) -> np.ndarray:
    win = container.window_array(window)
    limit = MAX_WINDOW_TOKENS if max_window is None else check_int("max_window", max_window, 0, MAX_WINDOW_TOKENS)
    if win.shape[0] > limit:
        what = "the model's window (max_window)" if max_window is not None else f"MAX_WINDOW_TOKENS={limit}"
        raise InvalidInput(
            f"window holds {win.shape[0]} tokens, more than {what} allows ({limit}): not a memory of this model"
        )
    if win.shape[0] and int(win.min()) < 0:
        raise InvalidInput("window holds a negative token id")
    return win


def check_metadata(metadata: object, what: str = "metadata") -> dict[str, Any]:
    """JSON-ready metadata, normalised (tuples become lists, keys strings), identical on SQLite and Postgres."""
    try:
        text_ = json.dumps(metadata if metadata is not None else {}, ensure_ascii=False, allow_nan=False)
        encoded = text_.encode("utf-8")  # lone surrogates fail here (Postgres could not store them)
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as e:
        raise InvalidInput(f"{what} must be JSON-serialisable (no NaN/inf, valid UTF-8): {e}") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidInput(f"{what} is {len(encoded)} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    meta = json.loads(text_)
    if not isinstance(meta, dict):
        raise InvalidInput(f"{what} must be a dict, got {type(metadata).__name__}")
    return meta


def parse_state(data: bytes, **kwargs: Any) -> FastWeights:
    """`FastWeights.from_bytes`, with anything it raises on damaged bytes (KeyError, JSONDecodeError, ...) turned
    into `SnapshotCorrupt`; our own typed errors pass through."""
    try:
        return FastWeights.from_bytes(data, **kwargs)
    except AgentSleepError:
        raise
    except Exception as e:  # untrusted bytes: any parse failure is damage
        raise SnapshotCorrupt(f"the fast-weight bytes are damaged ({type(e).__name__}: {e})") from e


def from_file(rec: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """A field of an imported file's record if it has the expected type (bools are not ints), else None."""
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, kind):
        return None
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return v


__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "MAX_METADATA_BYTES",
    "MAX_WINDOW_TOKENS",
    "SNAPSHOT_ID_LEN",
    "check_int",
    "check_metadata",
    "check_snapshot_id",
    "check_state",
    "check_window",
    "from_file",
    "parse_state",
]
