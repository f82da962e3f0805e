"""Fixtures shared by the unit and integration tests of langchain-agentsleep."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lc_helpers import build_checkpoint  # noqa: E402  (this directory is on sys.path under pytest's rootdir mode)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat checkpoint: L=96, N=2, role-token chat template stored in config.json."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "chat")


@pytest.fixture(autouse=True)
def _private_default_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's default snapshot store (`AGENTSLEEP_STORE_URL`, which `SleepMemory()` and the CLI fall back to) is
    its own file: the built-in default, ./agentsleep.db, would carry agents from one test (and one run) into the next.
    Tests of the default itself delete the variable."""
    db = tmp_path_factory.mktemp("default-store") / "agentsleep.db"
    monkeypatch.setenv("AGENTSLEEP_STORE_URL", f"sqlite:///{db}")
