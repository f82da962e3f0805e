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
