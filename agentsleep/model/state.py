"""`FastWeights`: everything that crosses a window boundary, and its safetensors wire format.

Under hard eviction that is only the fast-weight matrix S of every GDN layer (paper §3.4). Under sliding-window
eviction the retained attention keys/values of the last L-1 tokens cross too (paper §4), so they live here as well.

State layout (backend-neutral, the layout of fla's reference ops): ``ssm[i]`` is ``[B, H, K, V]`` float32, key-major,
so that ``o_t = S_t^T q_t``. Retained attention K/V are ``[B, H_kv, n, D]`` with keys already rotated for positions
relative to the *next* window's start (negative positions), see ``layers.WindowAttention``.

Wire format: a safetensors file whose metadata header holds the format name and version, the model fingerprint, the
dtype, every tensor's shape, and a sha256 over the tensor bytes (safetensors itself has no checksum, so a flipped bit
in tensor data would otherwise load silently). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from agentsleep.errors import InvalidInput, SnapshotCorrupt, SnapshotMismatch
from agentsleep.model.fingerprint import accepted, accepts, mismatch

FORMAT_NAME = "agentsleep.fastweights"
FORMAT_VERSION = 1
_MAX_HEADER = 1 << 20  # a sane safetensors header is a few KiB; refuse absurd lengths before parsing


@dataclass
class FastWeights:
    """Per-layer state carried from window to window, for a batch of ``B`` independent streams.

    Attributes:
        ssm: one ``[B, H, K, V]`` float32 tensor per GDN layer, in layer order.
        kv: sliding-window eviction only: one ``(k, v)`` pair per attention layer, each ``[B, H_kv, n, D]``
            (n ≤ L-1 retained tokens). Empty under hard eviction.
        kv_valid: sliding-window eviction only: ``[B, n]`` float32, 1.0 where the retained token is real and 0.0 where
            it is padding (masked out of attention). None under hard eviction.
        fingerprint: the model fingerprint this state was produced by (``SleepHybrid.fingerprint``).
        batch: the number of streams, needed only when there is no tensor to read it from (a model without GDN
            layers under hard eviction carries nothing across windows).
    """

    ssm: list[torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    kv_valid: torch.Tensor | None = None
    fingerprint: str = ""
    batch: int | None = None

    # ---------------------------------------------------------------- basic properties

    @property
    def batch_size(self) -> int:
        if self.ssm:
            return int(self.ssm[0].shape[0])
        if self.kv:
            return int(self.kv[0][0].shape[0])
        return self.batch or 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view, in a fixed order (the wire format's keys)."""
        out: dict[str, torch.Tensor] = {f"ssm.{i}": s for i, s in enumerate(self.ssm)}
        for i, (k, v) in enumerate(self.kv):
            out[f"kv.{i}.k"] = k
            out[f"kv.{i}.v"] = v
        if self.kv_valid is not None:
            out["kv_valid"] = self.kv_valid
        return out

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(t.shape) for name, t in self.tensors().items()}

    def _map(self, fn) -> FastWeights:
        return FastWeights(
            ssm=[fn(s) for s in self.ssm],
            kv=[(fn(k), fn(v)) for k, v in self.kv],
            kv_valid=None if self.kv_valid is None else fn(self.kv_valid),
            fingerprint=self.fingerprint,
            batch=self.batch,
        )

    def to(self, device: torch.device | str) -> FastWeights:
        return self._map(lambda t: t.to(device))

    def clone(self) -> FastWeights:
        return self._map(lambda t: t.detach().clone())

    def detach(self) -> FastWeights:
        return self._map(lambda t: t.detach())

    def select(self, index: int) -> FastWeights:
        """The state of stream ``index`` as a batch of one."""
        if not 0 <= index < self.batch_size:
            raise InvalidInput(f"stream {index} does not exist in a batch of {self.batch_size}")
        out = self._map(lambda t: t[index : index + 1])
        out.batch = 1
        return out

    @staticmethod
    def stack(states: Sequence[FastWeights]) -> FastWeights:
        """Concatenate batches (all from the same model; retained K/V lengths must agree)."""
        if not states:
            raise InvalidInput("FastWeights.stack needs at least one state")
        # One model: every tag is accepted by the most informed one (a model's `Fingerprint` knows its legacy aliases).
        fp = max((s.fingerprint for s in states), key=lambda f: len(accepted(f)))
        if any(not accepts(fp, s.fingerprint) for s in states):
            fps = sorted({s.fingerprint for s in states})
            raise SnapshotMismatch(f"cannot batch states of different models: fingerprints {fps}")
        first = states[0]
        ssm = [torch.cat([s.ssm[i] for s in states]) for i in range(len(first.ssm))]
        kv = [
            (torch.cat([s.kv[i][0] for s in states]), torch.cat([s.kv[i][1] for s in states]))
            for i in range(len(first.kv))
        ]
        kv_valid = None if first.kv_valid is None else torch.cat([s.kv_valid for s in states])  # type: ignore[misc]
        batch = sum(s.batch_size for s in states)
        return FastWeights(ssm=ssm, kv=kv, kv_valid=kv_valid, fingerprint=fp, batch=batch)

    def split(self) -> Iterator[FastWeights]:
        for b in range(self.batch_size):
            yield self.select(b)

    def digest(self) -> str:
        """sha256 over the tensor bytes (names, shapes and contents): equal digests mean equal states."""
        return _tensor_digest(self.tensors())

    def allclose(self, other: FastWeights, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        a, b = self.tensors(), other.tensors()
        return a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a
        )

    # ---------------------------------------------------------------- wire format

    def to_bytes(self) -> bytes:
        """Serialise to safetensors bytes with a self-describing, checksummed header."""
        tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in self.tensors().items()}
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "dtype": "float32",
            "n_ssm": str(len(self.ssm)),
            "n_kv": str(len(self.kv)),
            "batch": str(self.batch_size),
            "shapes": json.dumps({k: list(t.shape) for k, t in tensors.items()}, sort_keys=True),
            "sha256": _tensor_digest(tensors),
        }
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        fingerprint: str | None = None,
        shapes: dict[str, list[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> FastWeights:
        """Parse bytes written by `to_bytes`.

        Args:
            data: the safetensors bytes.
            fingerprint: if given, the fingerprint of the model the state must belong to (`SleepHybrid.fingerprint`;
                its legacy aliases are accepted too, and the state comes back tagged with ``fingerprint`` itself).
            shapes: if given, the per-tensor shapes the state must have (batch dimension included).
            device: where to put the tensors.

        Raises:
            SnapshotCorrupt: truncated, damaged, or not an agentsleep state at all.
            SnapshotMismatch: a valid state, but of another model (fingerprint or shapes differ) or a newer format.
        """
        meta = read_header(data)
        try:
            tensors = st_load(bytes(data))
        except (SafetensorError, ValueError, RuntimeError) as e:  # truncated data region, bad offsets
            raise SnapshotCorrupt(f"fast-weight bytes could not be parsed ({e}); the snapshot is damaged") from e
        declared = json.loads(meta["shapes"])
        actual = {k: list(t.shape) for k, t in tensors.items()}
        if declared != actual:
            raise SnapshotCorrupt(f"header declares shapes {declared} but the data holds {actual}")
        if any(t.dtype != torch.float32 for t in tensors.values()):
            raise SnapshotCorrupt("fast weights must be float32")
        if _tensor_digest(tensors) != meta["sha256"]:
            raise SnapshotCorrupt("fast-weight checksum mismatch: the tensor bytes were altered or damaged")
        if fingerprint is not None and not accepts(fingerprint, meta["fingerprint"]):
            raise mismatch(fingerprint, meta["fingerprint"], "snapshot")
        if shapes is not None and shapes != actual:
            raise SnapshotMismatch(f"snapshot shapes {actual} do not fit this model, which expects {shapes}")
        n_ssm, n_kv = int(meta["n_ssm"]), int(meta["n_kv"])
        try:
            ssm = [tensors[f"ssm.{i}"].to(device) for i in range(n_ssm)]
            kv = [(tensors[f"kv.{i}.k"].to(device), tensors[f"kv.{i}.v"].to(device)) for i in range(n_kv)]
            kv_valid = tensors["kv_valid"].to(device) if n_kv else None
        except KeyError as e:
            raise SnapshotCorrupt(f"snapshot lacks tensor {e}") from e
        batch = int(meta.get("batch", 0)) or None
        return cls(ssm=ssm, kv=kv, kv_valid=kv_valid, fingerprint=fingerprint or meta["fingerprint"], batch=batch)


def read_header(data: bytes) -> dict[str, str]:
    """Validate and return the metadata header of fast-weight bytes without loading any tensor.

    Raises `SnapshotCorrupt` for anything that is not an agentsleep fast-weight file, `SnapshotMismatch` for a
    format version this code does not know.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"fast-weight data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise SnapshotCorrupt(f"fast-weight data is {len(data)} bytes long: truncated or empty")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > _MAX_HEADER or 8 + n > len(data):
        raise SnapshotCorrupt("not a safetensors payload (bad header length): truncated or not a snapshot")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotCorrupt(f"snapshot header is not valid JSON ({e}): the bytes are damaged") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise SnapshotCorrupt("these bytes are a safetensors file but not an agentsleep fast-weight snapshot")
    missing = {"format_version", "fingerprint", "dtype", "n_ssm", "n_kv", "shapes", "sha256"} - meta.keys()
    if missing:
        raise SnapshotCorrupt(f"snapshot header lacks {sorted(missing)}")
    try:
        version = int(meta["format_version"])
    except ValueError as e:
        raise SnapshotCorrupt(f"bad format_version {meta['format_version']!r}") from e
    if version > FORMAT_VERSION:
        raise SnapshotMismatch(
            f"snapshot format version {version} is newer than this agentsleep understands ({FORMAT_VERSION}); upgrade"
        )
    return meta


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
