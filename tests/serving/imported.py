"""Tiny imported checkpoints for the vLLM suite: random Qwen3.5 / Qwen3-Next / Qwen3 models made with transformers'
own classes (tests/model/hf_tiny.py), imported with `SleepHybrid.from_pretrained` and saved in agentsleep's format,
with head sizes vLLM's CPU kernels serve (GDN 64, attention ≥ 32). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from agentsleep.model.hybrid import SleepHybrid
from tests.model.hf_tiny import CASES, make_hf, text_config_kwargs
from tests.runtime.chat_templates import HERMES

WINDOW = 48
_GDN = dict(linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=64)

# name -> (transformers class, config kwargs, import overrides, what it exercises)
SERVABLE: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # gated attention with partial RoPE (0.25) and (1 + w) norms, split GDN projections, 2 value heads per key head
    "qwen3_5": ("Qwen3_5ForCausalLM", text_config_kwargs(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64, **_GDN), {}),
    # fused per-key-head GDN projections, mixture-of-experts MLPs with a shared expert (one dense block)
    "qwen3_next": ("Qwen3NextForCausalLM", text_config_kwargs(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        mlp_only_layers=[1], **_GDN), {}),
    # attention only with q/k/v/o biases and q/k norms, plus two memory layers inserted without MLP
    "qwen3_memory": ("Qwen3ForCausalLM", text_config_kwargs(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        attention_bias=True), {"insert_memory": [0, 2]}),
    # attention-only Qwen3-Next with biases (gated attention, partial RoPE, (1 + w) norms, experts and a dense block):
    # no GDN layer, so vLLM runs it in float32 — exact parity of every attention and MLP variant
    "qwen3_next_attention": ("Qwen3NextForCausalLM", text_config_kwargs(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        layer_types=["full_attention", "full_attention"], attention_bias=True, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1], **_GDN), {}),
}  # fmt: skip


def bos_id(path: Path) -> int:
    """The id of Qwen's ``<|endoftext|>``: the BOS a served import opens every window with (docs/pretrained.md)."""
    from tokenizers import Tokenizer

    tid = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert tid is not None
    return int(tid)


def build_imported(case: str, root: Path, *, seed: int = 0, chat_template: str | None = HERMES) -> Path:
    """Make the transformers checkpoint of ``case`` under ``root/hf``, import it with a BOS and L = `WINDOW`, and save
    it under ``root/ours`` (returned). The GDN layers forget slowly (A_log = −8) and read out strongly, so S decides
    the output (spec §8.7); weights are rounded to bf16 so vLLM's bf16 copy holds the very same numbers."""
    cls_name, kwargs, overrides = SERVABLE[case]
    CASES[f"serving-{case}"] = (cls_name, kwargs)
    hf = root / "hf"
    make_hf(f"serving-{case}", hf, seed=seed, chat_template=chat_template)
    model = SleepHybrid.from_pretrained(hf, window=WINDOW, bos_token_id=bos_id(hf), **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.layers:
            if blk.kind == "g":
                blk.linear_attn.A_log.fill_(-8.0)
                w = blk.linear_attn.out_proj.weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)  # inserted memory layers start at zero otherwise
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.refresh_fingerprint()
    out = root / "ours"
    model.save_pretrained(out)
    return out
