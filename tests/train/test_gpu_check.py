"""scripts/gpu_check.sh and scripts/gpu_check.py, as far as a CPU host can run them: argument handling, the refusal
on a host without a GPU, the CPU dry run end to end (every stage, the summary), and a loss comparison that fails.
The GPU stages themselves only run on a CUDA host (docs/scale.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SH = ROOT / "scripts" / "gpu_check.sh"
PY = ROOT / "scripts" / "gpu_check.py"
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without a GPU")


def sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SH), *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def py(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PY), *args], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "msg"),
    [(["--bogus"], "unknown argument '--bogus'"), (["--steps", "0"], "positive integer"), (["--out"], "--out needs")],
)
def test_bad_arguments_are_one_line_errors(args: list[str], msg: str) -> None:
    r = sh(*args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


@no_gpu
def test_without_a_gpu_it_refuses_in_one_line_and_names_the_dry_run(tmp_path: Path) -> None:
    r = sh("--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gpu_check.sh: no CUDA device visible to torch (a CPU-only build or no GPU); --cpu-dry-run runs the CPU-side "
        "parts"
    ]
    assert not list(tmp_path.iterdir())  # nothing started
    r = py("--out", str(tmp_path), "--device", "cuda")
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
    r = py("--out", str(tmp_path), "--device", "tpu")
    assert r.returncode == 2 and "--device must be cpu or cuda" in r.stderr


def test_host_blocker_names_a_missing_fla(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import importlib.util

    assert gpu_check.host_blocker("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fla" else real(name, *a))
    assert "fla-core / triton are not installed" in gpu_check.host_blocker("cuda")


def test_cpu_dry_run_runs_every_cpu_stage_and_prints_the_summary(tmp_path: Path) -> None:
    r = sh("--cpu-dry-run", "--out", str(tmp_path), "--steps", "2", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in r.stdout.splitlines() if "|" in line}
    assert rows["cuda-tests"] == "PASS" and rows["train"] == "PASS" and rows["serving"] == "SKIP"
    assert "CPU DRY RUN" in r.stdout and r.stdout.strip().endswith("PASSED")
    assert "skipped" in r.stdout and "CUDA ones skip on CPU" in r.stdout
    s = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert s["ok"] and s["device"] == "cpu" and s["steps"] == 2 and s["fla_kernel_calls"] == 0
    assert s["rel_diff_last"] <= s["tolerance"] == 0.02
    assert s["line"] in r.stdout
    # the tiny Qwen3.5's GDN heads (32) are listed as what vLLM's kernels cannot serve
    assert any("GDN head sizes" in p for p in s["serving_problems"])
    for name in ("cuda-tests", "train"):
        assert (tmp_path / f"{name}.log").stat().st_size > 0


def test_the_loss_comparison_can_fail(tmp_path: Path) -> None:
    r = py("--out", str(tmp_path), "--device", "cpu", "--steps", "2", "--tol", "1e-9", timeout=900)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 1 and not s["ok"] and s["rel_diff_last"] > 1e-9
