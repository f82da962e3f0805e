"""Checkpoint discovery and planning: which checkpoints and conditions each block runs."""

from __future__ import annotations

import json
from pathlib import Path

from agentsleep.episodes.suite import find_checkpoints, pick_full_attention, pick_pair, plan, read_checkpoint
from tests.episodes.helpers import build_checkpoint, depo_task, gsm_task


def test_find_and_pick(suite: Path, tmp_path: Path) -> None:
    infos = find_checkpoints(suite, tmp_path)
    assert {i.path.name for i in infos} == {
        "depo-n1", "depo-n2", "gsm-last-n1", "gsm-last-n2", "depo-attn", "family-n1", "family-n2", "family-attn"
    }  # fmt: skip
    n1, best = pick_pair(infos, "depo")
    assert (n1.path.name, best.path.name, best.passes) == ("depo-n1", "depo-n2", 2)
    assert pick_pair(infos, "gsm_symbolic", question_position="first") == (None, None)
    assert pick_full_attention(infos, "depo", 160).path.name == "depo-attn"
    assert pick_full_attention(infos, "depo", 161) is None  # its window must hold the whole episode
    # A full-attention GSM model trained question-last is no baseline for question-first episodes.
    build_checkpoint(tmp_path / "gsm-attn", gsm_task("last"), 1, layout="aaaa", window=512)
    infos = find_checkpoints(suite, tmp_path)
    assert pick_full_attention(infos, "gsm_symbolic", 100, question_position="last").path.name == "gsm-attn"
    assert pick_full_attention(infos, "gsm_symbolic", 100, question_position="first") is None
    (tmp_path / "gsm-attn" / "config.json").unlink()
    # Among several N > 1, the best held-out score wins (eval.json, as `agentsleep train` writes it).
    n4 = build_checkpoint(tmp_path / "depo-n4", depo_task(), 4, seed=9)
    (n4 / "eval.json").write_text(json.dumps({"exact": 0.3}))
    (tmp_path / "depo-n2b").mkdir()
    assert read_checkpoint(tmp_path / "depo-n2b") is None  # not a checkpoint: ignored
    (tmp_path / "depo-n2b" / "config.json").write_bytes(b"\xff\xfe{")
    assert read_checkpoint(tmp_path / "depo-n2b") is None  # nor is a garbled config.json
    assert pick_pair(find_checkpoints(suite, tmp_path), "depo")[1].path.name == "depo-n4"
    # A deeper N=1 baseline (e.g. evals.model's "hybrid 2x depth") is not the N=1 of the pair, however it scores.
    deep = build_checkpoint(tmp_path / "depo-2x", depo_task(), 1, seed=10, layout="agagagag")
    (deep / "eval.json").write_text(json.dumps({"exact": 0.9}))
    assert pick_pair(find_checkpoints(suite, tmp_path), "depo")[0].path.name == "depo-n1"


def test_plan_blocks_and_conditions(suite: Path) -> None:
    infos = find_checkpoints(suite)
    retrieval, nodecoy, last, first = plan(infos, ["retrieval", "retrieval_nodecoy", "math_last", "math_first"], 2)
    assert [c.name for c in retrieval.conditions] == [
        "sleep N=1", "sleep N=2", "window truncation (N=2 weights)", "full attention, whole episode"
    ]  # fmt: skip
    assert retrieval.conditions[2].truncate and retrieval.conditions[3].full_history
    assert {e.meta["decoys"] for e in retrieval.episodes} == {9}  # default_split(25) = (16, 9)
    assert {e.meta["decoys"] for e in nodecoy.episodes} == {0}
    assert len(last.conditions) == 3 and any("full-attention baseline" in n for n in last.notes)
    assert first.conditions == [] and first.notes == ["no GSM checkpoint trained question-first"]


def test_stateful_block_records_version_seed_indices_and_self_test(suite: Path) -> None:
    (block,) = plan(find_checkpoints(suite), ["stateful_gsm"], 3)
    assert len(block.episodes) == 3 and block.conditions[0].name == "sleep N=1"
    assert "reasoning-gym 0.1.25" in block.notes[0] and "seed 1" in block.notes[0]
    assert f"entries used: {[e.meta['rg_index'] for e in block.episodes]}" in block.notes[0]
    assert block.notes[1].endswith("`answer_value` scores 1.0 on every entry: True; `None` scores 0.0: True")
