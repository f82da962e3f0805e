"""Adaptive sleep depth: pass over a window until the fast weights stop changing, at most ``max_passes`` times.

A sleep with a fixed N spends the same compute on every window. A model trained with sampled N (`agentsleep train
--passes-dist`, docs/training.md) is usable at every N ≤ N_max, so a sleep can stop as soon as another pass would not
change what crosses the window. Two stopping rules, measured against each other in docs/training.md:

* ``criterion="state"`` — relative change of S between passes j−1 and j, over every GDN layer of the stream:
  ``‖S_j − S_{j−1}‖_F / ‖S_j‖_F < tol`` (the quantity that leaves the window; no extra compute).
* ``criterion="kl"`` — successive passes' next-token predictions on the window agree:
  ``mean over window slots of KL(p_j ‖ p_{j−1}) < tol`` nats (one unembedding per pass; the early-exit test of
  recurrent-depth models, Geiping et al. 2025 §6).

Each stream of a batch stops on its own: once converged, its state is frozen at the pass that converged (later passes
still run for the other streams but do not touch it), so every row equals ``model.sleep(row, passes=used)`` exactly.
The first test is after pass 2 (it needs two passes to compare), so ``passes ≥ min(2, max_passes)``.

Runtime API (what a sleep policy should call; ``passes="auto"`` with ``max_passes`` and ``tol``)::

    out = sleep_adaptive(model, window_tokens, state, max_passes=8, tol=0.05)   # = model.sleep(...) with N="auto"
    out = sleep_window_adaptive(model, cache, max_passes=8, tol=0.05)           # = model.sleep_window(cache, ...)
    new_state, used = out.state, out.passes            # FastWeights, LongTensor [B] (passes each stream used)

A scheduler that must cut a sleep short caps ``max_passes`` by the idle time it has (passes cost about the same each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from agentsleep.errors import InvalidInput, WindowOverflow
from agentsleep.model.depth import (  # the depth as a value lives apart, so the store can take it without the model
    CRITERIA,
    AutoPasses,
    Criterion,
    Passes,
    cap_passes,
    check_auto,
    check_passes,
    nominal_passes,
    passes_to_json,
)
from agentsleep.model.hybrid import SleepHybrid, WindowCache
from agentsleep.model.layers import PassContext
from agentsleep.model.state import FastWeights


@dataclass
class AdaptiveSleep:
    """The result of one adaptive sleep over a window of B streams.

    Attributes:
        state: the state leaving the window (each row from the pass at which it stopped).
        passes: [B] int64, passes used per stream (1 ≤ passes ≤ max_passes).
        deltas: one [B] float tensor per pass j ≥ 2 that ran: the convergence measure between passes j−1 and j
            (for analysis; rows already stopped keep being measured on the batch's later passes, ignore them).
    """

    state: FastWeights
    passes: Tensor
    deltas: list[Tensor] = field(default_factory=list)


def _rows(done: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """``old`` where the stream has stopped, ``new`` elsewhere (``done`` [B] broadcast over trailing dims)."""
    return torch.where(done.view(-1, *([1] * (new.dim() - 1))), old, new)


def _state_change(prev: list[Tensor], cur: list[Tensor]) -> Tensor:
    """[B] relative Frobenius change over all of a stream's state tensors (empty when there are none)."""
    if not cur:
        return torch.zeros(0)
    num = sum(((c - p).double() ** 2).flatten(1).sum(1) for p, c in zip(prev, cur))
    den = sum((c.double() ** 2).flatten(1).sum(1) for c in cur)
    return (num.sqrt() / den.sqrt().clamp_min(1e-30)).float()  # type: ignore[union-attr]


def _prediction_kl(prev_logits: Tensor, logits: Tensor, valid: Tensor) -> Tensor:
    """[B] mean over valid slots of KL(p_new ‖ p_prev) of the next-token distributions (nats)."""
    lp, lq = F.log_softmax(logits.float(), -1), F.log_softmax(prev_logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, n]
    w = valid.float()
    return (kl * w).sum(1) / w.sum(1).clamp_min(1.0)


@torch.no_grad()
def sleep_adaptive(
    model: SleepHybrid,
    tokens: Tensor,
    state: FastWeights,
    *,
    max_passes: int,
    tol: float,
    criterion: Criterion = "state",
) -> AdaptiveSleep:
    """Consolidate one window into S, stopping each stream once it has converged (see the module docstring).

    Args:
        tokens: [B, T] with T ≤ L, the window to sleep on. state: the state entering the window.
        max_passes: N_max, the most passes any stream gets. tol: the threshold of ``criterion`` (0 = never stop
            early: exactly ``model.sleep(tokens, state, max_passes)``).

    Returns:
        `AdaptiveSleep` (state [B streams], passes used [B], the per-pass measures).
    """
    check_auto(max_passes, tol, criterion)
    if tokens.dim() != 2:
        raise InvalidInput(f"tokens must be [B, T], got {tuple(tokens.shape)}")
    T = tokens.shape[1]
    if T > model.config.window:
        raise WindowOverflow(f"{T} tokens do not fit a window of L={model.config.window}; split them or sleep")
    # The window set-up of SleepHybrid._run_window, then pass 1; passes 2.. run in `_continue`.
    ids, valid, _, prefix, key_valid, ctx = model._window_context(tokens, state)
    h, ssm, kvs = model._pass(model.embed_tokens(ids), ctx, list(state.ssm), prefix)
    return _continue(model, h, ssm, kvs, ctx, prefix, valid, key_valid, state.fingerprint, max_passes, tol, criterion)


@torch.no_grad()
def sleep_window_adaptive(
    model: SleepHybrid, cache: WindowCache, *, max_passes: int, tol: float, criterion: Criterion = "state"
) -> AdaptiveSleep:
    """`SleepHybrid.sleep_window` with adaptive depth: pass 1 already ran token by token in ``extend``; passes 2..
    run over the cached pass-1 features until each stream converges (or ``max_passes``). Equals
    ``sleep_adaptive(window tokens, cache.state, ...)``, as ``sleep_window`` equals ``sleep``."""
    check_auto(max_passes, tol, criterion)
    ssm = [st.ssm for st in cache.layers if st.ssm is not None]
    kvs = [st.kv for st in cache.layers if st.kv is not None]
    n, P = cache.ids.shape[1], cache.prefix_len
    valid = cache.key_valid[:, P:]
    ctx = model._pass_context(n, P, cache.key_valid)
    if n == 0:  # an empty window: nothing to sleep on
        max_passes = 1
    return _continue(
        model, cache.h, ssm, kvs, ctx, list(cache.state.kv), valid, cache.key_valid, cache.state.fingerprint,  # type: ignore[arg-type]
        max_passes, tol, criterion,
    )  # fmt: skip


def _continue(
    model: SleepHybrid,
    h: Tensor,
    ssm: list[Tensor],
    kvs: list[tuple[Tensor, Tensor]],
    ctx: PassContext,
    prefix: list[tuple[Tensor, Tensor]],
    valid: Tensor,
    key_valid: Tensor,
    fingerprint: str,
    max_passes: int,
    tol: float,
    criterion: Criterion,
) -> AdaptiveSleep:
    """Passes 2..max_passes from pass 1's features ``h`` [B, n, d] and state; each stream stops once converged."""
    B, n = valid.shape
    done = torch.zeros(B, dtype=torch.bool, device=h.device)
    used = torch.ones(B, dtype=torch.long, device=h.device)
    deltas: list[Tensor] = []
    logits = model.logits(h) if criterion == "kl" and max_passes > 1 else None
    sliding = model.config.eviction == "sliding"
    for j in range(2, max_passes + 1):
        h_new, ssm_new, kvs_new = model._pass(h, ctx, ssm, prefix)
        if criterion == "state":  # what crosses the window: S, plus the retained K/V under sliding eviction
            delta = _state_change(
                ssm + ([t for kv in kvs for t in kv] if sliding else []),
                ssm_new + ([t for kv in kvs_new for t in kv] if sliding else []),
            )
        else:
            new_logits = model.logits(h_new)
            delta = _prediction_kl(logits, new_logits, valid)  # type: ignore[arg-type]
            logits = _rows(done, logits, new_logits)  # type: ignore[arg-type]
        if delta.numel() == 0:  # nothing crosses the window (no GDN layer, hard eviction): one pass is all it takes
            break
        deltas.append(delta)
        h = _rows(done, h, h_new)
        ssm = [_rows(done, a, b) for a, b in zip(ssm, ssm_new)]
        kvs = [(_rows(done, ka, kb), _rows(done, va, vb)) for (ka, va), (kb, vb) in zip(kvs, kvs_new)]
        used = torch.where(done, used, torch.full_like(used, j))
        done = done | (delta < tol)
        if bool(done.all()):
            break
    new_state = model._next_state(ssm, kvs, key_valid, n, fingerprint)
    return AdaptiveSleep(state=new_state, passes=used, deltas=deltas)


@torch.no_grad()
def forward_adaptive(
    model: SleepHybrid,
    tokens: Tensor,
    loss_mask: Tensor,
    *,
    max_passes: int,
    tol: float,
    criterion: Criterion = "state",
) -> tuple[Tensor, Tensor]:
    """Algorithm 1 scoring with adaptive sleep: `SleepHybrid.forward` where every label-free window is slept by
    `sleep_adaptive` instead of a fixed N (windows with targets get one pass, as in training).

    Args:
        tokens, loss_mask: [B, T]; every row shares the window layout (A24).

    Returns:
        logits [B, T, vocab], target-aligned as in `SleepHybrid.forward`;
        passes [B, W] int64: passes used per stream and window (0 for windows that were scored, not slept).
    """
    if tokens.shape != loss_mask.shape or tokens.dim() != 2:
        raise InvalidInput(
            f"tokens and loss_mask must both be [B, T]; got {tuple(tokens.shape)}, {tuple(loss_mask.shape)}"
        )
    B, T = tokens.shape
    L = model.config.window
    state = model.init_state(B)
    out = torch.zeros(B, T, model.config.vocab_size, device=tokens.device, dtype=model.lm_head.weight.dtype)
    used = []
    for s in range(0, T, L):
        x, m = tokens[:, s : s + L], loss_mask[:, s : s + L].bool()
        if not bool(m.any()):
            res = sleep_adaptive(model, x, state, max_passes=max_passes, tol=tol, criterion=criterion)
            state = res.state
            used.append(res.passes)
            continue
        h, state, has_bos = model._run_window(x, state, 1)
        logits = model.logits(h)
        out[:, s : s + x.shape[1]] = logits[:, : x.shape[1]] if has_bos else F.pad(logits[:, :-1], (0, 0, 1, 0))
        used.append(torch.zeros(B, dtype=torch.long, device=tokens.device))
    return out, torch.stack(used, 1)


# ---------------------------------------------------------------- one sleep of one agent, fixed or adaptive depth


@torch.no_grad()
def sleep_tokens(model: SleepHybrid, tokens: Tensor, state: FastWeights, passes: Passes) -> tuple[FastWeights, int]:
    """One stream's sleep over ``tokens`` [1, T] from ``state``: (S', passes used). A fixed N is `SleepHybrid.sleep`;
    `AutoPasses` is `sleep_adaptive`, whose state equals ``model.sleep(tokens, state, used)``."""
    if isinstance(passes, AutoPasses):
        out = sleep_adaptive(
            model, tokens, state, max_passes=passes.max_passes, tol=passes.tol, criterion=passes.criterion
        )
        return out.state, int(out.passes.max())
    return model.sleep(tokens, state, passes), passes


@torch.no_grad()
def sleep_cache(model: SleepHybrid, cache: WindowCache, passes: Passes) -> tuple[FastWeights, int]:
    """`sleep_tokens` for a window already run token by token (`SleepHybrid.sleep_window`): (S', passes used)."""
    if isinstance(passes, AutoPasses):
        out = sleep_window_adaptive(
            model, cache, max_passes=passes.max_passes, tol=passes.tol, criterion=passes.criterion
        )
        return out.state, int(out.passes.max())
    return model.sleep_window(cache, passes), passes


__all__ = [  # the depth values are re-exported: callers import sleep depth and adaptive sleep from one place
    "CRITERIA",
    "AdaptiveSleep",
    "AutoPasses",
    "Criterion",
    "Passes",
    "cap_passes",
    "check_auto",
    "check_passes",
    "forward_adaptive",
    "nominal_passes",
    "passes_to_json",
    "sleep_adaptive",
    "sleep_cache",
    "sleep_tokens",
    "sleep_window_adaptive",
]
