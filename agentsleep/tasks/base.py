"""Shared pieces of every task generator: the `Batch` contract, seed streams, layout rules, padding, tokenizers.

The data contract is `spec/tasks.md` §0. A generator is a pure function of (config, split, n, seed) and returns a
`Batch`: token ids ``[n, T]``, a boolean loss mask ``[n, T]`` (True = this token is a target, predicted from the logits
one position earlier) and one metadata dict per row. The model cuts rows into windows of L tokens from position 0; a
window without targets is slept N times, a window with targets gets one pass (`spec/paper.md` §3.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from agentsleep.errors import InvalidInput

Split = Literal["train", "val", "test"]
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
UNK = "<unk>"


# --------------------------------------------------------------------------------------------------- seeds


def check_split(split: str) -> Split:
    if split not in SPLIT_IDS:
        raise InvalidInput(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    return cast(Split, split)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def seed_sequence(task_id: int, split: Split, seed: int, *spawn_key: int) -> np.random.SeedSequence:
    """Disjoint streams per (task, split, seed) (spec §0 rule 5); ``spawn_key`` names a sub-stream (one example)."""
    entropy = [task_id, SPLIT_IDS[check_split(split)], _check_seed(seed)]
    return np.random.SeedSequence(entropy, spawn_key=tuple(int(k) for k in spawn_key))


def batch_rng(task_id: int, split: Split, seed: int) -> np.random.Generator:
    """One generator for a whole vectorised batch (Rule 110, Depo)."""
    return np.random.Generator(np.random.PCG64(seed_sequence(task_id, split, seed)))


def example_rng(task_id: int, split: Split, seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """A generator private to example ``index`` (GSM), so example i does not depend on n or on other examples."""
    return np.random.Generator(np.random.PCG64(seed_sequence(task_id, split, seed, index, stream)))


# --------------------------------------------------------------------------------------------------- configs


class TaskConfig(BaseModel):
    """Base of the per-task configs: frozen, no unknown keys, plus the facts a trainer or evaluator needs."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    task_name: ClassVar[str] = ""
    task_id: ClassVar[int] = 0

    def build_vocab(self) -> list[str]:
        """Token strings indexed by id (subclasses define it; callers use the cached `vocab`)."""
        raise NotImplementedError

    def vocab(self) -> tuple[str, ...]:
        """Token strings indexed by id."""
        return self._vocab_table

    def token_index(self) -> dict[str, int]:
        """Token string -> id."""
        return self._index_table

    # Built once per config object (generators look ids up in inner loops); not fields, so not dumped or compared.
    @cached_property
    def _vocab_table(self) -> tuple[str, ...]:
        return tuple(self.build_vocab())

    @cached_property
    def _index_table(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self._vocab_table)}

    def tokenizer_mode(self) -> Literal["chars", "words", "words_digits", "english"]:
        """How text splits into vocabulary entries (see `build_tokenizer`)."""
        return "words"

    def special_tokens(self) -> list[str]:
        return [t for t in (PAD, BOS, EOS, UNK) if t in self.vocab()]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab())

    @property
    def pad_id(self) -> int:
        return self.token_index()[PAD]

    @property
    def bos_id(self) -> int:
        return self.token_index()[BOS]

    @property
    def window(self) -> int:
        """L: the attention window, in this task's tokens."""
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """T for fixed layouts; for variable-length tasks the largest row length a batch can have."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def with_overrides(self, **overrides: Any) -> TaskConfig:
        """A validated copy with some knobs changed; accepts field names and their aliases (e.g. ``W=16``)."""
        names = {}
        for name, info in type(self).model_fields.items():
            names[name] = name
            if info.alias:
                names[info.alias] = name
        data = self.model_dump()
        for key, value in overrides.items():
            if key not in names:
                raise InvalidInput(f"{type(self).__name__} has no knob {key!r}; known: {sorted(names)}")
            data[names[key]] = value
        return type(self).model_validate(data)


# --------------------------------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class Batch:
    """Rows of one task, ready to cut into windows.

    Attributes:
        tokens: ``[n, T]`` int64 token ids.
        loss_mask: ``[n, T]`` bool; True where the token at that index is a target.
        meta: one dict per row (t, k per query, op count, answer string, ...).
        window: L.
        pad_id: the PAD id; PAD is never a target.
        lengths: ``[n]`` int64, each row's own length. Equal to T for fixed layouts. For variable-length tasks
            (GSM) a multiple of L: the row's windows end there and everything after it is PAD, so the row's label
            window is window ``lengths // L - 1`` (rows with different window counts must not share a batch: see
            `buckets`).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    meta: list[dict[str, Any]]
    window: int
    pad_id: int
    lengths: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.loss_mask.shape:
            raise InvalidInput(f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} must be equal [n, T]")
        if len(self.meta) != self.tokens.shape[0]:
            raise InvalidInput(f"{len(self.meta)} meta dicts for {self.tokens.shape[0]} rows")
        if self.lengths is None:
            object.__setattr__(self, "lengths", np.full(self.tokens.shape[0], self.tokens.shape[1], dtype=np.int64))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_windows(self) -> np.ndarray:
        """``[n]`` windows per row (the last one may be partial for fixed layouts such as Rule 110)."""
        return -(-self.lengths // self.window)

    def select(self, rows: Sequence[int] | np.ndarray) -> Batch:
        """A sub-batch; columns past the longest selected row are dropped."""
        idx = np.asarray(rows, dtype=np.int64)
        width = int(self.lengths[idx].max()) if len(idx) else 0
        return Batch(
            tokens=self.tokens[idx, :width],
            loss_mask=self.loss_mask[idx, :width],
            meta=[self.meta[i] for i in idx.tolist()],
            window=self.window,
            pad_id=self.pad_id,
            lengths=self.lengths[idx],
        )

    def buckets(self) -> dict[int, Batch]:
        """Rows grouped by window count, each group trimmed to its own length (`spec/paper.md` A24).

        Every row of a bucket has the same chunk layout: the same windows are label-free (slept N times) and the
        label window is the last one for all of them.
        """
        counts = self.n_windows
        return {int(c): self.select(np.flatnonzero(counts == c)) for c in np.unique(counts)}

    def examples(self) -> list[dict[str, Any]]:
        """The rows in the spec's ``{"tokens", "loss_mask", "meta"}`` list form, each cut to its own length."""
        return [
            {
                "tokens": self.tokens[i, : self.lengths[i]].tolist(),
                "loss_mask": self.loss_mask[i, : self.lengths[i]].astype(np.int64).tolist(),
                "meta": self.meta[i],
            }
            for i in range(len(self))
        ]

    def validate(self, vocab_size: int | None = None) -> None:
        """Check the rules of `spec/tasks.md` §0 and raise `InvalidInput` naming the first broken one."""
        validate_layout(self, vocab_size)


def validate_layout(batch: Batch, vocab_size: int | None = None) -> None:
    """Spec §0: window alignment, no target at a window's position 0, all targets in the last window, inert PAD."""
    tokens, mask, L = batch.tokens, batch.loss_mask, batch.window
    n, T = tokens.shape
    if tokens.dtype != np.int64 or mask.dtype != np.bool_:
        raise InvalidInput(f"tokens must be int64 and loss_mask bool, got {tokens.dtype} and {mask.dtype}")
    if vocab_size is not None and n and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise InvalidInput(f"token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    pos = np.arange(T)
    if np.any(mask[:, pos % L == 0]):
        raise InvalidInput("rule 0.2: a target sits at a window's position 0, where it cannot be predicted")
    if np.any(mask & (tokens == batch.pad_id)):
        raise InvalidInput("rule 0.4: a PAD token is a target")
    beyond = pos[None, :] >= batch.lengths[:, None]
    if np.any(beyond & (tokens != batch.pad_id)) or np.any(beyond & mask):
        raise InvalidInput("a row holds non-PAD tokens or targets past its length")
    if np.any(batch.lengths > T):
        raise InvalidInput("a row length exceeds the batch width")
    has_target = mask.any(axis=1)
    if not has_target.all():
        raise InvalidInput(f"row {int(np.argmin(has_target))} has no target")
    first = mask.argmax(axis=1)
    last = T - 1 - mask[:, ::-1].argmax(axis=1)
    label_window = (batch.lengths - 1) // L
    if np.any(first // L != label_window) or np.any(last // L != label_window):
        bad = int(np.flatnonzero((first // L != label_window) | (last // L != label_window))[0])
        raise InvalidInput(f"rule 0.3: row {bad} has targets outside its last window (window {label_window[bad]})")


# --------------------------------------------------------------------------------------------------- padding


def pack_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[bool]]], window: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Lay variable-length rows out on whole windows (GSM; `spec/paper.md` A24).

    Each row is right-padded to a multiple of L. If that would put a target at a window's position 0, or split the
    targets over two windows, the row is left-padded by just enough to move its first target to position 1 of the
    last window (pads are inert: masked from attention, no fast-weight write; spec §0 rule 4). That needs all targets
    to be contiguous and fewer than L.

    Returns:
        tokens ``[n, T]`` int64, loss_mask ``[n, T]`` bool, lengths ``[n]`` int64 (multiples of L), and the left pad
        of each row. T is the largest row length.
    """
    out: list[tuple[np.ndarray, np.ndarray]] = []
    left_pads: list[int] = []
    for toks, msk in rows:
        t = np.asarray(toks, dtype=np.int64)
        m = np.asarray(msk, dtype=bool)
        targets = np.flatnonzero(m)
        if len(targets) == 0:
            raise InvalidInput("a row has no target")
        a, b = int(targets[0]), int(targets[-1]) + 1  # targets occupy [a, b)
        if b - a != len(targets) or len(t) - a > window - 1:
            raise InvalidInput(f"targets must be contiguous, and first target to row end shorter than L={window}")
        total = -(-len(t) // window) * window
        start_of_last = total - window
        left = 0 if a > start_of_last else start_of_last + 1 - a  # shift the first target to position 1
        out.append((np.concatenate([np.full(left, pad_id, np.int64), t]), np.concatenate([np.zeros(left, bool), m])))
        left_pads.append(left)
    lengths = np.array([-(-len(t) // window) * window for t, _ in out], dtype=np.int64)
    width = int(lengths.max()) if len(out) else 0
    tokens = np.full((len(out), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(out), width), dtype=bool)
    for i, (t, m) in enumerate(out):
        tokens[i, : len(t)] = t
        mask[i, : len(m)] = m
    return tokens, mask, lengths, left_pads


def right_padded(
    rows: Sequence[tuple[Sequence[int], Sequence[bool]]], metas: list[dict[str, Any]], config: TaskConfig
) -> Batch:
    """A batch of variable-length rows right-padded to the longest (the English tasks, whose rows already end on a
    window boundary): ``lengths`` are the rows' own lengths. No rows give an empty batch."""
    window, pad_id = config.window, config.pad_id
    if not rows:
        empty = np.zeros((0, 0), np.int64)
        return Batch(tokens=empty, loss_mask=empty.astype(bool), meta=[], window=window, pad_id=pad_id)
    width = max(len(t) for t, _ in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, (t, m) in enumerate(rows):
        tokens[i, : len(t)] = t
        mask[i, : len(m)] = m
    lengths = np.array([len(t) for t, _ in rows], dtype=np.int64)
    return Batch(tokens=tokens, loss_mask=mask, meta=metas, window=window, pad_id=pad_id, lengths=lengths)


def target_predictions(predictions: Any, batch: Batch) -> np.ndarray:
    """Predicted ids ``[n, T]`` aligned with ``batch.tokens`` (index i = prediction for token i).

    Accepts ids ``[n, T]`` or target-aligned logits ``[n, T, V]`` (argmax taken); numpy arrays or anything
    `numpy.asarray` converts (e.g. CPU torch tensors). Model outputs where index i predicts token i + 1 go through
    `target_aligned` first.
    """
    pred = np.asarray(predictions)
    if pred.ndim == 3:
        pred = pred.argmax(axis=-1)
    if pred.shape != batch.tokens.shape:
        raise InvalidInput(
            f"predictions must be [n, T] ids or [n, T, V] logits matching tokens {batch.tokens.shape}, got "
            f"{np.asarray(predictions).shape}; shift next-token outputs with target_aligned()"
        )
    return pred.astype(np.int64)


def answer_words(predictions: Any, batch: Batch, vocab: Sequence[str]) -> list[list[str]]:
    """Each row's words as greedy decoding gives them: the argmax tokens at its answer positions up to the first
    predicted ``EOS`` (a missing ``EOS`` keeps the next word, so the answer is wrong, as a reply would be)."""
    pred = target_predictions(predictions, batch)
    out = []
    for i in range(len(batch)):
        words = []
        for tok in pred[i, batch.loss_mask[i]].tolist():
            w = vocab[tok] if 0 <= tok < len(vocab) else UNK
            if w == EOS:
                break
            words.append(w)
        out.append(words)
    return out


def exact_by(correct: np.ndarray, batch: Batch, key: str = "k") -> dict[str, float]:
    """``exact`` (the mean of ``correct``, one bool per row) and ``exact_k{v}`` for each value v of ``meta[key]``."""
    groups = np.array([m[key] for m in batch.meta])
    out = {"exact": float(correct.mean())}
    for v in np.unique(groups).tolist():
        out[f"exact_k{v}"] = float(correct[groups == v].mean())
    return out


def target_aligned(next_token: Any, seq_len: int | None = None) -> np.ndarray:
    """Next-token outputs (index i predicts token i + 1; ids ``[n, T']`` or logits ``[n, T', V]``) -> target-aligned
    ids ``[n, T]``. Index 0 (never a target) gets -1; ``seq_len`` defaults to T' + 1 (the last input position,
    which predicts nothing, may have been dropped) and longer outputs are cut."""
    pred = np.asarray(next_token)
    if pred.ndim == 3:
        pred = pred.argmax(axis=-1)
    if pred.ndim != 2:
        raise InvalidInput(f"expected [n, T] ids or [n, T, V] logits, got shape {np.asarray(next_token).shape}")
    T = pred.shape[1] + 1 if seq_len is None else seq_len
    out = np.full((pred.shape[0], T), -1, dtype=np.int64)
    width = min(pred.shape[1], T - 1)
    out[:, 1 : 1 + width] = pred[:, :width]
    return out


# --------------------------------------------------------------------------------------------------- tokenizers


def build_tokenizer(config: TaskConfig) -> Tokenizer:
    """A `tokenizers` WordLevel tokenizer over the task's vocabulary, ids equal to the generator's.

    Modes: ``chars`` (each non-space character is a token, decode concatenates: Rule 110), ``words`` (whitespace
    separated, decode joins with spaces: Depo, compact GSM), ``words_digits`` (words and punctuation split apart,
    every digit its own token: the realistic GSM text), ``english`` (readable English: `agentsleep.tasks.english`).
    """
    vocab = config.vocab()
    index = dict(config.token_index())
    if len(index) != len(vocab):
        raise InvalidInput(f"{config.task_name}: duplicate entries in the vocabulary")
    unk = UNK if UNK in index else None
    mode = config.tokenizer_mode()
    if mode == "english":
        from agentsleep.tasks.english import english_tokenizer

        return english_tokenizer(vocab, UNK, config.special_tokens())
    tok = Tokenizer(models.WordLevel(index, unk_token=unk))
    if mode == "chars":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
        )
        tok.decoder = decoders.Fuse()
    elif mode == "words":
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
        )
    tok.add_special_tokens(config.special_tokens())
    return tok


def save_tokenizer(config: TaskConfig, path: str | Path) -> Path:
    """Write the task's ``tokenizer.json`` (into ``path`` if it is a directory) and return the file's path."""
    p = Path(path)
    if p.suffix != ".json":
        p.mkdir(parents=True, exist_ok=True)
        p = p / "tokenizer.json"
    build_tokenizer(config).save(str(p))
    return p


def decode(config: TaskConfig, ids: Sequence[int] | np.ndarray) -> str:
    """Ids to the task's text form (the inverse of the tokenizer's encode)."""
    vocab = config.vocab()
    pieces = [vocab[int(i)] for i in ids]
    if config.tokenizer_mode() == "english":
        from agentsleep.tasks.english import detokenize

        return detokenize(pieces)
    return "".join(pieces) if config.tokenizer_mode() == "chars" else " ".join(pieces)
