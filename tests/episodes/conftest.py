from __future__ import annotations

from pathlib import Path

import pytest

from agentsleep.episodes.harness import preload
from tests.episodes.helpers import build_suite


@pytest.fixture(scope="session", autouse=True)
def _fork_server_preload() -> None:
    """Have the episode fork server (started by the first run) import both drivers once, not once per child."""
    preload("evals.episodes.langchain_driver", "tests.episodes.test_harness")


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of tiny checkpoints (see helpers.build_suite)."""
    return build_suite(tmp_path_factory.mktemp("checkpoints"))
