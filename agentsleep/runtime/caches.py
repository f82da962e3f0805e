"""Window-cache plumbing for the torch engine: cheap consistent copies, and stacking agents into one batch.

`SleepHybrid.extend` never writes into a tensor in place: it replaces ``cache.layers[i]``, ``cache.h`` and friends with
new tensors. So a shallow copy of a `WindowCache` (a new list of the same layer states) is a consistent, frozen view:
the engine extends a copy and swaps it in only on success (a failing call leaves the agent untouched), and a
background sleep reads a copy while the agent keeps taking tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agentsleep.model.hybrid import WindowCache
from agentsleep.model.layers import LayerState


def copy_cache(cache: WindowCache) -> WindowCache:
    """A shallow copy that later `extend` calls on the original cannot change."""
    return WindowCache(
        state=cache.state,
        layers=list(cache.layers),
        h=cache.h,
        ids=cache.ids,
        key_valid=cache.key_valid,
        n_fresh=cache.n_fresh,
    )


def batch_key(cache: WindowCache) -> tuple[int, int, int]:
    """Caches with equal keys have equal shapes everywhere and may be stepped as one batch (same window slots, same
    retained prefix, same real-token count)."""
    return cache.ids.shape[1], cache.key_valid.shape[1], cache.n_fresh


def _cat(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts, 0)  # type: ignore[arg-type]


def stack_caches(caches: Sequence[WindowCache]) -> WindowCache:
    """One batched cache from single-agent caches with the same `batch_key`.

    The batched cache's ``state`` is the first agent's: `extend` never reads it, and `split_cache` restores each
    agent's own window-start state.
    """
    layers = []
    for i in range(len(caches[0].layers)):
        per = [c.layers[i] for c in caches]
        kv = None
        if per[0].kv is not None:
            kv = (torch.cat([p.kv[0] for p in per], 0), torch.cat([p.kv[1] for p in per], 0))  # type: ignore[index]
        layers.append(LayerState(kv=kv, ssm=_cat([p.ssm for p in per]), conv=_cat([p.conv for p in per])))
    return WindowCache(
        state=caches[0].state,
        layers=layers,
        h=torch.cat([c.h for c in caches], 0),
        ids=torch.cat([c.ids for c in caches], 0),
        key_valid=torch.cat([c.key_valid for c in caches], 0),
        n_fresh=caches[0].n_fresh,
    )


def split_cache(batched: WindowCache, index: int, state_of_row: WindowCache) -> WindowCache:
    """Row ``index`` of a batched cache as a single-agent cache (views, no copy), with that agent's own state."""
    r = slice(index, index + 1)

    def row(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[r]

    layers = [
        LayerState(
            kv=None if st.kv is None else (st.kv[0][r], st.kv[1][r]),
            ssm=row(st.ssm),
            conv=row(st.conv),
        )
        for st in batched.layers
    ]
    return WindowCache(
        state=state_of_row.state,
        layers=layers,
        h=batched.h[r],
        ids=batched.ids[r],
        key_valid=batched.key_valid[r],
        n_fresh=batched.n_fresh,
    )


__all__ = ["batch_key", "copy_cache", "split_cache", "stack_caches"]
