"""Depo: k-hop retrieval on a hidden directed cycle (`spec/tasks.md` §2; Allen-Zhu, Physics of LMs Part 4.1).

Re-implemented from the spec's description (the upstream file is Apache-2.0 but does not run; nothing is vendored).

Layout (spec §2.3), paper scale::

    positions   0 … 299 : [PAD × (300 − len(edges))] + edges     edges = concatenated name pairs, no BOS
    positions 300 … 359 : queries [HOP_k] + name(u) + [ANS] + name(succ^k(u)), then PAD up to 60 tokens
    windows (L = 75)    : 4 label-free windows, then the prediction window

Targets are every ANS token and every answer-name token. The first token of the prediction window is a HOP marker.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from pydantic import Field, model_validator

from agentsleep.errors import InvalidInput
from agentsleep.tasks.base import BOS, PAD, Batch, Split, TaskConfig, batch_rng, check_split, target_predictions


class DepoConfig(TaskConfig):
    """Every knob of Depo. Defaults are our mapping of the paper's setting onto upstream Depo1 (spec §2.2)."""

    task_name = "depo"
    task_id = 2

    n_max: int = Field(75, ge=3, description="node bound (upstream's N); test cycles have exactly n_max nodes")
    hops: int = Field(16, ge=1, alias="K", description="K: largest hop count; training k ~ U{1..K}")
    n_queries: int = Field(10, ge=1, alias="M", description="M: queries per example (min(n, M) are emitted)")
    mini_vocab: int = Field(50, ge=2, description="name tokens are 1..mini_vocab; the last one is shifted up by it")
    min_len: int = Field(1, ge=1, description="shortest name, in tokens")
    max_len: int = Field(2, ge=1, description="longest name, in tokens")
    block: int = Field(300, ge=1, description="cycle block: edges right-aligned, PAD on the left")
    qa_block: int = Field(60, ge=1, description="query block after the cycle, PAD on the right")
    window_size: int = Field(75, ge=2, alias="L", description="L: the window; block must be a multiple of it")
    n_hop_tokens: int = Field(16, ge=1, description="HOP_1..HOP_n ids in the vocabulary (>= K; fixes the id table)")
    test_k: tuple[int, ...] | None = Field(
        None, description="k values of val/test queries; None = powers of two <= K, plus K, plus 24 when K = 32"
    )

    @model_validator(mode="after")
    def _layout_fits(self) -> DepoConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len {self.min_len} > max_len {self.max_len}")
        if self.hops > self.n_hop_tokens:
            raise ValueError(f"K = {self.hops} needs n_hop_tokens >= K, got {self.n_hop_tokens}")
        if self.n_max * 2 * self.max_len > self.block:
            raise ValueError(f"{self.n_max} edges of <= {2 * self.max_len} tokens do not fit a block of {self.block}")
        if self.n_queries * (2 + 2 * self.max_len) > self.qa_block:
            raise ValueError(f"{self.n_queries} queries of <= {2 + 2 * self.max_len} tokens exceed qa_block")
        if self.block % self.window_size or self.qa_block > self.window_size:
            raise ValueError("block must be a multiple of L and qa_block <= L, so the queries fill the last window")
        names = sum(self.mini_vocab**n for n in range(self.min_len, self.max_len + 1))
        if names < self.n_max:
            raise ValueError(f"only {names} distinct names exist for n_max = {self.n_max}")
        if (2 * self.mini_vocab + 1) ** self.max_len >= 2**62:
            raise ValueError("names too long to hash into int64; lower max_len or mini_vocab")
        if any(not 1 <= k for k in self.test_k or ()):
            raise ValueError("test_k values must be >= 1")
        return self

    # ids (spec §2.3 at the defaults: PAD 0, names 1..100, HOP 101..116, ANS 117, BOS 118, SEP 119)
    @property
    def hop_id0(self) -> int:
        """Id of HOP_1; HOP_k is hop_id0 + k - 1."""
        return 2 * self.mini_vocab + 1

    @property
    def ans_id(self) -> int:
        return self.hop_id0 + self.n_hop_tokens

    @property
    def sep_id(self) -> int:
        return self.ans_id + 2

    def build_vocab(self) -> list[str]:
        names = [f"w{i}" for i in range(1, self.mini_vocab + 1)]
        finals = [f"w{i}." for i in range(1, self.mini_vocab + 1)]  # "." marks a name's last token
        hops = [f"H{k}" for k in range(1, self.n_hop_tokens + 1)]
        return [PAD, *names, *finals, *hops, "ANS", BOS, "<sep>"]

    def eval_k(self) -> tuple[int, ...]:
        """k values of val/test queries (upstream test mode, spec §2.1 step 5)."""
        if self.test_k is not None:
            return tuple(self.test_k)
        ks = [1 << i for i in range(self.hops.bit_length()) if 1 << i <= self.hops]
        if self.hops not in ks:
            ks.append(self.hops)
        if self.hops == 32:
            ks.append(24)
        return tuple(sorted(ks))

    def size_probs(self) -> tuple[np.ndarray, np.ndarray]:
        """Training cycle sizes 3..n_max and their probabilities, proportional to 1 / (i + sqrt(n_max))."""
        sizes = np.arange(3, self.n_max + 1)
        w = 1.0 / (sizes + np.sqrt(self.n_max))
        return sizes, w / w.sum()

    @property
    def window(self) -> int:
        return self.window_size

    @property
    def seq_len(self) -> int:
        return self.block + self.qa_block

    def describe(self) -> str:
        return (
            f"depo: n_max={self.n_max}, K={self.hops}, M={self.n_queries}, names {self.min_len}-{self.max_len} x "
            f"{self.mini_vocab}, block {self.block}+{self.qa_block}, L={self.window}, T={self.seq_len}, "
            f"vocab {self.vocab_size}"
        )


PRESETS: dict[str, DepoConfig] = {
    "paper": DepoConfig(),
    # spec §2.5 CPU toy: 4 queries of <= 6 tokens fill one window of 25; same 120-id table as paper scale.
    "toy": DepoConfig(n_max=25, K=8, M=4, block=100, qa_block=25, L=25),
    # 2-core CPU scale that learns within minutes (evals/results/depo_micro*.md): 8 one-token names from 12, the
    # cycle fills one window and the 4 queries the next, so every query is asked after its cycle was evicted.
    "micro": DepoConfig(n_max=8, K=4, M=4, mini_vocab=12, min_len=1, max_len=1, block=16, qa_block=16, L=16),
    # One step above micro (issue 17: k up to 8): a 16-node cycle of one-token names from 24 fills one window of 32,
    # then 8 questions with k ~ U{1..8} fill the next; test k in {1, 2, 4, 8} (k = 8 is half-way round the cycle).
    "mini": DepoConfig(n_max=16, K=8, M=8, mini_vocab=24, min_len=1, max_len=1, block=32, qa_block=32, L=32),
}


# --------------------------------------------------------------------------------------------------- generator


def _rank_keys(rng: np.random.Generator, valid: np.ndarray) -> np.ndarray:
    """Per row, a uniformly random order of the valid slots first (invalid slots last): ``[B, S]`` indices."""
    keys = rng.random(valid.shape)
    keys[~valid] = np.inf
    return np.argsort(keys, axis=1, kind="stable")


def _draw_names(rng: np.random.Generator, n: np.ndarray, cfg: DepoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first n[b] distinct names of an i.i.d. stream (spec §2.1 step 1: draw until n are distinct).

    Returns name tokens ``[B, n_max, max_len]`` (0 past a name's end) and lengths ``[B, n_max]`` (0 past n[b]).
    """
    B, mv, lmax = len(n), cfg.mini_vocab, cfg.max_len
    base = 2 * mv + 1
    cand_tok = np.zeros((B, 0, lmax), np.int64)
    cand_len = np.zeros((B, 0), np.int64)
    while True:
        c = 2 * cfg.n_max + 16  # short names collide often (50 one-token names), so draw with margin
        lens = rng.integers(cfg.min_len, lmax + 1, size=(B, c))
        toks = rng.integers(1, mv + 1, size=(B, c, lmax))
        toks[np.arange(lmax)[None, None, :] >= lens[..., None]] = 0
        np.put_along_axis(toks, (lens - 1)[..., None], np.take_along_axis(toks, (lens - 1)[..., None], 2) + mv, 2)
        cand_tok = np.concatenate([cand_tok, toks], axis=1)
        cand_len = np.concatenate([cand_len, lens], axis=1)
        codes = (cand_tok * base ** np.arange(lmax)).sum(axis=2)  # unique per name: the final token is > mv
        order = np.argsort(codes, axis=1, kind="stable")  # stable: a name's first occurrence sorts first
        sorted_codes = np.take_along_axis(codes, order, 1)
        first_sorted = np.ones_like(sorted_codes, dtype=bool)
        first_sorted[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
        first = np.empty_like(first_sorted)
        np.put_along_axis(first, order, first_sorted, 1)  # True at each name's first occurrence
        if np.all(first.sum(axis=1) >= n):
            break  # else extend every row's stream; rows that had enough keep the same first names
    chosen = first & (np.cumsum(first, axis=1, dtype=np.int32) <= n[:, None])
    idx = np.argsort(~chosen, axis=1, kind="stable")[:, : cfg.n_max]  # chosen candidates, in draw order
    slot_valid = np.arange(cfg.n_max)[None, :] < n[:, None]
    names = np.take_along_axis(cand_tok, idx[..., None], 1) * slot_valid[..., None]
    lengths = np.take_along_axis(cand_len, idx, 1) * slot_valid
    return names, lengths


def _compress(
    pieces: np.ndarray, valid: np.ndarray, out: np.ndarray, offset: np.ndarray, extra: list[tuple[np.ndarray, ...]]
) -> None:
    """Write the valid entries of each row of ``pieces [B, P]`` contiguously into ``out`` from column ``offset[b]``.

    ``extra`` holds (source [B, P], destination [B, T]) pairs written at the same places.
    """
    rows, cols = np.nonzero(valid)  # row-major, so each row's entries are contiguous and in order
    row_start = np.concatenate([[0], np.cumsum(valid.sum(axis=1))[:-1]])
    dest = offset[rows] + np.arange(len(rows)) - row_start[rows]
    out[rows, dest] = pieces[rows, cols]
    for src, dst in extra:
        dst[rows, dest] = src[rows, cols]


def generate(split: Split, n: int, seed: int, config: DepoConfig | None = None, **overrides: Any) -> Batch:
    """``n`` examples. ``train``: n ~ 1/(i + sqrt(n_max)), k ~ U{1..K}; ``val``/``test``: n = n_max, k from `eval_k`."""
    cfg = cast(DepoConfig, (config or DepoConfig()).with_overrides(**overrides))
    check_split(split)
    if n < 0:
        raise InvalidInput(f"n must be >= 0, got {n}")
    rng = batch_rng(cfg.task_id, split, seed)
    B, nmax, M, lmax, L = n, cfg.n_max, cfg.n_queries, cfg.max_len, cfg.window
    train = split == "train"
    if train:
        sizes, probs = cfg.size_probs()
        size = rng.choice(sizes, size=B, p=probs).astype(np.int64)  # [B]
    else:
        size = np.full(B, nmax, dtype=np.int64)
    names, name_len = _draw_names(rng, size, cfg)  # [B, nmax, lmax], [B, nmax]
    node_valid = np.arange(nmax)[None, :] < size[:, None]  # [B, nmax]

    # Hidden cycle: a random order of the names; cycle slot j points to slot (j + 1) mod n.
    perm = _rank_keys(rng, node_valid)
    cyc_tok = np.take_along_axis(names, perm[..., None], 1)  # [B, nmax, lmax]
    cyc_len = np.take_along_axis(name_len, perm, 1)  # [B, nmax]
    slots = np.arange(nmax)[None, :]
    succ = (slots + 1) % size[:, None]  # [B, nmax]

    def name_at(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.take_along_axis(cyc_tok, pos[..., None], 1), np.take_along_axis(cyc_len, pos, 1)

    # Edges name(u) + name(succ(u)) in a random order, right-aligned in the cycle block.
    edge_order = _rank_keys(rng, node_valid)  # [B, nmax]: cycle slots in emission order
    u_tok, u_len = name_at(edge_order)
    v_tok, v_len = name_at(np.take_along_axis(succ, edge_order, 1))
    lpos = np.arange(lmax)[None, None, :]
    edge_tok = np.concatenate([u_tok, v_tok], axis=2).reshape(B, -1)  # [B, nmax * 2 lmax]
    edge_valid = np.concatenate([lpos < u_len[..., None], lpos < v_len[..., None]], axis=2)
    edge_valid = (edge_valid & node_valid[..., None]).reshape(B, -1)
    cycle_tokens = edge_valid.sum(axis=1)  # [B]
    T = cfg.seq_len
    tokens = np.full((B, T), cfg.pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    _compress(edge_tok, edge_valid, tokens, cfg.block - cycle_tokens, [])

    # Queries on distinct start nodes: [HOP_k] + name(s) + [ANS] + name(succ^k(s)).
    n_q = np.minimum(size, M)  # [B]
    q_valid = np.arange(M)[None, :] < n_q[:, None]  # [B, M]
    starts = _rank_keys(rng, node_valid)[:, :M]  # [B, M] distinct cycle slots
    if starts.shape[1] < M:  # n_max < M: the missing queries are masked out by q_valid
        starts = np.pad(starts, ((0, 0), (0, M - starts.shape[1])))
    if train:
        ks = rng.integers(1, cfg.hops + 1, size=(B, M))
    else:
        ks = rng.choice(np.array(cfg.eval_k(), dtype=np.int64), size=(B, M))
    s_tok, s_len = name_at(starts)  # [B, M, lmax], [B, M]
    a_tok, a_len = name_at((starts + ks) % size[:, None])
    hop = (cfg.hop_id0 + ks - 1)[..., None]
    ans = np.full((B, M, 1), cfg.ans_id, dtype=np.int64)
    q_tok = np.concatenate([hop, s_tok, ans, a_tok], axis=2).reshape(B, -1)  # [B, M * (2 + 2 lmax)]
    ones = np.ones((B, M, 1), dtype=bool)
    zeros = np.zeros((B, M, lmax), dtype=bool)
    q_valid_tok = np.concatenate([ones, lpos < s_len[..., None], ones, lpos < a_len[..., None]], axis=2)
    q_target = np.concatenate([~ones, zeros, ones, lpos < a_len[..., None]], axis=2)  # ANS + answer name
    q_valid_tok = (q_valid_tok & q_valid[..., None]).reshape(B, -1)
    q_target = (q_target & q_valid[..., None]).reshape(B, -1)
    _compress(q_tok, q_valid_tok, tokens, np.full(B, cfg.block), [(q_target, mask)])

    qa_tokens = q_valid_tok.sum(axis=1)
    first_window = (cfg.block - cycle_tokens) // L
    spanned = (cfg.block - 1) // L - first_window + 1
    meta = [
        {"n": int(s), "k": k_row[:q].tolist(), "cycle_tokens": int(c), "qa_tokens": int(a), "windows_spanned": int(w)}
        for s, k_row, q, c, a, w in zip(
            size.tolist(), ks, n_q.tolist(), cycle_tokens.tolist(), qa_tokens.tolist(), spanned.tolist()
        )
    ]
    return Batch(tokens=tokens, loss_mask=mask, meta=meta, window=L, pad_id=cfg.pad_id)


def span_histogram(batch: Batch) -> dict[int, int]:
    """How many rows have their cycle spread over 1, 2, … windows (log it; spec §2.3 train/test shift)."""
    spans = np.array([m["windows_spanned"] for m in batch.meta], dtype=np.int64)
    values, counts = np.unique(spans, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


# --------------------------------------------------------------------------------------------------- scoring


def _queries(batch: Batch, cfg: DepoConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse the query block back from the tokens.

    Returns ``k [n, M]`` (0 where no query), the query index of every position ``[n, T]`` (-1 before the first
    HOP), and the answer-name target mask ``[n, T]`` (targets other than ANS).
    """
    tok = batch.tokens
    is_hop = (tok >= cfg.hop_id0) & (tok < cfg.hop_id0 + cfg.n_hop_tokens)
    is_hop[:, : cfg.block] = False
    qidx = np.cumsum(is_hop, axis=1) - 1  # [n, T]
    k = np.zeros((len(batch), cfg.n_queries), dtype=np.int64)
    rows, cols = np.nonzero(is_hop)
    k[rows, qidx[rows, cols]] = tok[rows, cols] - cfg.hop_id0 + 1
    name_target = batch.loss_mask & (tok != cfg.ans_id)
    return k, qidx, name_target


def score(predictions: Any, batch: Batch, config: DepoConfig | None = None) -> dict[str, float]:
    """Per-k exact match: a query counts when its whole answer name is argmax-correct (spec §2.4).

    Args:
        predictions: ids ``[n, T]`` (index i = the prediction for token i) or target-aligned logits ``[n, T, V]``.
        batch: the batch the predictions are for; config: its config (default: paper scale; ids only).

    Returns:
        ``exact`` over all queries, ``exact_k{k}`` for every k present, ``ans_acc`` (the ANS marker) and
        ``token_acc`` over all targets.
    """
    cfg = config or DepoConfig()
    if len(batch) == 0:
        raise InvalidInput("cannot score an empty batch")
    pred = target_predictions(predictions, batch)
    k, qidx, name_target = _queries(batch, cfg)
    bad = np.zeros_like(k, dtype=bool)
    rows, cols = np.nonzero(name_target & (pred != batch.tokens))
    bad[rows, qidx[rows, cols]] = True
    present = k > 0
    correct = ~bad & present
    out = {"exact": float(correct.sum() / present.sum())}
    for kv in np.unique(k[present]).tolist():
        sel = k == kv
        out[f"exact_k{kv}"] = float(correct[sel].mean())
    ans = batch.loss_mask & (batch.tokens == cfg.ans_id)
    out["ans_acc"] = float((pred[ans] == batch.tokens[ans]).mean())
    out["token_acc"] = float((pred[batch.loss_mask] == batch.tokens[batch.loss_mask]).mean())
    return out


def per_k_ce(token_ce: Any, batch: Batch, config: DepoConfig | None = None) -> dict[str, float]:
    """Mean cross-entropy over answer-name tokens per hop count k, ANS excluded (spec §2.4: ANS is trivial).

    Args:
        token_ce: ``[n, T]`` float, the cross-entropy of token i at index i (values off the targets are ignored).

    Returns:
        ``ce_k{k}`` for every k present, and ``ce`` over all answer-name tokens.
    """
    cfg = config or DepoConfig()
    ce = np.asarray(token_ce, dtype=np.float64)
    if ce.shape != batch.tokens.shape:
        raise InvalidInput(f"token_ce must be {batch.tokens.shape}, got {ce.shape}")
    k, qidx, name_target = _queries(batch, cfg)
    rows, cols = np.nonzero(name_target)
    k_of = k[rows, qidx[rows, cols]]
    vals = ce[rows, cols]
    out = {"ce": float(vals.mean())}
    for kv in np.unique(k_of).tolist():
        out[f"ce_k{kv}"] = float(vals[k_of == kv].mean())
    return out
