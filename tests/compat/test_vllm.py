"""The vLLM engine revives agents saved by agentsleep 0.1.0 (v1 fingerprints) and answers as the reference does: the
engine accepts the legacy tag, and its connector, which reads the checkpoint's fingerprint from config.json (a 0.1.0
checkpoint records only v1 there), restores the right state instead of silently starting from zero."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentsleep.runtime import SamplingParams, TorchEngine
from agentsleep.serving.settings import VLLM_MISSING
from agentsleep.store import SnapshotStore
from tests.serving.helpers import explained_by_rounding

from .helpers import CHECKPOINTS, V2, expected, model, replies, sqlite_copy

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=VLLM_MISSING)
def test_vllm_engine_revives_0_1_0_agents(tmp_path: Path) -> None:
    url = sqlite_copy(tmp_path / "store.db")
    cases = [r for r in replies() if expected()["agents"][r["agent"]]["checkpoint"] == "hard"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.compat.vllm_revive", url, str(CHECKPOINTS / "hard"), str(tmp_path / "cases.json"),
         str(out)],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    exact = 0
    with SnapshotStore(url) as store:
        for case, ours in zip(cases, got["replies"], strict=True):
            engine = TorchEngine(model("hard"))  # the reference, on the very same snapshot
            engine.revive(case["agent"], store, case["snapshot_id"])
            ref = engine.generate(
                case["agent"], case["prompt"], SamplingParams(max_new_tokens=case["max_new_tokens"]), return_logits=True
            )
            assert list(ref.tokens) == case["engine"]
            ref_rows = torch.log_softmax(ref.logits.float(), -1)
            assert explained_by_rounding(ours["tokens"], case["engine"], torch.tensor(ours["logprobs"]), ref_rows), (
                case,
                ours["tokens"],
            )
            exact += ours["tokens"] == case["engine"]
        assert exact >= len(cases) - 1  # bf16 may part at one near-tie at most, never everywhere
        saved = store.get(got["saved"])
        agent = cases[0]["agent"]
        assert saved.fingerprint == V2["hard"] == store.agent(agent).fingerprint  # its next save took the v2 tag
