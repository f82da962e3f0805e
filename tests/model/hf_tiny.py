"""Tiny random Hugging Face checkpoints made with transformers' own classes (the parity oracle), and a small byte-level
BPE tokenizer with Qwen's special tokens. Nothing is downloaded."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]
VOCAB = 384  # the model's embedding rows; the tokenizer uses fewer (Qwen pads its embedding the same way)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Tools, functions and arguments: get_weather(city).",
    'user assistant system tool call response name arguments {"city": "Paris", "unit": "celsius"}',
    "Sleep consolidates the window into fast weights; the agent wakes with a fresh window.",
    "0123456789 + - * / = ? ! , . ; : ' \" ( ) [ ] { } < > _ | \n\n # Tools function parameters type object",
]


def force_torch_gdn(monkeypatch: Any) -> None:
    """Make transformers run Qwen3-Next / Qwen3.5 on their PyTorch reference ops.

    transformers binds the gated delta rule and the causal conv to fla's / causal-conv1d's kernels when those
    import (``use_kernel_func_from_hub_with_fallback``), and fla-core is installed here; its Triton kernels cannot run
    on a CPU. The module-level names are wrappers whose ``__wrapped__`` is the PyTorch fallback: we put it back.
    """
    import transformers.models.qwen3_5.modeling_qwen3_5 as q35
    import transformers.models.qwen3_next.modeling_qwen3_next as q3n

    names = (
        "torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn", "causal_conv1d_update"
    )  # fmt: skip
    for mod in (q35, q3n):
        for name in names:
            fn = inspect.unwrap(getattr(mod, name))
            assert fn.__module__ == mod.__name__, f"{name} did not unwrap to transformers' own function"
            monkeypatch.setattr(mod, name, fn)


def build_tokenizer() -> Any:
    """A byte-level BPE trained on a few sentences, with Qwen's chat and tool special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    quiet = {"show_progress": False}
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL, initial_alphabet=alphabet, **quiet)
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= VOCAB
    return tok


def save_tokenizer(path: Path, chat_template: str | None) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja), written by transformers as on the Hub."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=chat_template,
    )  # fmt: skip
    fast.save_pretrained(str(path))


def _randomise(model: torch.nn.Module, zero_centred: bool, seed: int) -> None:
    """Random values everywhere, including norms and biases, so that every parameter's role is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1.0, 8.0, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(r * 0.5 - 1.0)
            elif name.endswith("norm.weight"):
                plain = not zero_centred or "linear_attn.norm" in name
                p.copy_((1.0 if plain else 0.0) + 0.1 * r)
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * r)
            elif p.dim() == 3:  # conv kernels
                p.copy_(0.3 * r)
            else:
                p.copy_(r * 0.1)


def text_config_kwargs(**kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    return {**base, **kw}


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # (transformers class, config kwargs)
    "qwen3_5_text-gqa2": ("Qwen3_5ForCausalLM", text_config_kwargs(
        num_hidden_layers=4, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=32)),
    "qwen3_5_text-kv-ratio3-tied": ("Qwen3_5ForCausalLM", text_config_kwargs(
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=24,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=True)),
    "qwen3_next-moe": ("Qwen3NextForCausalLM", text_config_kwargs(
        num_hidden_layers=4, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3-bias": ("Qwen3ForCausalLM", text_config_kwargs(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True)),
    "qwen2": ("Qwen2ForCausalLM", text_config_kwargs(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)),
}  # fmt: skip

CONFIG_CLASSES = {
    "Qwen3_5ForCausalLM": "Qwen3_5TextConfig",
    "Qwen3NextForCausalLM": "Qwen3NextConfig",
    "Qwen3ForCausalLM": "Qwen3Config",
    "Qwen2ForCausalLM": "Qwen2Config",
}


def make_hf(case: str, path: Path, *, seed: int = 0, chat_template: str | None = None, **changes: Any) -> Any:
    """Create, randomise and save a tiny transformers model of ``case`` (config ``changes`` applied); returns the
    model (eval mode)."""
    import transformers

    cls_name, kw = CASES[case]
    config = getattr(transformers, CONFIG_CLASSES[cls_name])(**{**kw, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    _randomise(model, zero_centred=cls_name.startswith(("Qwen3_5", "Qwen3Next")), seed=seed)
    model.save_pretrained(str(path))
    save_tokenizer(path, chat_template)
    return model


def make_hf_multimodal(path: Path, *, seed: int = 0) -> Any:
    """A tiny Qwen3.5 vision-language checkpoint (``model_type: qwen3_5``); only its text model is imported."""
    import transformers

    text = text_config_kwargs(num_hidden_layers=4, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=2,
                              linear_key_head_dim=32, linear_value_head_dim=32)  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)  # fmt: skip
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = transformers.Qwen3_5ForConditionalGeneration(config).eval()
    _randomise(model, zero_centred=True, seed=seed)
    model.save_pretrained(str(path))
    save_tokenizer(path, None)
    return model
