"""`python -m evals.anyn` and `python -m evals.adaptive` on tiny checkpoints: every score is the scorer's, the goal
lines follow the numbers, and the reports name their command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentsleep.train.eval_cli import score_checkpoint
from agentsleep.train.trainer import train
from evals import adaptive, anyn
from tests.train.test_trainer import tiny


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("anyn")
    out = {}
    for key, kw in {
        "any0": dict(passes=4, passes_dist="uniform", seed=0),
        "any1": dict(passes=4, passes_dist="uniform", seed=1),
        "n2": dict(passes=2),
    }.items():
        train(tiny(steps=3, eval_every=0, save_every=0, final_eval_size=32, **kw), root / key, progress=False)
        out[key] = root / key
    return out


def test_anyn_report(ckpts: dict[str, Path], tmp_path: Path) -> None:
    fixed_json = tmp_path / "fixed.json"  # the shape evals.model writes; a fixed N=2 variant at 0.5 over 2 seeds
    seeds = [{"eval": {"exact": 0.4}}, {"eval": {"exact": 0.6}}]
    fixed_json.write_text(json.dumps({"variants": {"n2": {"baseline": False, "passes": 2, "seeds": seeds}}}))
    argv = ["--anyn", str(ckpts["any0"]), str(ckpts["any1"]), "--fixed", str(ckpts["n2"]), "--fixed-results",
            str(fixed_json), "--passes", "1", "2", "4", "--size", "32", "--name", "t",
            "--results-dir", str(tmp_path), "--scores-dir", str(tmp_path / "memo")]  # fmt: skip
    data = anyn.main(argv)
    assert [m["trained_n"] for m in data["anyn"]] == ["U{1..4}", "U{1..4}"] and data["fixed"][0]["trained_n"] == "2"
    want = score_checkpoint(ckpts["any1"], [1, 2, 4], size=32)
    assert {n: s["exact"] for n, s in data["anyn"][1]["scores"].items()} == {str(n): want[n]["exact"] for n in want}
    # the trainer's final eval (same 32 held-out examples) is reused, and equals the scorer's
    assert data["anyn"][0]["scores"]["4"]["exact"] == json.loads((ckpts["any0"] / "eval.json").read_text())["exact"]
    fresh = score_checkpoint(ckpts["any0"], [1, 2, 4], size=32)
    assert {n: s["exact"] for n, s in data["anyn"][0]["scores"].items()} == {str(n): fresh[n]["exact"] for n in fresh}
    assert data["fixed_reference"] == {2: {"mean": 0.5, "per_seed": [0.4, 0.6], "source": "fixed.json"}}
    md = (tmp_path / "t.md").read_text()
    assert "python -m evals.anyn --anyn" in md and "| any-N (`any0`) | U{1..4} | 0, 1 |" in md
    assert "N = 2: 0.500 (0.400, 0.600)" in md and "non-decreasing in N" in md
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "memo").glob("*.json"))) == 3 * 3  # one memo per checkpoint and N
    assert data["fixed"][0]["scores"]["2"] == {
        k: v for k, v in json.loads((ckpts["n2"] / "eval.json").read_text()).items() if k not in ("step", "passes")
    }
    assert anyn.main(argv)["anyn"] == data["anyn"]  # a rerun reads the memo


def test_adaptive_report(ckpts: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--models", str(ckpts["any0"]), "--max-passes", "4", "--fixed-passes", "1", "2", "--state-tols", "0",
            "1e9", "--kl-tols", "1e9", "--size", "32", "--name", "a", "--results-dir", str(tmp_path),
            "--scores-dir", str(tmp_path / "memo")]  # fmt: skip
    data = adaptive.main(argv)
    m = data["models"][0]
    assert set(m["fixed"]) == {"1", "2", "4"}  # N_max is always scored
    never, always = m["auto"][0]["scores"], m["auto"][1]["scores"]
    assert never["mean_passes"] == 4.0 and never["exact"] == m["fixed"]["4"]["exact"]  # tol 0: the N_max sleep
    assert always["mean_passes"] == 2.0 and always["exact"] == m["fixed"]["2"]["exact"]  # stops at the first test
    rows = {r["setting"]: r for r in adaptive.table_rows(data, "exact")}
    assert rows["auto, state < 1e+09"]["saving"] == pytest.approx(0.5)
    assert rows["auto, state < 0"]["saving"] == 0 and not rows["auto, state < 0"]["goal"]
    md = (tmp_path / "a.md").read_text()
    assert "python -m evals.adaptive --models" in md and "auto, kl < 1e+09" in md
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert data["select_seed"] is None and adaptive.held_out_choice(data, "exact") is None


def test_adaptive_tolerance_is_chosen_on_another_held_out_set(ckpts: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--models", str(ckpts["any0"]), str(ckpts["any1"]), "--max-passes", "4", "--fixed-passes", "2",
            "--state-tols", "0", "1e9", "--kl-tols", "--size", "32", "--select-seed", "5", "--name", "s",
            "--results-dir", str(tmp_path), "--scores-dir", str(tmp_path / "memo")]  # fmt: skip
    data = adaptive.main(argv)
    for m in data["models"]:
        sel = m["select"]
        assert sel["seed"] == 5 and len(sel["auto"]) == 2
        other = score_checkpoint(Path(m["path"]), [4], size=32, seed=5)[4]
        assert sel["fixed"]["exact"] == other["exact"]  # N_max on the selection set, not the reported one
        assert sel["auto"][0]["mean_passes"] == 4.0 and sel["auto"][1]["mean_passes"] == 2.0
    choice = adaptive.held_out_choice(data, "exact")
    ref = sum(m["select"]["fixed"]["exact"] for m in data["models"]) / 2
    stop_early = sum(m["select"]["auto"][1]["exact"] for m in data["models"]) / 2
    if ref - stop_early <= 0.01:  # tol 1e9 saves 50%: chosen iff it loses ≤ 1 point on the selection set
        assert choice is not None and choice["tol"] == 1e9 and choice["test"]["saving"] == pytest.approx(0.5)
    else:
        assert choice is None
    assert "chosen on a separate held-out set" in (tmp_path / "s.md").read_text()


def test_the_same_recipe_trained_longer_is_its_own_row() -> None:
    ms = [{"trained_n": "U{1..8}", "steps": s, "seed": i} for i, s in enumerate([900, 900, 1500])]
    assert list(anyn.group(ms)) == ["U{1..8}, 900 steps", "U{1..8}, 1500 steps"]
    assert list(anyn.group(ms[:2])) == ["U{1..8}"]  # one length: no steps in the label
