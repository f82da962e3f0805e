"""Tiny task checkpoints built inside the tests: random weights, the task's own vocabulary and tokenizer.

Random weights answer wrongly, which is fine: the tests are about plumbing, sleep points and exact equality across
kills, revives and drivers. The fast weights are made to matter (slow forgetting, a strong GDN read-out, as
tests/runtime does), so a lost or duplicated sleep changes the replies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.tasks import Task, get_task

GSM_OVERRIDES: dict[str, Any] = {"ops": (1, 3), "min_tokens": 64, "max_tokens": 128, "test_size": 50}


def depo_task() -> Task:
    return get_task("depo", "toy")


def gsm_task(position: str = "last") -> Task:
    return get_task("gsm_symbolic", "toy", question_position=position, **GSM_OVERRIDES)


FAMILY_OVERRIDES: dict[str, Any] = {"max_family_size": 6, "names_per_gender": 8, "test_size": 40}


def family_task() -> Task:
    return get_task("family", "toy", **FAMILY_OVERRIDES)


def build_checkpoint(path: Path, task: Task, passes: int, *, seed: int = 0, layout: str = "agag", **model: Any) -> Path:
    """config.json (with the task under "agentsleep", as `agentsleep train` writes it), weights, tokenizer.json."""
    torch.manual_seed(seed)
    cfg = HybridConfig(
        vocab_size=task.vocab_size,
        window=model.pop("window", task.window),
        bos_token_id=task.bos_id,
        pad_token_id=task.pad_id,
        d_model=64,
        layout=layout,
        attn_heads=2,
        gdn_heads=1,
        gdn_head_dim=64,
        passes=passes,
        init_std=0.05,
        **model,
    )
    net = SleepHybrid(cfg).eval()
    with torch.no_grad():
        for block in net.layers:
            if block.kind == "g":
                block.linear_attn.A_log.fill_(-3.0)
                block.linear_attn.out_proj.weight.mul_(8.0)
    net.refresh_fingerprint()
    net.save_pretrained(path, extra_config={"task": task.name, "task_config": task.config.model_dump(mode="json")})
    task.save_tokenizer(path / "tokenizer.json")
    return path


def build_suite(root: Path) -> Path:
    """N=1 and N=2 checkpoints for Depo, question-last GSM and English family stories, plus attention-only Depo and
    family models with a long window."""
    root.mkdir(parents=True, exist_ok=True)
    build_checkpoint(root / "family-n1", family_task(), 1, seed=11)
    build_checkpoint(root / "family-n2", family_task(), 2, seed=12)
    build_checkpoint(root / "family-attn", family_task(), 1, seed=13, layout="aa", window=160)
    build_checkpoint(root / "depo-n1", depo_task(), 1, seed=1)
    build_checkpoint(root / "depo-n2", depo_task(), 2, seed=2)
    build_checkpoint(root / "gsm-last-n1", gsm_task(), 1, seed=3)
    build_checkpoint(root / "gsm-last-n2", gsm_task(), 2, seed=4)
    build_checkpoint(root / "depo-attn", depo_task(), 1, seed=5, layout="aa", window=160)
    return root
