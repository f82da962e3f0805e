"""`python -m evals.jet` on a tiny config: one run per (memory kind, N, seed), the same recipe for both kinds, the
table, numbers and plot written, and a rerun that only reports."""

from __future__ import annotations

import json
from pathlib import Path

from evals.jet import main


def test_jet_comparison_writes_table_json_and_png(tmp_path: Path) -> None:
    argv = ["--name", "tinyjet", "--passes", "1", "2", "--seeds", "0", "--steps", "3", "--jobs", "1", "--",
            "--task", "depo", "--preset", "micro", "--batch-size", "4", "--eval-every", "0", "--final-eval-size", "8",
            "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]  # fmt: skip
    data = main(argv)
    assert set(data) == {"g", "j"}
    for kind in ("g", "j"):
        assert [v["passes"] for v in data[kind]["variants"].values()] == [1, 2]
        for n in (1, 2):
            cfg = json.loads((tmp_path / "runs" / f"tinyjet_{kind}" / f"n{n}-s0" / "train_config.json").read_text())
            assert cfg["model"]["layout"] == f"a{kind}" and cfg["passes"] == n and cfg["steps"] == 3
    g_cfg = json.loads((tmp_path / "runs" / "tinyjet_g" / "n2-s0" / "train_config.json").read_text())
    j_cfg = json.loads((tmp_path / "runs" / "tinyjet_j" / "n2-s0" / "train_config.json").read_text())
    same = {k for k in g_cfg if k not in ("model", "fingerprint")}
    assert {k: g_cfg[k] for k in same} == {k: j_cfg[k] for k in same}  # only the memory kind differs
    md = (tmp_path / "res" / "tinyjet.md").read_text()
    assert "python -m evals.jet --name tinyjet" in md
    assert "| GDN | 1 |" in md and "| Jet (dynamic conv) | 2 |" in md
    assert (tmp_path / "res" / "tinyjet.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "res" / "tinyjet.json").read_text())
    assert set(saved["kinds"]) == {"g", "j"}
    weights = tmp_path / "runs" / "tinyjet_j" / "n1-s0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = main([*argv[: argv.index("--")], "--report-only", *argv[argv.index("--") :]])
    assert weights.stat().st_mtime_ns == stamp
    assert again["j"]["variants"] == data["j"]["variants"]
