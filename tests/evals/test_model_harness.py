"""`python -m evals.model` on a tiny config: trains every variant, writes the table, the numbers and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from evals.model import main


def test_harness_writes_table_json_and_png(tmp_path: Path) -> None:
    argv = ["--set", "W=5", "--set", "t=1", "--model", "layout=ag", "--passes", "1", "2", "--seeds", "0",
            "--baselines", "--steps", "4", "--warm-start", "2", "--batch-size", "4", "--eval-every", "2",
            "--eval-size", "8", "--final-eval-size", "16", "--name", "tiny", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "res")]  # fmt: skip
    data = main(argv)
    md = (tmp_path / "res" / "tiny.md").read_text()
    png = tmp_path / "res" / "tiny.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "python -m evals.model --set W=5" in md
    for label in ("sleep N=1", "sleep N=2", "whole cache", "hard eviction", "2x depth"):
        assert label in md
    saved = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert set(saved["variants"]) == {"n1", "n2", "attn_full", "attn_evict", "hybrid_2x"}
    assert [s["seed"] for s in saved["variants"]["n2"]["seeds"]] == [0]
    assert saved["variants"]["attn_full"]["seeds"][0]["window"] == 4 * 5 + 5  # one window holds the whole sequence
    assert saved["variants"]["hybrid_2x"]["seeds"][0]["layout"] == "agag"
    # N=1 and N=2 both continue the one shared N=1 warm start (same weights, same data stream from step 2)
    for key in ("n1", "n2"):
        cfg = json.loads((tmp_path / "runs" / "tiny" / f"{key}-s0" / "train_config.json").read_text())
        assert cfg["init_from"].endswith("warm-s0") and cfg["start_step"] == 2
    assert [row[0] for row in saved["variants"]["n2"]["seeds"][0]["curve"]] == [0, 2, 4]
    # a rerun only reports
    weights = tmp_path / "runs" / "tiny" / "n1-s0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = main([*argv, "--report-only"])
    assert weights.stat().st_mtime_ns == stamp
    assert again["variants"]["n2"]["mean"] == data["variants"]["n2"]["mean"]


def test_baselines_only_with_their_own_curriculum(tmp_path: Path) -> None:
    argv = ["--set", "W=5", "--set", "t=1", "--model", "layout=ag", "--passes", "--baselines", "--baseline-kinds",
            "attn_full", "--baseline-curriculum", "0:t=0;2:", "--steps", "3", "--batch-size", "4", "--eval-every", "0",
            "--final-eval-size", "8", "--name", "b", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "res")]  # fmt: skip
    data = main(argv)
    assert set(data["variants"]) == {"attn_full"}
    cfg = json.loads((tmp_path / "runs" / "b" / "attn_full-s0" / "train_config.json").read_text())
    assert cfg["curriculum"] == [[0, {"t": 0}], [2, {}]] and cfg["model"]["layout"] == "aa"
    assert "baselines: curriculum `0:t=0;2:`" in (tmp_path / "res" / "b.md").read_text()
