"""FastWeights wire format: exact round trips, and typed errors for every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from agentsleep.errors import InvalidInput, SnapshotCorrupt, SnapshotMismatch
from agentsleep.model.state import FORMAT_VERSION, FastWeights, read_header


def state(batch: int = 1, sliding: bool = False, fp: str = "model-a") -> FastWeights:
    ssm = [torch.randn(batch, 2, 64, 64) for _ in range(2)]
    if not sliding:
        return FastWeights(ssm=ssm, fingerprint=fp)
    kv = [(torch.randn(batch, 2, 5, 32), torch.randn(batch, 2, 5, 32))]
    return FastWeights(ssm=ssm, kv=kv, kv_valid=torch.ones(batch, 5), fingerprint=fp)


@pytest.mark.parametrize("sliding", [False, True], ids=["hard", "sliding"])
def test_round_trip_is_exact(sliding):
    s = state(batch=2, sliding=sliding)
    back = FastWeights.from_bytes(s.to_bytes(), fingerprint="model-a", shapes=s.shapes())
    assert back.digest() == s.digest() and back.fingerprint == "model-a"
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), s.tensors().values()))
    assert read_header(s.to_bytes())["format_version"] == str(FORMAT_VERSION)


def test_batch_select_stack_split():
    s = state(batch=3, sliding=True)
    parts = list(s.split())
    assert [p.batch_size for p in parts] == [1, 1, 1]
    assert FastWeights.stack(parts).digest() == s.digest()
    with pytest.raises(SnapshotMismatch):
        FastWeights.stack([state(fp="a"), state(fp="b")])


def test_truncated_bytes_raise_snapshot_corrupt():
    data = state().to_bytes()
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(SnapshotCorrupt):
            FastWeights.from_bytes(data[:cut])


def test_flipped_bytes_in_tensor_data_are_detected():
    data = bytearray(state().to_bytes())
    data[-1000] ^= 0x40  # inside the tensor payload: safetensors alone would load this silently
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        FastWeights.from_bytes(bytes(data))


def test_damaged_header_is_detected():
    data = bytearray(state().to_bytes())
    data[20] = 0xFF  # inside the JSON header
    with pytest.raises(SnapshotCorrupt):
        FastWeights.from_bytes(bytes(data))


def test_mismatched_model_or_shapes():
    s = state()
    with pytest.raises(SnapshotMismatch, match="made by model"):
        FastWeights.from_bytes(s.to_bytes(), fingerprint="model-b")
    with pytest.raises(SnapshotMismatch, match="shapes"):
        FastWeights.from_bytes(s.to_bytes(), shapes={"ssm.0": [1, 2, 64, 64]})


def test_not_a_snapshot():
    other = st_save({"w": torch.zeros(3)}, metadata={"format": "pt"})
    with pytest.raises(SnapshotCorrupt, match="not an agentsleep"):
        FastWeights.from_bytes(other)
    with pytest.raises(SnapshotCorrupt):
        FastWeights.from_bytes(b"hello, this is a text file, not a snapshot at all")
    with pytest.raises(InvalidInput):
        FastWeights.from_bytes("a string")  # type: ignore[arg-type]


def test_newer_format_version_is_refused_clearly():
    s = state()
    tensors = {k: v.contiguous() for k, v in s.tensors().items()}
    meta = json.loads(json.dumps(read_header(s.to_bytes())))
    meta["format_version"] = str(FORMAT_VERSION + 1)
    with pytest.raises(SnapshotMismatch, match="newer"):
        FastWeights.from_bytes(st_save(tensors, metadata=meta))


def test_header_shapes_must_match_data():
    s = state()
    tensors = {k: v.contiguous() for k, v in s.tensors().items()}
    meta = read_header(s.to_bytes())
    meta["shapes"] = json.dumps({"ssm.0": [9], "ssm.1": [9]})
    with pytest.raises(SnapshotCorrupt, match="declares shapes"):
        FastWeights.from_bytes(st_save(tensors, metadata=meta))
