"""Parameter grouping (Muon for block matrices, AdamW for the rest), the LR schedule, and optimizer state as
safetensors + JSON.

The split follows paper.md A22 and STYLE.md §1: 2-D weight matrices inside the blocks go to Muon; embeddings, the
output head, norms, the GDN gate parameters (``A_log``, ``dt_bias``, tagged ``_no_weight_decay``) and the depthwise
conv kernels go to AdamW. Optimizer state is saved as tensors (safetensors) plus a JSON description, never pickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from agentsleep.errors import CheckpointError
from agentsleep.train.distributed import full, is_sharded, like
from agentsleep.train.muon import Muon, Scale

OptimizerName = Literal["muon", "adamw"]
OPTIM_TENSORS, OPTIM_JSON = "optimizer.safetensors", "optimizer.json"


def is_muon_param(name: str, p: nn.Parameter) -> bool:
    """2-D matrices inside the block stack (attention, GDN projections, MLP): orthogonalised updates make sense."""
    return name.startswith("layers.") and p.dim() == 2


def param_groups(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon parameters, AdamW parameters), each as (name, parameter), every trainable parameter exactly once.

    Tied weights (the same tensor under two names) appear once, under the first name.
    """
    muon, adamw = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if is_muon_param(name, p) else adamw).append((name, p))
    return muon, adamw


class Optimizers:
    """Muon + AdamW stepped together, with one LR multiplier for the schedule. A plain container, not a framework."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: OptimizerName = "muon",
        lr_muon: float = 2e-3,
        lr_adamw: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        muon_momentum: float = 0.95,
        muon_scale: Scale = "rms",
    ) -> None:
        muon, adamw = param_groups(model)
        if name == "adamw":  # ablation / earlier CPU trials: AdamW on everything
            adamw, muon = muon + adamw, []
        decay = [p for n, p in adamw if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
        no_decay = [p for n, p in adamw if not (p.dim() >= 2 and not getattr(p, "_no_weight_decay", False))]
        self.names = [n for n, _ in muon] + [n for n, _ in adamw]
        self.opts: list[torch.optim.Optimizer] = []
        if muon:
            self.opts.append(
                Muon(
                    [p for _, p in muon],
                    lr=lr_muon,
                    momentum=muon_momentum,
                    weight_decay=weight_decay,
                    scale=muon_scale,
                )
            )
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        self.opts.append(torch.optim.AdamW(groups, lr=lr_adamw, betas=betas))
        for opt in self.opts:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor

    # ------------------------------------------------------------------ state as safetensors + JSON

    def save(self, path: Path, *, write: bool = True) -> None:
        """Write ``optimizer.safetensors`` (every state tensor, whole) and ``optimizer.json`` (hyperparameters, layout).

        Sharded (FSDP2) state is gathered, so under FSDP2 every rank calls this; only ranks with ``write`` write."""
        tensors: dict[str, torch.Tensor] = {}
        meta: list[dict[str, Any]] = []
        for i, opt in enumerate(self.opts):
            sd = opt.state_dict()
            for pid, st in sd["state"].items():
                for key, val in st.items():
                    t = full(val) if torch.is_tensor(val) else torch.tensor(val)
                    tensors[f"{i}.{pid}.{key}"] = t.detach().cpu().contiguous()
            meta.append({"type": type(opt).__name__, "param_groups": sd["param_groups"]})
        if not write:
            return
        save_file(tensors, str(path / OPTIM_TENSORS))
        (path / OPTIM_JSON).write_text(json.dumps({"names": self.names, "optimizers": meta}, indent=1) + "\n")

    def load(self, path: Path) -> None:
        try:
            meta = json.loads((path / OPTIM_JSON).read_text())
            tensors = load_file(str(path / OPTIM_TENSORS))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has no readable optimizer state: {e}") from e
        if meta["names"] != self.names or len(meta["optimizers"]) != len(self.opts):
            raise CheckpointError(f"optimizer state in {path} was saved for different parameters; start fresh")
        for i, (opt, m) in enumerate(zip(self.opts, meta["optimizers"])):
            params = [p for g in opt.param_groups for p in g["params"]]  # state-dict ids count these in order
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, t in tensors.items():
                oi, pid, name = key.split(".", 2)
                if int(oi) == i:
                    p = params[int(pid)]
                    if is_sharded(p) and t.shape == p.shape:  # FSDP2: this rank's shard of the saved whole tensor
                        t = like(t, p)
                    state.setdefault(int(pid), {})[name] = t
            groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in m["param_groups"]]  # JSON
            opt.load_state_dict({"state": state, "param_groups": groups})

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.opts)


def lr_factor(
    step: int, *, warmup: int, total: int, schedule: Literal["constant", "cosine"] = "constant", min_factor: float = 0.1
) -> float:
    """Linear warm-up over ``warmup`` steps (paper.md §6 [ours]: ~100 steps for CPU toys), then constant or cosine
    decay to ``min_factor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
