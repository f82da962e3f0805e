"""Seeded, deterministic data generators shared by training and evals (`spec/tasks.md`).

    task = get_task("rule110", preset="toy", t=8)
    batch = task.generate("train", n=64, seed=0)      # Batch: tokens [n, T] int64, loss_mask [n, T] bool, meta
    metrics = task.score(predicted_ids, batch)         # predicted_ids[i, j] = the prediction for tokens[i, j]
    task.save_tokenizer("runs/ckpt")                   # writes runs/ckpt/tokenizer.json

Registry names: ``rule110``, ``depo``, ``gsm_symbolic``, ``gsm_zoo``, and the English tasks ``family`` and
``gsm_english`` (reasoning-gym's generators, word-level tokens). Each has ``paper`` and ``toy`` presets (Rule 110 also
``toy16``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from agentsleep.errors import InvalidInput
from agentsleep.tasks import depo, family, gsm, gsm_english, gsm_zoo, rule110
from agentsleep.tasks.base import (
    Batch,
    Split,
    TaskConfig,
    build_tokenizer,
    decode,
    pack_rows,
    save_tokenizer,
    target_aligned,
    validate_layout,
)
from agentsleep.tasks.depo import DepoConfig
from agentsleep.tasks.family import FamilyConfig
from agentsleep.tasks.gsm import GSMSymbolicConfig
from agentsleep.tasks.gsm_english import GSMEnglishConfig
from agentsleep.tasks.gsm_zoo import GSMZooConfig
from agentsleep.tasks.rule110 import Rule110Config


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry: the config class, its presets, and the module's generate / score functions."""

    name: str
    config_cls: type[TaskConfig]
    presets: Mapping[str, TaskConfig]
    generate: Callable[..., Batch]
    score: Callable[[Any, Batch, Any], dict[str, float]]


TASKS: dict[str, TaskSpec] = {
    "rule110": TaskSpec(
        "rule110", Rule110Config, rule110.PRESETS, rule110.generate, lambda p, b, c: rule110.score(p, b)
    ),
    "depo": TaskSpec("depo", DepoConfig, depo.PRESETS, depo.generate, depo.score),
    "gsm_symbolic": TaskSpec(
        "gsm_symbolic", GSMSymbolicConfig, gsm.SYMBOLIC_PRESETS, gsm.generate, lambda p, b, c: gsm.score(p, b)
    ),
    "gsm_zoo": TaskSpec(
        "gsm_zoo", GSMZooConfig, gsm_zoo.ZOO_PRESETS, gsm_zoo.generate, lambda p, b, c: gsm.score(p, b)
    ),
    "family": TaskSpec("family", FamilyConfig, family.PRESETS, family.generate, family.score),
    "gsm_english": TaskSpec(
        "gsm_english", GSMEnglishConfig, gsm_english.PRESETS, gsm_english.generate, gsm_english.score
    ),
}


class Task:
    """A configured task: generate batches, build its tokenizer, score predictions."""

    def __init__(self, spec: TaskSpec, config: TaskConfig) -> None:
        self.spec = spec
        self.config = config

    @property
    def name(self) -> str:
        return self.spec.name

    def generate(self, split: Split, n: int, seed: int) -> Batch:
        """``n`` examples of ``split`` (train / val / test); identical for identical (config, split, seed)."""
        return self.spec.generate(split, n, seed, self.config)

    def tokenizer(self) -> Tokenizer:
        return build_tokenizer(self.config)

    def save_tokenizer(self, path: str | Path) -> Path:
        return save_tokenizer(self.config, path)

    def decode(self, ids: Any) -> str:
        return decode(self.config, ids)

    def score(self, predictions: Any, batch: Batch) -> dict[str, float]:
        """Model-free metrics from predicted ids ``[n, T]`` (or target-aligned logits ``[n, T, V]``)."""
        return self.spec.score(predictions, batch, self.config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def pad_id(self) -> int:
        return self.config.pad_id

    @property
    def bos_id(self) -> int:
        return self.config.bos_id

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def describe(self) -> str:
        return self.config.describe()

    def __repr__(self) -> str:
        return f"Task({self.describe()})"


def get_task(name: str, preset: str = "toy", **overrides: Any) -> Task:
    """A registered task at a preset scale, with any knob overridden (field names or aliases such as ``W``, ``L``)."""
    if name not in TASKS:
        raise InvalidInput(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    spec = TASKS[name]
    if preset not in spec.presets:
        raise InvalidInput(f"task {name!r} has no preset {preset!r}; presets: {sorted(spec.presets)}")
    return Task(spec, spec.presets[preset].with_overrides(**overrides))


def list_tasks() -> dict[str, list[str]]:
    """Registered task names and their presets."""
    return {name: sorted(spec.presets) for name, spec in TASKS.items()}


__all__ = [
    "TASKS",
    "Batch",
    "DepoConfig",
    "FamilyConfig",
    "GSMEnglishConfig",
    "GSMSymbolicConfig",
    "GSMZooConfig",
    "Rule110Config",
    "Split",
    "Task",
    "TaskConfig",
    "TaskSpec",
    "build_tokenizer",
    "decode",
    "get_task",
    "list_tasks",
    "pack_rows",
    "save_tokenizer",
    "target_aligned",
    "validate_layout",
]
