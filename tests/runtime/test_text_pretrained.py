"""A TorchEngine on an imported Hugging Face checkpoint speaks the checkpoint's own text: its tokenizer, its chat
template and its stop tokens; with one window holding everything, greedy decoding equals transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentsleep.runtime import SamplingParams, TorchEngine
from tests.model.hf_tiny import force_torch_gdn, make_hf

from .chat_templates import HERMES

pytest.importorskip("transformers")


@pytest.fixture
def hf_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, torch.nn.Module]:
    force_torch_gdn(monkeypatch)
    return tmp_path, make_hf("qwen3_5_text-gqa2", tmp_path, seed=3, chat_template=HERMES)


@torch.no_grad()
def test_engine_uses_the_checkpoint_tokenizer_template_and_stops(hf_dir) -> None:
    path, hf = hf_dir
    engine = TorchEngine.from_pretrained(path, window=64)
    assert engine.codec is not None and engine.codec.chat is not None
    im_end = engine.codec.tokenizer.token_to_id("<|im_end|>")
    assert engine.codec.stop_token_ids == (im_end,)
    prompt = engine.codec.chat_prompt([{"role": "user", "content": "Sleep consolidates the window."}])
    assert engine.decode(prompt).endswith("<|im_start|>assistant\n")
    engine.create_agent("a")
    out = engine.generate("a", prompt, SamplingParams(max_new_tokens=12))
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert list(out.tokens) == want[0, len(prompt) :].tolist()
    # stopping at the model's own end-of-turn token: force it to be the greedy choice
    engine.model.lm_head.weight[im_end] = engine.model.lm_head.weight[out.tokens[0]] * 5
    engine.create_agent("b")
    stop = SamplingParams(max_new_tokens=12, stop_tokens=engine.codec.stop_token_ids)
    res = engine.generate("b", prompt, stop)
    assert res.tokens[-1] == im_end and res.stop_reason == "stop"


def test_overrides_reach_the_model(hf_dir) -> None:
    path, _ = hf_dir
    engine = TorchEngine.from_pretrained(path, passes=2, window=16, insert_memory=[1])
    assert engine.window == 16 and engine.passes == 2 and len(engine.model.config.layout) == 5
