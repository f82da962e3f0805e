"""Data-parallel and sharded training on `torch.distributed`, as launched by ``torchrun`` (nothing home-made).

``torchrun --nproc_per_node K $(which agentsleep) train ...`` starts K processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and a rendezvous address in their environment; `setup` joins them into one process group (NCCL on
GPUs, gloo on CPUs). Every rank generates the same global batch (the batch of a step is a pure function of the data
seed and the step) and trains on its own rows (`shard_rows`); the loss each rank backpropagates is scaled so that the
averaged gradient equals the one-process gradient of the whole batch (`Distributed.scale`), hence ``--batch-size``
stays the global batch and K processes follow the one-process run up to float rounding (tested).

Two ways to wrap the model, both around `Root`, a pass-through module whose ``forward(fn, *args)`` runs
``fn(model, *args)`` — so every loss and every evaluation enters the model through the wrapper's forward, whatever
model internals (window by window, sampled N, adaptive sleep) the function calls:

* DDP (default): `torch.nn.parallel.DistributedDataParallel`; each rank holds the whole model, gradients are
  all-reduced (averaged) in backward.
* FSDP2 (``--fsdp``): `torch.distributed.fsdp.fully_shard` on every block, then on the root (which holds the
  embedding, final norm and head): parameters, gradients and optimizer state are sharded (dim 0) across ranks and
  gathered per block for its forward and backward.

Muon orthogonalises each matrix's update as a whole (`agentsleep.train.muon`): under DDP every rank already holds the
full averaged gradient; under FSDP2 Muon gathers the sharded update, orthogonalises it, and keeps its own shard. Every
rank evaluates (the same numbers); rank 0 alone writes checkpoints, logs and progress.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from agentsleep.errors import ConfigError

log = logging.getLogger(__name__)

TIMEOUT = timedelta(hours=2)  # rank 0 writes checkpoints and evaluates while the others wait at a barrier


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world`` processes and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process created the process group (and destroys it in `teardown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, x: float) -> float:
        """The sum of ``x`` over all ranks."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → the rank's GPU if CUDA is available, else the CPU; ``cuda`` → ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def setup(device: str) -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (single process if it describes none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world == 1:
        return Distributed(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT, device_id=dev if dev.type == "cuda" else None)
    log.info("rank %d of %d on %s", rank, world, dev)
    return Distributed(rank=rank, world=world, local_rank=local, device=dev, owns_group=owns)


def teardown(d: Distributed) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    """The rows of an ``n``-row global batch that ``rank`` trains on: contiguous, sizes differing by at most one."""
    if n < world:
        raise ConfigError(f"batch size {n} is smaller than the {world} processes: every process needs a row")
    return np.array_split(np.arange(n), world)[rank]


def scale(loss_mean: Tensor, n_local: int, n_global: int, world: int) -> Tensor:
    """What one rank backpropagates: its targets' summed loss over the global target count, times ``world`` (DDP and
    FSDP2 average gradients over ranks), so the averaged gradient is that of the whole batch's mean loss."""
    return loss_mean * (n_local * world / max(n_global, 1))


class Root(nn.Module):
    """``Root(model)(fn, *args) == fn(model, *args)``: one forward that DDP / FSDP2 can wrap around any use of the
    model (their hooks run on the wrapper's forward, not on functions that call model internals directly)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def wrap(model: nn.Module, d: Distributed, *, fsdp: bool, find_unused: bool = False) -> nn.Module:
    """The module training calls: `Root` (one process), DDP over it, or FSDP2 shards of the model under it."""
    root = Root(model)
    if d.world == 1:  # nothing to share or shard with (``--fsdp`` in one process trains as usual)
        return root
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # A block returns its layer state beside its output, and those tensors are views (K/V heads, the conv tail);
        # nothing modifies them in place, which is what FSDP2's warning is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

        mesh = init_device_mesh(d.device.type, (d.world,))
        for block in model.layers:  # type: ignore[attr-defined]
            fully_shard(block, mesh=mesh)
        # The embedding, final norm and head (tied or not) belong to the root unit: gathered for the whole of
        # Root.forward, so any function the root runs may use them.
        fully_shard(root, mesh=mesh)
        return root
    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: DDP leaves the inputs alone (they are functions and batches; the loss moves its own tensors)
    return DistributedDataParallel(root, device_ids=None, find_unused_parameters=find_unused)


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """A tensor as a whole: a DTensor shard is gathered (collective: every rank must call), others returned as is."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def like(full_value: Tensor, param: Tensor) -> Tensor:
    """``full_value`` laid out as ``param``: this rank's shard if ``param`` is a DTensor (no communication: every rank
    holds the same full value), else the value itself on the parameter's device."""
    if not is_sharded(param):
        return full_value.to(param.device)
    p: Any = param
    return distribute_tensor(full_value.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)


def full_state_dict(model: nn.Module, d: Distributed) -> dict[str, Tensor] | None:
    """Every weight as a whole CPU tensor on rank 0 (None elsewhere). Under FSDP2 each shard is gathered, so every
    rank must call this."""
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        whole = full(t)
        if d.is_main:
            out[name] = whole.detach().to("cpu").contiguous()
    return out if d.is_main else None


def clip_grad_norm(params: Iterable[Tensor], clip: float | None) -> float:
    """Clip the global gradient norm at ``clip`` and return the norm before clipping (NaN if ``clip`` is None: no
    clipping, no measuring). Sharded (FSDP2) gradients give a sharded norm: it is gathered."""
    if not clip:
        return float("nan")
    return float(full(torch.nn.utils.clip_grad_norm_(params, clip)))
