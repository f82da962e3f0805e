"""The training loop: it learns, resumes bit-identically, feeds every N the same data, writes loadable checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tokenizers import Tokenizer

from agentsleep.cli import main
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.train import trainer
from agentsleep.train.cli import parse_curriculum, parse_overrides
from agentsleep.train.trainer import TrainConfig, make_task, stage_at, train, windowed_loss


def tiny(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        task="rule110", preset="toy", task_overrides={"W": 5, "t": 1}, model={"layout": "ag"}, steps=6,
        batch_size=8, eval_every=3, eval_size=32, final_eval_size=32, save_every=3, warmup=2, lr_muon=5e-3,
        lr_adamw=5e-3,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_loss_decreases_on_easy_task(tmp_path: Path) -> None:
    res = train(tiny(steps=40, eval_every=20, lr_muon=1e-2, lr_adamw=1e-2), tmp_path, progress=False)
    first, last = res["history"][0]["eval"]["loss"], res["eval"]["loss"]
    assert last < first - 0.5, (first, last)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert {"tokens", "wall", "loss"} <= set(rows[1]) and rows[1]["tokens"] == 20 * 8 * 25


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    train(tiny(steps=6), tmp_path / "full", progress=False)
    train(tiny(steps=3), tmp_path / "split", progress=False)  # stops at 3 (writes a resumable state) …
    res = train(tiny(steps=6), tmp_path / "split", progress=False)  # … and continues to 6
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["step"] == 6 and res["tokens"] == 6 * 8 * 25
    full_log = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    split_log = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in split_log] == [json.loads(x)["step"] for x in full_log]


def test_every_n_sees_the_same_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[int, list[np.ndarray]] = {}
    real = trainer.batch_loss

    def spy(model: SleepHybrid, batch: Any, passes: int, cfg: Any = None) -> Any:
        seen.setdefault(passes, []).append(batch.tokens.copy())
        return real(model, batch, passes, cfg)

    monkeypatch.setattr(trainer, "batch_loss", spy)
    for n in (1, 2):
        train(tiny(passes=n, steps=3, eval_every=0, save_every=0, seed=7), tmp_path / f"n{n}", progress=False)
    assert len(seen[1]) == len(seen[2]) == 3
    assert all(np.array_equal(a, b) for a, b in zip(seen[1], seen[2]))
    assert not np.array_equal(seen[1][0], seen[1][1])  # different steps, different batches


def test_checkpoint_loads_and_tokenizer_round_trips(tmp_path: Path) -> None:
    train(tiny(passes=2, steps=2), tmp_path, progress=False)
    model = SleepHybrid.from_pretrained(tmp_path)
    assert model.config.passes == 2 and model.config.layout == "ag"
    meta = json.loads((tmp_path / "config.json").read_text())["agentsleep"]
    assert meta["seed"] == 0 and meta["train_config"]["passes"] == 2 and "exact" in meta["eval"]
    assert json.loads((tmp_path / "eval.json").read_text())["exact"] == meta["eval"]["exact"]
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    task = make_task(tiny())
    batch = task.generate("test", 2, 0)
    text = task.decode(batch.tokens[0])
    assert tok.encode(text).ids == batch.tokens[0].tolist()
    assert tok.decode(batch.tokens[0].tolist()).replace(" ", "") == text
    # the loaded model scores exactly what training reported
    again = trainer.evaluate(model, task, task.generate("test", 32, 0), 2)
    assert again["exact"] == pytest.approx(meta["eval"]["exact"])


def test_warm_start_from_n1(tmp_path: Path) -> None:
    train(tiny(passes=1, steps=3), tmp_path / "n1", progress=False)
    cfg = tiny(passes=4, steps=0, init_from=str(tmp_path / "n1"))
    model = trainer.build_model(cfg, make_task(cfg))
    ref = weights(tmp_path / "n1")
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    assert model.config.passes == 4


def test_truncated_bptt_changes_gradients_not_values() -> None:
    cfg = tiny()
    task = make_task(cfg)
    model = trainer.build_model(cfg, task)
    b = task.generate("train", 4, 0)
    x, m = torch.from_numpy(b.tokens), torch.from_numpy(b.loss_mask)
    full = model(x, m, 2)[1]
    same = windowed_loss(model, x, m, 2, detach_every=100)
    torch.testing.assert_close(same, full, rtol=1e-6, atol=1e-6)
    cut = windowed_loss(model, x, m, 2, detach_every=1)
    torch.testing.assert_close(cut, full, rtol=1e-6, atol=1e-6)
    g_full = torch.autograd.grad(full, model.embed_tokens.weight)[0]
    g_cut = torch.autograd.grad(cut, model.embed_tokens.weight)[0]
    assert not torch.allclose(g_full, g_cut)


def test_curriculum_and_overrides_parse() -> None:
    assert parse_overrides(["W=16,t=8", "layout=agag"]) == {"W": 16, "t": 8, "layout": "agag"}
    stages = parse_curriculum("300:t=2; 0:t=1 ;600:")
    assert stages == [(0, {"t": 1}), (300, {"t": 2}), (600, {})]
    cfg = tiny(curriculum=stages)
    assert [stage_at(cfg, s) for s in (0, 299, 300, 700)] == [0, 0, 1, 2]
    assert make_task(cfg, stages[0][1]).config.steps == 1


def test_cli_train(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        "--set",
        "W=5",
        "--set",
        "t=1",
        "--model",
        "layout=ag",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--final-eval-size",
        "16",
        "--passes",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["step"] == 2 and "exact" in summary["eval"]
    assert json.loads((out / "train_config.json").read_text())["passes"] == 2
