"""Parameter grouping (Muon for block matrices, AdamW for the rest) and optimizer state as safetensors + JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentsleep.errors import CheckpointError
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.train.muon import Muon
from agentsleep.train.optim import Optimizers, lr_factor, param_groups


@pytest.fixture
def model() -> SleepHybrid:
    return SleepHybrid(HybridConfig(vocab_size=7, d_model=64, layout="agag", gdn_heads=1, window=6, bos_token_id=5,
                                    pad_token_id=6))  # fmt: skip


def test_every_parameter_in_exactly_one_group(model: SleepHybrid) -> None:
    muon, adamw = param_groups(model)
    names = [n for n, _ in muon] + [n for n, _ in adamw]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(set(names)) == len(names)
    assert all(p.dim() == 2 and n.startswith("layers.") for n, p in muon)
    adamw_names = {n for n, _ in adamw}
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adamw_names
    for kind in ("A_log", "dt_bias", "conv1d.weight", "input_layernorm.weight", "q_norm.weight", "linear_attn.norm"):
        assert any(kind in n for n in adamw_names), kind
    assert any("in_proj_qkvz" in n for n, _ in muon) and any("down_proj" in n for n, _ in muon)


def test_tied_embeddings_counted_once() -> None:
    m = SleepHybrid(HybridConfig(vocab_size=7, d_model=64, layout="ag", window=6, tie_embeddings=True))
    muon, adamw = param_groups(m)
    ids = [id(p) for _, p in muon + adamw]
    assert len(ids) == len(set(ids)) == len({id(p) for p in m.parameters()})


def test_optimizer_state_roundtrip(model: SleepHybrid, tmp_path: Path) -> None:
    opts = Optimizers(model, name="muon")
    assert isinstance(opts.opts[0], Muon)
    x = torch.randint(0, 5, (2, 13))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, -3:] = True
    for _ in range(2):
        opts.zero_grad()
        model(x, mask, 2)[1].backward()
        opts.step()
    opts.save(tmp_path)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    fresh = Optimizers(model, name="muon")
    fresh.load(tmp_path)
    for a, b in zip(opts.opts, fresh.opts):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for pid in sa["state"]:
            for k, v in sa["state"][pid].items():
                torch.testing.assert_close(torch.as_tensor(sb["state"][pid][k]), torch.as_tensor(v), rtol=0, atol=0)
    with pytest.raises(CheckpointError):
        Optimizers(model, name="adamw").load(tmp_path)


def test_lr_schedule() -> None:
    assert lr_factor(0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_factor(9, warmup=10, total=100) == 1.0
    assert lr_factor(50, warmup=10, total=100) == 1.0
    assert lr_factor(100, warmup=10, total=100, schedule="cosine") == pytest.approx(0.1)
