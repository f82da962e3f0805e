"""Shared test settings: deterministic, single-threaded torch (2 shared cores; threads caused 10–30× spikes)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(42)


@pytest.fixture(autouse=True)
def _private_default_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's default snapshot store (`AGENTSLEEP_STORE_URL`, which `SleepMemory()` and the CLI fall back to) is
    its own file: the built-in default, ./agentsleep.db, would carry agents from one test (and one run) into the next.
    Tests of the default itself delete the variable."""
    db = tmp_path_factory.mktemp("default-store") / "agentsleep.db"
    monkeypatch.setenv("AGENTSLEEP_STORE_URL", f"sqlite:///{db}")
