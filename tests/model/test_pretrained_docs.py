"""The code on docs/pretrained.md runs as written, on tiny checkpoints standing in for the real ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.runtime.chat_templates import HERMES

from .hf_tiny import CORPUS, force_torch_gdn, make_hf

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("transformers")


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "pretrained.md").read_text(), re.S)


def test_docs_pretrained_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    force_torch_gdn(monkeypatch)
    q35, q3 = tmp_path / "q35", tmp_path / "q3"
    make_hf("qwen3_5_text-gqa2", q35, num_hidden_layers=8, chat_template=HERMES)
    make_hf("qwen3-bias", q3, num_hidden_layers=8, chat_template=HERMES)
    (tmp_path / "corpus.txt").write_text(" ".join(CORPUS) * 120)
    subs = {
        "path/to/Qwen3.5-2B": str(q35),
        "path/to/Qwen3-1.7B": str(q3),
        "path/to/my-sleeping-qwen": str(tmp_path / "mine"),
        "path/to/corpus.txt": str(tmp_path / "corpus.txt"),
        "STEPS = 200": "STEPS = 2",
        # a short window for the tiny stand-in, so that fine-tuning on three windows stays quick
        "insert_memory=list(range(3, n, 4)), passes=4)": "insert_memory=list(range(3, n, 4)), passes=4, window=128)",
    }
    code = blocks()
    assert len(code) >= 5, "docs/pretrained.md lost its examples"
    spaces = []
    for src in code:
        for old, new in subs.items():
            src = src.replace(old, new)
        assert "path/to/" not in src, src
        ns: dict = {}
        exec(compile(src, "docs/pretrained.md", "exec"), ns)
        spaces.append(ns)
    # recipe 3 inserted memory layers; stage 1 of the fine-tuning trained them, and only them
    tuned = next(ns["model"] for ns in spaces if "opt" in ns)
    memory = [i for i, m in enumerate(tuned.config.mlp_kinds) if m == "-"]
    assert memory == [4, 9]  # after blocks 3 and 7 of 8
    for i in memory:
        assert tuned.layers[i].linear_attn.out_proj.weight.abs().sum() > 0
    start = type(tuned).from_pretrained(tmp_path / "mine")
    for name, p in tuned.named_parameters():
        if not name.startswith(tuple(f"layers.{i}." for i in memory)):
            assert torch.equal(p, start.state_dict()[name]), f"{name} is frozen in stage 1"
