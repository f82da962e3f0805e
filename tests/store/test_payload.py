"""The snapshot container (payload.py): canonical bytes, strict parsing, window validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsleep.errors import InvalidInput, SnapshotCorrupt
from agentsleep.model.state import FastWeights
from agentsleep.store import payload as container

from .helpers import toy_state


def test_encoding_is_canonical() -> None:
    # safetensors writes metadata in hash-map order; the store's bytes must depend on the content only
    a = container.encode(container.canonical(toy_state(1).to_bytes()), [1, 2], fingerprint="toy-abc")
    b = container.encode(container.canonical(toy_state(1).to_bytes()), [1, 2], fingerprint="toy-abc")
    assert a == b
    assert a != container.encode(container.canonical(toy_state(1).to_bytes()), [1, 3], fingerprint="toy-abc")


def test_canonical_state_bytes_still_parse() -> None:
    raw = toy_state(2).to_bytes()
    canon = container.canonical(raw)
    assert int.from_bytes(canon[:8], "little") % 8 == 0
    assert FastWeights.from_bytes(canon).digest() == toy_state(2).digest()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=300))
def test_any_int64_window_round_trips(window: list[int]) -> None:
    dec = container.decode(container.encode(b"state-bytes", window, fingerprint="fp"))
    assert dec.window == window and dec.state_bytes == b"state-bytes" and dec.fingerprint == "fp"
    assert dec.record is None


def test_record_round_trips() -> None:
    dec = container.decode(container.encode(b"s", [1], fingerprint="fp", record={"agent_id": "a", "seq": 3}))
    assert dec.record == {"agent_id": "a", "seq": 3}


@pytest.mark.parametrize("window", [[1.0], ["1"], [None], [True], [2**63], np.array([1.5])], ids=str)
def test_bad_windows(window: object) -> None:
    with pytest.raises(InvalidInput):
        container.window_array(window)  # type: ignore[arg-type]


def test_every_truncation_is_rejected() -> None:
    data = container.encode(b"x" * 64, list(range(10)), fingerprint="fp")
    for n in range(0, len(data), 7):
        with pytest.raises(SnapshotCorrupt):
            container.decode(data[:n])


def test_every_single_bit_flip_is_rejected_or_harmless() -> None:
    """A flipped bit either makes decoding fail or (header whitespace/JSON-equivalent) yields identical content."""
    data = container.encode(b"abcdefgh" * 8, list(range(16)), fingerprint="fp")
    good = container.decode(data)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        try:
            dec = container.decode(bytes(bad))
        except SnapshotCorrupt:
            continue
        except Exception as e:  # anything untyped is a bug
            pytest.fail(f"flip at byte {i} raised {type(e).__name__}: {e}")
        assert (dec.state_bytes, dec.window) == (good.state_bytes, good.window), f"flip at byte {i} went unnoticed"
