"""`agentsleep eval`: the trainer's held-out scores, per N, from nothing but the checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentsleep.cli import main
from agentsleep.errors import CheckpointError
from agentsleep.train.eval_cli import checkpoint_task, score_checkpoint
from tests.train.test_trainer import tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agentsleep.train.trainer import train

    out = tmp_path_factory.mktemp("ckpt")
    train(tiny(steps=4, final_eval_size=64, passes=2), out, progress=False)
    return out


def test_scores_equal_the_trainers_final_eval(ckpt: Path) -> None:
    final = json.loads((ckpt / "eval.json").read_text())
    got = score_checkpoint(ckpt, size=64)  # the checkpoint's own N (2), the trainer's test set (seed 0)
    assert list(got) == [2]
    assert got[2]["exact"] == pytest.approx(final["exact"]) and got[2]["loss"] == pytest.approx(final["loss"])


def test_cli_scores_several_n_and_overrides(ckpt: Path) -> None:
    res = CliRunner().invoke(main, ["eval", str(ckpt), "-N", "1", "-N", "2", "--size", "16", "--json"])
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output)
    assert set(scores) == {"1", "2"} and all(0.0 <= s["exact"] <= 1.0 for s in scores.values())
    assert checkpoint_task(ckpt, t=2).config.steps == 2  # a harder test set than the trained one (t=1)
    table = CliRunner().invoke(main, ["eval", str(ckpt), "--size", "8"])
    assert table.exit_code == 0 and table.output.splitlines()[0].split()[:2] == ["N", "exact"]


def test_bad_input_is_one_line_and_exit_2(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        checkpoint_task(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe not json")
    res = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "error:" in res.output
    res = CliRunner().invoke(main, ["eval", str(ckpt), "--set", "t=zz"])
    assert res.exit_code == 2 and "error:" in res.output
    assert CliRunner().invoke(main, ["eval", "--help"]).exit_code == 0


def test_cli_auto_passes(ckpt: Path) -> None:
    args = ["eval", str(ckpt), "-N", "3", "-N", "auto", "--max-passes", "3", "--tol", "0", "--size", "16", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output)
    assert scores["auto"]["mean_passes"] == 3.0  # tol 0 never stops early: the N = 3 sleep
    assert scores["auto"]["exact"] == scores["3"]["exact"] and scores["auto"]["loss"] == scores["3"]["loss"]
    quick = score_checkpoint(ckpt, ["auto"], size=16, max_passes=3, tol=1e9, criterion="kl")
    assert quick["auto"]["mean_passes"] == 2.0 and quick["auto"]["max_passes_used"] == 2.0
    for bad in (["-N", "x"], ["-N", "0"], ["-N", "auto", "--criterion", "entropy"], ["-N", "auto", "--tol", "-1"]):
        res = CliRunner().invoke(main, ["eval", str(ckpt), "--size", "8", *bad])
        assert res.exit_code == 2 and "error" in res.output.lower(), bad
