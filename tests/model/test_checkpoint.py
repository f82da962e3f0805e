"""Checkpoint directories load back to the same model (same fingerprint, same outputs) and fail clearly when broken."""

from __future__ import annotations

import json

import pytest
import torch

from agentsleep.errors import CheckpointError
from agentsleep.model.hybrid import HybridConfig, SleepHybrid


def _model(**kw) -> SleepHybrid:
    return SleepHybrid(HybridConfig(vocab_size=11, d_model=64, window=8, bos_token_id=9, pad_token_id=10, **kw))


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(tmp_path, tie):
    m = _model(tie_embeddings=tie)
    m.save_pretrained(tmp_path, extra_config={"seed": 3})
    back = SleepHybrid.from_pretrained(tmp_path)
    assert back.fingerprint == m.fingerprint and back.config == m.config
    x = torch.randint(0, 9, (2, 8))
    with torch.no_grad():
        a, sa = m.forward_chunk(x, m.init_state(2), passes=2)
        b, sb = back.forward_chunk(x, back.init_state(2), passes=2)
    assert torch.equal(a, b) and sa.allclose(sb, rtol=0, atol=0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["SleepHybridForCausalLM"] and cfg["agentsleep"] == {"seed": 3}


def test_fingerprint_tracks_weights():
    m = _model()
    fp = m.fingerprint
    with torch.no_grad():
        m.lm_head.weight[0, 0] += 1.0
    assert m.refresh_fingerprint() != fp


def test_broken_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        SleepHybrid.from_pretrained(tmp_path)
    m = _model()
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="could not be read"):
        SleepHybrid.from_pretrained(tmp_path)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        SleepHybrid.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SleepHybrid.from_pretrained(tmp_path)
