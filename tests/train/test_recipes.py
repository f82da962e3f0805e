"""The paper's recipes in `agentsleep train` (paper §6.3–6.4): what learns (``trainable``), the two-stage warm-up
(memory layers alone under hard eviction, then everything under sliding eviction), a looped block range, Jet memory
layers; and the scale settings: bf16 autocast with float32 weights and S, the device choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from agentsleep.cli import main
from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.train import trainer
from agentsleep.train.cli import parse_loop
from agentsleep.train.distributed import resolve_device
from agentsleep.train.trainer import TrainConfig, apply_trainable, make_task, train, trainable_names


def tiny(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        task="rule110", preset="toy", task_overrides={"W": 5, "t": 1}, model={"layout": "agag"}, steps=4,
        batch_size=8, eval_every=0, eval_size=16, final_eval_size=16, save_every=0, warmup=1, lr_muon=5e-3,
        lr_adamw=5e-3, device="cpu",
    )  # fmt: skip
    base.update(kw)
    model = {**base["model"], **kw.get("model", {})}
    base["model"] = model
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def initial(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.build_model(cfg, make_task(cfg)).state_dict().items()}


# ---------------------------------------------------------------------------------------------------- trainable


def test_trainable_selects_memory_mixers_or_glob_patterns() -> None:
    cfg = tiny(model={"layout": "agaj"})
    model = trainer.build_model(cfg, make_task(cfg))
    mem = trainable_names(model, "memory")
    assert mem and all(n.startswith(("layers.1.linear_attn.", "layers.1.input_layernorm.", "layers.3.linear_attn.",
                                      "layers.3.input_layernorm.")) for n in mem)  # fmt: skip
    assert any("dynamic_conv1d" in n for n in mem)  # the Jet layer's generator is part of its mixer
    assert trainable_names(model, "lm_head.*, layers.0.self_attn.q_proj.*") == [
        "layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ]
    assert trainable_names(model, "all") == [n for n, _ in model.named_parameters()]
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainable_names(model, "layers.9.*")
    attn_only = trainer.build_model(tiny(model={"layout": "aa"}), make_task(tiny()))
    with pytest.raises(ConfigError, match="no memory layer"):
        trainable_names(attn_only, "memory")
    n = apply_trainable(model, "memory")
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in mem)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == mem


def test_two_stage_recipe(tmp_path: Path) -> None:
    """Stage 1: only the memory layers move, under hard eviction; stage 2 starts from it, trains everything, sliding."""
    s1 = tiny(stage=1)
    assert s1.trainable == "memory" and s1.model["eviction"] == "hard"
    before = initial(s1)
    train(s1, tmp_path / "s1", progress=False)
    after = weights(tmp_path / "s1")
    mem = {n for n in before if ".linear_attn." in n and n.split(".")[1] in ("1", "3")}
    mem |= {f"layers.{i}.input_layernorm.weight" for i in (1, 3)}
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name in mem), name
    s2 = tiny(stage=2, init_from=str(tmp_path / "s1"))
    assert s2.trainable == "all" and s2.model["eviction"] == "sliding"
    train(s2, tmp_path / "s2", progress=False)
    final = weights(tmp_path / "s2")
    assert all(not torch.equal(after[n], final[n]) for n in after if n.endswith("q_proj.weight"))
    assert SleepHybrid.from_pretrained(tmp_path / "s2").config.eviction == "sliding"
    with pytest.raises(ValueError, match="stage 2 continues from the stage-1 checkpoint"):
        tiny(stage=2)
    explicit = tiny(stage=1, trainable="layers.1.*", model={"eviction": "sliding"})  # explicit settings win
    assert explicit.trainable == "layers.1.*" and explicit.model["eviction"] == "sliding"


def test_stage_cli_and_trainable_option(tmp_path: Path) -> None:
    base = ["train", "--set", "W=5", "--set", "t=1", "--model", "layout=ag", "--steps", "2", "--batch-size", "4",
            "--eval-every", "0", "--final-eval-size", "16", "--no-progress", "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(main, [*base, "--stage", "1", "--out", str(tmp_path / "s1")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "s1" / "train_config.json").read_text())
    assert saved["stage"] == 1 and saved["trainable"] == "memory" and saved["model"]["eviction"] == "hard"
    res = CliRunner().invoke(main, [*base, "--trainable", "nothing.*", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "matches no parameter" in res.output


# ---------------------------------------------------------------------------------------------------- loop, Jet


def test_a_looped_block_range_trains_and_is_recorded(tmp_path: Path) -> None:
    assert parse_loop("1:3") == [1, 3]
    with pytest.raises(InvalidInput, match="START:END"):
        parse_loop("1-3")
    base = ["train", "--set", "W=5", "--set", "t=1", "--model", "layout=agag", "--passes", "3", "--loop", "1:3",
            "--steps", "2", "--batch-size", "4", "--eval-every", "0", "--final-eval-size", "16", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path / "loop")]  # fmt: skip
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0, res.output
    model = SleepHybrid.from_pretrained(tmp_path / "loop")
    assert model.config.loop == (1, 3) and model.config.passes == 3
    bad = CliRunner().invoke(main, [*base[:-1], str(tmp_path / "bad"), "--loop", "2:9"])
    assert bad.exit_code == 2 and "loop" in bad.output


def test_jet_layers_train_with_slow_gates(tmp_path: Path) -> None:
    cfg = tiny(model={"layout": "ajaj"}, steps=3)
    model = trainer.build_model(cfg, make_task(cfg))
    for blk in model.layers[1::2]:  # gate_init="slow" reaches Jet layers too: A = 1
        assert torch.equal(blk.linear_attn.A_log, torch.zeros_like(blk.linear_attn.A_log))
    res = train(cfg, tmp_path, progress=False)
    assert res["step"] == 3 and SleepHybrid.from_pretrained(tmp_path).config.layout == "ajaj"


# ---------------------------------------------------------------------------------------------------- precision, device


def test_bf16_autocast_follows_float32_and_keeps_float32_weights(tmp_path: Path) -> None:
    kw = dict(steps=12, log_every=1, lr_muon=3e-3, lr_adamw=3e-3)
    fp32 = train(tiny(**kw), tmp_path / "fp32", progress=False)
    bf16 = train(tiny(precision="bfloat16", **kw), tmp_path / "bf16", progress=False)
    a = [r["loss"] for r in fp32["history"] if "loss" in r]
    b = [r["loss"] for r in bf16["history"] if "loss" in r]
    assert len(a) == len(b) == 12
    assert a != b  # bf16 really ran
    assert all(abs(x - y) <= 0.05 * abs(x) for x, y in zip(a, b)), list(zip(a, b))
    assert all(t.dtype == torch.float32 for t in weights(tmp_path / "bf16").values())


def test_device_choice() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    else:
        assert resolve_device("auto", 0) == torch.device("cuda:0")
