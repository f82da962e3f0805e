"""Sampled-N training (`--passes-dist`): the draws are reproducible and in range, each window gets its own N, the
loss at a per-window N equals a window-by-window reference, and a sampled run resumes bit-identically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from agentsleep.cli import main
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.train import trainer
from agentsleep.train.trainer import TrainConfig, draw_passes, make_task, passes_label, passes_probs, train
from tests.train.test_trainer import tiny, weights


def test_fixed_dist_is_the_plain_n() -> None:
    cfg = tiny(passes=3)
    assert not cfg.sampled_passes and draw_passes(cfg, 0, 5, 4) == [3, 3, 3, 3] and passes_label(cfg) == "3"
    assert passes_probs(cfg) == {3: 1.0}
    same = tiny(passes=2, passes_dist="uniform", passes_min=2)  # a range of one value is fixed too
    assert not same.sampled_passes and draw_passes(same, 0, 0, 2) == [2, 2]


def test_uniform_draws_are_reproducible_per_window_and_cover_the_range() -> None:
    cfg = tiny(passes=8, passes_dist="uniform")
    assert passes_label(cfg) == "U{1..8}"
    draws = np.array([draw_passes(cfg, 7, s, 5) for s in range(2000)])  # [steps, windows]
    assert draws.min() == 1 and draws.max() == 8
    assert np.array_equal(draws[123], draw_passes(cfg, 7, 123, 5))  # a pure function of (data seed, step)
    assert not np.array_equal(draws[:, 0], draws[:, 1])  # windows draw independently
    assert not np.array_equal(draws, np.array([draw_passes(cfg, 8, s, 5) for s in range(2000)]))
    freq = np.bincount(draws.ravel(), minlength=9)[1:] / draws.size
    assert np.allclose(freq, 1 / 8, atol=0.01)
    per_step = tiny(passes=8, passes_dist="uniform", passes_per="step")
    rows = [draw_passes(per_step, 0, s, 4) for s in range(50)]
    assert all(len(set(r)) == 1 for r in rows) and len({r[0] for r in rows}) > 1


def test_lognormal_poisson_mean_and_truncation() -> None:
    cfg = tiny(passes=8, passes_dist="lognormal_poisson", passes_mean=3.0, passes_min=2)
    draws = np.concatenate([draw_passes(cfg, 0, s, 4) for s in range(3000)])
    assert draws.min() == 2 and draws.max() == 8
    probs = passes_probs(cfg)
    assert set(probs) == set(range(2, 9)) and sum(probs.values()) == pytest.approx(1.0)
    assert probs[2] > probs[4] > probs[8] > 0  # heavy on shallow sleeps, a tail to N_max
    assert abs(draws.mean() - sum(n * p for n, p in probs.items())) < 0.1


def test_log_uniform_is_one_over_n_and_matches_its_draws() -> None:
    cfg = tiny(passes=8, passes_dist="log_uniform")
    assert passes_label(cfg) == "LogU{1..8}"
    probs = passes_probs(cfg)
    assert set(probs) == set(range(1, 9)) and sum(probs.values()) == pytest.approx(1.0)
    assert all(probs[n] * n == pytest.approx(probs[1]) for n in probs)  # P(N = n) ∝ 1/n
    draws = np.concatenate([draw_passes(cfg, 3, s, 4) for s in range(5000)])
    freq = np.bincount(draws, minlength=9)[1:] / draws.size
    assert np.allclose(freq, [probs[n] for n in range(1, 9)], atol=0.012)
    shifted = passes_probs(tiny(passes=8, passes_dist="log_uniform", passes_min=2))
    assert set(shifted) == set(range(2, 9)) and shifted[2] == pytest.approx(2 * shifted[4])


def test_bad_dist_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        tiny(passes=2, passes_dist="uniform", passes_min=3)
    with pytest.raises(ValueError):
        tiny(passes=4, passes_dist="lognormal_poisson", passes_mean=6.0)
    with pytest.raises(ValueError):
        tiny(passes=4, passes_dist="poisson")
    with pytest.raises(ValueError):
        tiny(eval_passes=[0])


def reference_loss(model: SleepHybrid, x: torch.Tensor, m: torch.Tensor, passes: list[int]) -> torch.Tensor:
    """Window by window through the public API: `sleep` for label-free windows, `forward_chunk` for the label one."""
    L = model.config.window
    state = model.init_state(x.shape[0])
    total, count = torch.zeros(()), 0
    for w, s in enumerate(range(0, x.shape[1], L)):
        xw, mw = x[:, s : s + L], m[:, s : s + L].bool()
        if not mw.any():
            state = model._run_window(xw, state, passes[w])[1]  # = model.sleep, with gradients
            continue
        logits, state = model.forward_chunk(xw, state, 1)  # logits[:, i] predicts token i + 1
        assert not mw[:, 0].any()  # Rule 110's label window opens with Q, never a target
        total = total + F.cross_entropy(logits[:, :-1][mw[:, 1:]], xw[:, 1:][mw[:, 1:]], reduction="sum")
        count += int(mw.sum())
    return total / count


def test_per_window_passes_loss_matches_the_window_by_window_reference() -> None:
    cfg = tiny(passes=4, passes_dist="uniform")
    task = make_task(cfg)
    model = trainer.build_model(cfg, task)
    b = task.generate("train", 4, 0)
    x, m = torch.from_numpy(b.tokens), torch.from_numpy(b.loss_mask)
    per_window = [3, 1, 4, 2, 1]
    got = trainer.windowed_loss(model, x, m, per_window)
    torch.testing.assert_close(got, reference_loss(model, x, m, per_window), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trainer.windowed_loss(model, x, m, [2] * 5), model(x, m, 2)[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, model(x, m, 4)[1])  # the draws matter
    with pytest.raises(ValueError):
        trainer.windowed_loss(model, x, m, [2, 2])  # fewer counts than windows


def test_training_feeds_the_drawn_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real = trainer.batch_loss

    def spy(model: SleepHybrid, batch: Any, passes: Any, cfg: Any = None) -> Any:
        seen.append(list(passes))
        return real(model, batch, passes, cfg)

    monkeypatch.setattr(trainer, "batch_loss", spy)
    cfg = tiny(passes=4, passes_dist="uniform", steps=4, eval_every=0, save_every=0, seed=3)
    train(cfg, tmp_path, progress=False)
    assert seen == [draw_passes(cfg, 3, s, 5) for s in range(4)]


def test_sampled_run_resumes_bit_identically_and_scores_every_eval_n(tmp_path: Path) -> None:
    cfg = dict(passes=4, passes_dist="uniform", eval_passes=[1, 2, 4])
    train(tiny(steps=6, **cfg), tmp_path / "full", progress=False)
    train(tiny(steps=3, **cfg), tmp_path / "split", progress=False)
    train(tiny(steps=6, **cfg), tmp_path / "split", progress=False)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert ev["passes"] == 4 and set(ev["by_passes"]) == {"1", "2", "4"}
    assert ev["by_passes"]["4"]["exact"] == ev["exact"]
    model = SleepHybrid.from_pretrained(tmp_path / "full")
    assert model.config.passes == 4  # N_max is the checkpoint's default sleep depth
    task = make_task(tiny())
    again = trainer.evaluate(model, task, task.generate("test", 32, 0), 1)
    assert again["exact"] == pytest.approx(ev["by_passes"]["1"]["exact"])
    saved = TrainConfig.model_validate_json((tmp_path / "full" / "train_config.json").read_text())
    assert saved.passes_dist == "uniform" and saved.eval_passes == [1, 2, 4]


def test_a_run_from_before_the_new_fields_still_resumes(tmp_path: Path) -> None:
    train(tiny(steps=3), tmp_path, progress=False)
    p = tmp_path / "train_config.json"
    old = {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith(("passes_", "eval_passes"))}
    p.write_text(json.dumps(old))
    res = train(tiny(steps=6), tmp_path, progress=False)
    assert res["step"] == 6


def test_cli_sampled_n_and_one_line_errors(tmp_path: Path) -> None:
    base = ["train", "--set", "W=5", "--set", "t=1", "--model", "layout=ag", "--steps", "2", "--batch-size", "4",
            "--eval-every", "0", "--final-eval-size", "16", "--no-progress"]  # fmt: skip
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [*base, "--passes", "4", "--passes-dist", "lognormal-poisson", "--passes-mean", "2.5", "--eval-passes", "1",
         "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["passes_dist"] == "lognormal_poisson" and saved["passes_mean"] == 2.5 and saved["passes"] == 4
    assert set(json.loads((out / "eval.json").read_text())["by_passes"]) == {"1", "4"}
    bad = CliRunner().invoke(main, [*base, "--passes", "2", "--passes-dist", "uniform", "--passes-min", "3",
                                    "--out", str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "passes_min" in bad.output
    logu_args = [*base, "--passes", "4", "--passes-dist", "log-uniform", "--out", str(tmp_path / "lu")]
    logu = CliRunner().invoke(main, logu_args)
    assert logu.exit_code == 0, logu.output
    assert json.loads((tmp_path / "lu" / "train_config.json").read_text())["passes_dist"] == "log_uniform"
