"""Data-parallel (DDP) and sharded (FSDP2) training under torchrun, on CPU with the gloo backend: two processes end
with the weights of one process (the global batch is split, the gradient is the whole batch's), rank 0 alone writes,
resume works, the run records its world size; Muon orthogonalises whole matrices under FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agentsleep.errors import ConfigError
from agentsleep.train.distributed import scale, shard_rows
from agentsleep.train.muon import newton_schulz
from agentsleep.train.trainer import TrainConfig, train

ARGS = ["--set", "W=5", "--set", "t=1", "--model", "layout=ag", "--batch-size", "7", "--eval-every", "2",
        "--eval-size", "16", "--final-eval-size", "16", "--save-every", "2", "--warmup", "1", "--lr-muon", "5e-3",
        "--lr-adamw", "5e-3", "--device", "cpu", "--no-progress"]  # fmt: skip  # batch 7: uneven shards (4 + 3)
TOL = 1e-5


def one_process(out: Path, steps: int) -> None:
    cfg = TrainConfig(
        task_overrides={"W": 5, "t": 1}, model={"layout": "ag"}, batch_size=7, eval_every=2, eval_size=16,
        final_eval_size=16, save_every=2, warmup=1, lr_muon=5e-3, lr_adamw=5e-3, device="cpu", steps=steps,
    )  # fmt: skip
    train(cfg, out, progress=False)


def torchrun(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "agentsleep.cli", "train", *ARGS, "--steps", str(steps), "--out", str(out), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def max_diff(a: Path, b: Path, name: str = "model.safetensors") -> float:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    one_process(out, 4)
    return out


def test_rows_are_split_evenly_and_the_loss_is_scaled_to_the_whole_batch() -> None:
    parts = [shard_rows(7, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(parts), np.arange(7)) and [len(p) for p in parts] == [4, 3]
    with pytest.raises(ConfigError, match="every process needs a row"):
        shard_rows(1, 0, 2)
    # rank losses (means over their own targets) scaled and averaged == the whole batch's mean
    sums, counts = [torch.tensor(6.0), torch.tensor(2.0)], [4, 1]
    scaled = [scale(s / n, n, 5, 2) for s, n in zip(sums, counts)]
    assert torch.allclose(sum(scaled) / 2, torch.tensor(8.0 / 5))


def test_muon_needs_whole_matrices() -> None:
    """Why FSDP2's Muon gathers: orthogonalising row shards separately is a different update."""
    g = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    whole = newton_schulz(g)
    per_shard = torch.cat([newton_schulz(g[:4]), newton_schulz(g[4:])])
    assert (whole - per_shard).abs().max() > 0.1


def test_ddp_two_processes_equal_one_and_resume(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun(out, 2)  # stops at step 2 with a resumable state …
    res = torchrun(out, 4)  # … and a second launch continues to step 4
    assert max_diff(reference, out) <= TOL
    assert max_diff(reference, out, "resume/optimizer.safetensors") <= TOL
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (reference / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 2, 4]  # written once, by rank 0
    for r, q in zip(rows[1:], ref_rows[1:]):  # the logged loss is the whole batch's, not rank 0's share
        assert abs(r["loss"] - q["loss"]) <= 1e-5 * max(1.0, abs(q["loss"]))
    assert res.stdout.count('"out"') == 1  # one summary line (rank 0)
    assert (
        json.loads((out / "eval.json").read_text())["exact"]
        == json.loads((reference / "eval.json").read_text())["exact"]
    )


def test_fsdp2_two_processes_equal_one(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    torchrun(out, 4, "--fsdp")
    assert max_diff(reference, out) <= TOL  # Muon saw whole matrices: per-shard NS would be far off
    assert max_diff(reference, out, "resume/optimizer.safetensors") <= TOL  # sharded state saved whole
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["fsdp"] is True
    from agentsleep.model.hybrid import SleepHybrid

    SleepHybrid.from_pretrained(out)  # rank 0's copy was saved whole: its weights hash to the recorded fingerprint
    assert json.loads((out / "eval.json").read_text())["loss"] == pytest.approx(
        json.loads((reference / "eval.json").read_text())["loss"], rel=1e-5
    )
