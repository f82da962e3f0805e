"""Rule 110: predict bit 0 of each of 4 random states after t automaton steps (`spec/tasks.md` §1, paper §3.2).

Layout (spec §1.2): ``[state 0 (W)] [state 1 (W)] [state 2 (W)] [state 3 (W)] [Q l0 l1 l2 l3]``, T = 4W + 5, L = W.
Windows 0-3 hold one state each and carry no target (slept N times); window 4 is the prediction window. Q sits at
that window's position 0 so the logits at Q predict l0, those at l0 predict l1, and so on.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal, cast

import numpy as np
from pydantic import Field, model_validator

from agentsleep.errors import InvalidInput
from agentsleep.tasks.base import BOS, PAD, Batch, Split, TaskConfig, batch_rng, check_split, target_predictions

ZERO, ONE, Q = 0, 1, 2  # spec §1.2 ids; PAD and BOS follow
VOCAB = ["0", "1", "Q", PAD, BOS]
MAX_PACKED_WIDTH = 64  # the bit-parallel path keeps a state in one uint64
MAX_EXACT_WIDTH = 24  # chance_p1 enumerates 2^W states: W = 24 is 16.8M states, ~1 s


class Rule110Config(TaskConfig):
    """Every knob of the Rule-110 task. Defaults are the paper's setting (W = L = 24, t = 32)."""

    task_name = "rule110"
    task_id = 1

    width: int = Field(24, ge=3, alias="W", description="W: cells per state (a ring); also the window L")
    steps: int = Field(32, ge=0, alias="t", description="t: Rule-110 updates applied before the label bit is read")
    n_states: int = Field(4, ge=1, description="independent random states per example, one label each")

    @model_validator(mode="after")
    def _fits_one_window(self) -> Rule110Config:
        # [Q, l0 .. l_{S-1}] must fit in the last window, so S + 1 <= W.
        if self.n_states + 1 > self.width:
            raise ValueError(f"n_states + 1 = {self.n_states + 1} must fit in one window of W = {self.width}")
        return self

    def build_vocab(self) -> list[str]:
        return list(VOCAB)

    def tokenizer_mode(self) -> Literal["chars", "words", "words_digits"]:
        return "chars"

    @property
    def window(self) -> int:
        return self.width

    @property
    def seq_len(self) -> int:
        return self.n_states * self.width + 1 + self.n_states

    def describe(self) -> str:
        return (
            f"rule110: {self.n_states} states x W={self.width}, t={self.steps}, L={self.window}, T={self.seq_len}, "
            f"vocab {self.vocab_size}"
        )


PRESETS: dict[str, Rule110Config] = {
    "paper": Rule110Config(W=24, t=32),
    "toy": Rule110Config(W=12, t=6),  # spec §1.4 CPU toy; a lookup table can solve W = 12 (spec §1.4 caveat)
    "toy16": Rule110Config(W=16, t=8),  # spec §1.5c: W must be 16-24 before depth matters
}


# --------------------------------------------------------------------------------------------------- the rule


def rule110_step(s: np.ndarray) -> np.ndarray:
    """One step by lookup (spec §1.1), periodic boundary. ``s``: 0/1 ints ``[..., W]``; returns the same shape."""
    s = np.asarray(s, dtype=np.int64)
    left = np.roll(s, 1, axis=-1)  # left[i] = s[i-1]
    right = np.roll(s, -1, axis=-1)  # right[i] = s[i+1]
    return (110 >> (4 * left + 2 * s + right)) & 1


def pack(states: np.ndarray) -> np.ndarray:
    """``[..., W]`` 0/1 cells -> ``[...]`` uint64 with bit i = cell i."""
    w = states.shape[-1]
    weights = np.left_shift(np.uint64(1), np.arange(w, dtype=np.uint64))
    return (states.astype(np.uint64) * weights).sum(axis=-1, dtype=np.uint64)


def unpack(x: np.ndarray, width: int) -> np.ndarray:
    """Inverse of `pack`: ``[...]`` uint64 -> ``[..., W]`` int64 cells."""
    return ((x[..., None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.int64)


def evolve_packed(x: np.ndarray, width: int, steps: int) -> np.ndarray:
    """``steps`` bit-parallel updates of packed rings (spec §1.1): ``s' = (s | right) & ~(left & s & right)``."""
    if not 3 <= width <= MAX_PACKED_WIDTH:
        raise InvalidInput(f"packed evolution needs 3 <= W <= {MAX_PACKED_WIDTH}, got {width}")
    x = np.asarray(x, dtype=np.uint64).copy()
    mask = np.uint64((1 << width) - 1)
    one, back = np.uint64(1), np.uint64(width - 1)
    for _ in range(steps):
        left = ((x << one) | (x >> back)) & mask  # bit i <- cell i-1 (rotate left)
        right = ((x >> one) | (x << back)) & mask  # bit i <- cell i+1 (rotate right)
        x = (x | right) & ~(left & x & right) & mask
    return x


def evolve(states: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` updates of 0/1 rings ``[..., W]``; bit-parallel when W <= 64, lookup otherwise."""
    states = np.asarray(states)
    width = states.shape[-1]
    if width <= MAX_PACKED_WIDTH:
        return unpack(evolve_packed(pack(states), width, steps), width)
    out = states.astype(np.int64)
    for _ in range(steps):
        out = rule110_step(out)
    return out


# --------------------------------------------------------------------------------------------------- generator


def generate(split: Split, n: int, seed: int, config: Rule110Config | None = None, **overrides: Any) -> Batch:
    """``n`` examples; the same (config, split, seed) gives identical arrays. All splits share one distribution."""
    cfg = cast(Rule110Config, (config or Rule110Config()).with_overrides(**overrides))
    check_split(split)
    if n < 0:
        raise InvalidInput(f"n must be >= 0, got {n}")
    S, W = cfg.n_states, cfg.width
    rng = batch_rng(cfg.task_id, split, seed)
    states = rng.integers(0, 2, size=(n, S, W), dtype=np.int64)  # [n, S, W]
    labels = evolve(states, cfg.steps)[..., 0]  # [n, S]: bit 0 after t steps
    tokens = np.concatenate([states.reshape(n, S * W), np.full((n, 1), Q, np.int64), labels], axis=1)  # [n, T]
    mask = np.zeros_like(tokens, dtype=bool)
    mask[:, S * W + 1 :] = True
    meta = [{"t": cfg.steps, "W": W, "labels": row} for row in labels.tolist()]
    return Batch(tokens=tokens, loss_mask=mask, meta=meta, window=cfg.window, pad_id=cfg.pad_id)


# --------------------------------------------------------------------------------------------------- chance levels


@lru_cache(maxsize=64)
def _p1_by_step(width: int, max_steps: int) -> tuple[float, ...]:
    """P(cell 0 = 1) after 0..max_steps updates, exact over all 2^W rings (uint32, in cache-sized blocks)."""
    total = 1 << width
    mask = np.uint32(total - 1)
    one, back = np.uint32(1), np.uint32(width - 1)
    counts = np.zeros(max_steps + 1, dtype=np.int64)
    block = 1 << 16
    for start in range(0, total, block):
        x = np.arange(start, min(total, start + block), dtype=np.uint32)
        left, right, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        counts[0] += int((x & one).sum())
        for t in range(1, max_steps + 1):
            np.left_shift(x, one, out=left)
            np.right_shift(x, back, out=tmp)
            np.bitwise_or(left, tmp, out=left)  # rotl: bit i <- cell i-1 (bits >= W are masked below)
            np.right_shift(x, one, out=right)
            np.left_shift(x, back, out=tmp)
            np.bitwise_or(right, tmp, out=right)  # rotr: bit i <- cell i+1
            np.bitwise_and(left, x, out=left)
            np.bitwise_and(left, right, out=left)  # l & c & r
            np.bitwise_or(x, right, out=x)  # c | r
            np.invert(left, out=left)
            np.bitwise_and(x, left, out=x)
            np.bitwise_and(x, mask, out=x)
            counts[t] += int((x & one).sum())
    return tuple((counts / total).tolist())


def chance_p1(width: int, steps: int) -> float:
    """Exact P(label = 1) for uniform random W-cell rings after t steps (spec §1.3 chance table).

    Enumerates all 2^W rings, so W <= 24 (W = 24 takes about a second once, then it is cached).
    """
    if not 3 <= width <= MAX_EXACT_WIDTH:
        raise InvalidInput(f"exact chance needs 3 <= W <= {MAX_EXACT_WIDTH} (2^W states are enumerated), got {width}")
    if steps < 0:
        raise InvalidInput(f"steps must be >= 0, got {steps}")
    return _p1_by_step(width, max(steps, 32))[steps]  # one evolution to t = 32 serves the whole table


def chance_table(width: int, steps: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32), n_states: int = 4) -> list[dict]:
    """Rows of the spec §1.3 table: P(1), and the exact-all-``n_states`` accuracy of uniform and always-1 guessing."""
    return [
        {
            "t": t,
            "p1": (p := chance_p1(width, t)),
            "always1_exact": p**n_states,
            "majority_label": max(p, 1 - p),
            "majority_exact": max(p, 1 - p) ** n_states,
            "uniform_exact": 0.5**n_states,
        }
        for t in steps
    ]


# --------------------------------------------------------------------------------------------------- scoring


def score(predictions: Any, batch: Batch) -> dict[str, float]:
    """Teacher-forced metrics (spec §1.3) plus the two chance baselines on this eval set.

    Args:
        predictions: ids ``[n, T]`` (index i = the prediction for token i) or target-aligned logits ``[n, T, V]``.
        batch: the batch the predictions are for.

    Returns:
        ``exact`` (all labels right), ``per_label``, ``pos{j}`` per label position, and the baselines
        ``uniform_exact`` (1/2^S), ``uniform_label`` (0.5), ``majority_label`` and ``majority_exact`` (always
        predicting the eval set's more frequent label bit).
    """
    if len(batch) == 0:
        raise InvalidInput("cannot score an empty batch")
    pred = target_predictions(predictions, batch)
    S = int(batch.loss_mask[0].sum())
    gold = batch.tokens[batch.loss_mask].reshape(len(batch), S)  # [n, S]
    hit = pred[batch.loss_mask].reshape(len(batch), S) == gold  # [n, S]
    p1 = float(gold.mean()) if gold.size else 0.0
    majority = int(p1 >= 0.5)
    return {
        "exact": float(hit.all(axis=1).mean()),
        "per_label": float(hit.mean()),
        **{f"pos{j}": float(hit[:, j].mean()) for j in range(S)},
        "uniform_exact": 0.5**S,
        "uniform_label": 0.5,
        "label_p1": p1,
        "majority_label": float((gold == majority).mean()),
        "majority_exact": float((gold == majority).all(axis=1).mean()),
    }
