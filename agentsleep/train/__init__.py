"""Algorithm-1 training: Muon + AdamW, checkpoints, resumable runs (`agentsleep train`)."""

from agentsleep.train.muon import Muon, newton_schulz
from agentsleep.train.optim import Optimizers, param_groups
from agentsleep.train.trainer import TrainConfig, evaluate, train

__all__ = ["Muon", "Optimizers", "TrainConfig", "evaluate", "newton_schulz", "param_groups", "train"]
