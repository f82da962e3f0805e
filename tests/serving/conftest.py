"""Fixtures of the vLLM suite: one test checkpoint and one in-process vLLM engine for the whole session (vLLM start-up
is ~10–30 s on 2 shared cores), the spec/vllm-cpu.md §2 settings, and the skip when vLLM is not installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from agentsleep.model.hybrid import SleepHybrid
from agentsleep.serving.settings import VLLM_MISSING, apply_env_defaults

from .helpers import build_checkpoint, gpu_share

apply_env_defaults()  # before vLLM is imported anywhere in this session
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def needs_vllm() -> None:
    if not HAS_VLLM:
        pytest.skip(VLLM_MISSING)
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"{VLLM_MISSING}: {e}")


@pytest.fixture(scope="session")
def vllm_available() -> None:
    needs_vllm()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy-hybrid")


@pytest.fixture(scope="session")
def reference(checkpoint: Path) -> SleepHybrid:
    return SleepHybrid.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def engine(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The session's `VLLMEngine` (its transport store doubles as the store of the raw connector tests)."""
    needs_vllm()
    from agentsleep.serving.engine import VLLMEngine

    share = gpu_share()  # several vLLM instances share one GPU in the acceptance run
    llm_kwargs = {"gpu_memory_utilization": share} if share is not None else None
    eng = VLLMEngine(checkpoint, state_dir=tmp_path_factory.mktemp("vllm-state"), max_num_seqs=8, llm_kwargs=llm_kwargs)
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(42)
