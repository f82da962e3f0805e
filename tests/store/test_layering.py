"""The store's public API and its place in the layers (model → store → runtime): it imports no higher layer."""

from __future__ import annotations

import ast
import multiprocessing as mp
from pathlib import Path

import agentsleep.store

from .helpers import loaded_higher_layers

STORE_DIR = Path(agentsleep.store.__file__).parent
ALLOWED = {
    "agentsleep.errors",
    "agentsleep.ids",
    "agentsleep.model.depth",  # a job's sleep depth, plain data (no torch)
    "agentsleep.model.fingerprint",
    "agentsleep.model.state",
}


def test_public_api_is_pinned() -> None:
    assert sorted(agentsleep.store.__all__) == sorted(
        [
            "DEFAULT_INLINE_LIMIT",
            "DEFAULT_URL",
            "Agent",
            "AgentRecord",
            "Base",
            "LoadedSnapshot",
            "MAX_WINDOW_TOKENS",
            "SleepJobRecord",
            "Snapshot",
            "SnapshotRecord",
            "SnapshotStore",
        ]
    )
    for name in agentsleep.store.__all__:
        assert hasattr(agentsleep.store, name)


def test_store_imports_only_errors_and_fastweights_from_the_package() -> None:
    offenders = []
    for path in STORE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.startswith("agentsleep.") and not n.startswith("agentsleep.store") and n not in ALLOWED:
                    offenders.append(f"{path.relative_to(STORE_DIR)}: {n}")
    assert offenders == []


def test_importing_the_store_pulls_in_no_engine() -> None:
    # In a fresh interpreter: the forkserver is one per test process, and another test (the episode harness) may have
    # started it first with the whole stack preloaded.
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(loaded_higher_layers) == []
