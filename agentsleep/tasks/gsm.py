"""GSM-Infinite-style math, question first (`spec/tasks.md` §3): shared machinery and the symbolic generator.

Licence note: the GSM-Infinite repository (Zhou et al. 2025, arXiv 2502.05252) has no licence, so nothing here is
copied from it: no code, templates, prompt strings or name lists. Everything is written from the spec, which
describes algorithms only; the realistic generator (`gsm_zoo`) follows the iGSM construction of Ye et al., Physics
of Language Models Part 2.1 (arXiv 2407.20311).

Symbolic generator (spec §3.3), compact CPU-toy tokenisation (spec §3.6)::

    Q V017 ; V017 = V005 + 1 ; V005 = 3 ; V090 = V044 - 1 ; … A 4 <eos>
    (text: "Question: What is the value of V017? Context: assign V017 = V005 + 1. … Answer: 4")

With ``question_position="last"`` the question moves after the context (``… V090 = V044 - 1 ; Q V017 ; A 4 <eos>``;
text "Context: … Question: … Answer: 4"): the layout of an agent that hears the facts over many turns and is asked
only at the end, so nothing tells it what to keep while it consolidates. The paper prefers question first (§6.3).

Value form: the op count is the depth of the asked variable (statements on its chain, the root's assignment
included). Set form (upstream): "Which variables equal q?", the op count is the number of core variables.

Rows have different lengths: each is right-padded to a multiple of L, and left-padded when needed so the answer and
``<eos>`` (the targets) lie in the last window and not at its position 0. Use `Batch.buckets()` to group rows by
window count before training (`spec/paper.md` A24). Every test problem's core (statements + question, without the
length noise) is hashed; training and validation skip the cores of the configured test set.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
from pydantic import Field, model_validator

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.tasks.base import (
    BOS,
    EOS,
    PAD,
    UNK,
    Batch,
    Split,
    TaskConfig,
    check_split,
    example_rng,
    pack_rows,
    target_predictions,
)
from agentsleep.tasks.tokencount import count_cl100k

MAX_DRAWS = 10_000  # rejection-sampling budget per example before giving up with a ConfigError


class GSMConfig(TaskConfig):
    """Knobs shared by both GSM generators."""

    window_size: int = Field(64, ge=8, alias="L", description="L: the window, in this task's tokens")
    ops: tuple[int, int] = Field((1, 8), description="op range: train op ~ U{lo..hi}; val/test cycle through it")
    noise: bool = Field(True, description="add length-noise statements until the target length is reached")
    min_tokens: int = Field(128, ge=0, description="target length is ~ U[min_tokens, max_tokens] (whole sequence)")
    max_tokens: int = Field(320, ge=1, description="hard cap: noise stops before it; longer cores are resampled")
    count_with: Literal["model", "cl100k"] = Field(
        "model", description="unit of min/max_tokens: this task's own tokens, or cl100k_base over the text (spec §5)"
    )
    test_size: int = Field(1600, ge=0, description="size of the canonical test set whose cores train/val avoid")
    test_seed: int = Field(0, ge=0, description="seed of the canonical test set")
    dedup: bool = Field(True, description="train/val skip test cores; the test split has no duplicate cores")

    @model_validator(mode="after")
    def _ranges(self) -> GSMConfig:
        lo, hi = self.ops
        if not 1 <= lo <= hi:
            raise ValueError(f"ops must be 1 <= lo <= hi, got {self.ops}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")
        return self

    @property
    def window(self) -> int:
        return self.window_size

    @property
    def seq_len(self) -> int:
        """Upper bound on a row's length (rows are whole windows); exact in model units, approximate in cl100k."""
        return -(-self.max_tokens // self.window_size) * self.window_size

    @property
    def eos_id(self) -> int:
        return self.token_index()[EOS]


@dataclass
class Core:
    """A problem without its length noise: what dedup hashes and what the answer depends on."""

    op: int
    key: str
    answer: str
    answer_value: Any
    payload: Any  # generator-specific structure
    extra: dict[str, Any] = field(default_factory=dict)


def core_key(*parts: str | Sequence[str]) -> str:
    """Order-insensitive hash of a core: sentences are sorted, so shuffling cannot make a 'new' problem."""
    h = hashlib.sha1()
    for part in parts:
        h.update(("\n".join(sorted(part)) if not isinstance(part, str) else part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


DrawCore = Callable[[Any, np.random.Generator, int], Core | None]
Finish = Callable[[Any, Core, np.random.Generator], tuple[list[int], list[bool], dict[str, Any]]]


def _op_for(cfg: GSMConfig, split: Split, index: int, rng: np.random.Generator) -> int:
    lo, hi = cfg.ops
    if split == "train":
        return int(rng.integers(lo, hi + 1))
    return lo + index % (hi - lo + 1)  # val/test: balanced, e.g. 200 per op in 1,600 (spec §3.5)


def draw_cores(
    cfg: GSMConfig, split: Split, seed: int, n: int, draw: DrawCore, exclude: frozenset[str] = frozenset()
) -> list[Core]:
    """The cores of examples 0..n-1; example j uses only its own stream, so it does not depend on n."""
    seen: set[str] = set()
    cores = []
    for j in range(n):
        rng = example_rng(cfg.task_id, split, seed, j, 0)
        op = _op_for(cfg, split, j, rng)
        for _ in range(MAX_DRAWS):
            core = draw(cfg, rng, op)
            if core is None or core.key in exclude or (split == "test" and core.key in seen):
                continue
            break
        else:
            raise ConfigError(
                f"{cfg.task_name}: no acceptable op={op} problem in {MAX_DRAWS} draws (too few distinct problems, "
                f"or max_tokens={cfg.max_tokens} too small); widen the config or lower test_size"
            )
        seen.add(core.key)
        cores.append(core)
    return cores


_TEST_KEYS: dict[str, frozenset[str]] = {}


def test_keys(cfg: GSMConfig, draw: DrawCore) -> frozenset[str]:
    """Core hashes of the canonical test set (``test_size`` examples at ``test_seed``), cached per config."""
    cache_key = f"{cfg.task_name}:{cfg.model_dump_json()}"
    if cache_key not in _TEST_KEYS:
        cores = draw_cores(cfg, "test", cfg.test_seed, cfg.test_size, draw)
        _TEST_KEYS[cache_key] = frozenset(c.key for c in cores)
    return _TEST_KEYS[cache_key]


def generate_rows(cfg: GSMConfig, split: Split, n: int, seed: int, draw: DrawCore, finish: Finish) -> Batch:
    """The shared GSM loop: cores (deduplicated against the test set), then noise, then the window layout."""
    check_split(split)
    if n < 0:
        raise InvalidInput(f"n must be >= 0, got {n}")
    exclude = test_keys(cfg, draw) if cfg.dedup and split != "test" else frozenset()
    cores = draw_cores(cfg, split, seed, n, draw, exclude)
    rows, metas = [], []
    for j, core in enumerate(cores):
        tokens, mask, meta = finish(cfg, core, example_rng(cfg.task_id, split, seed, j, 1))
        rows.append((tokens, mask))
        metas.append({"op": core.op, "answer": core.answer, "answer_value": core.answer_value, "key": core.key, **meta})
    if not rows:
        empty = np.zeros((0, 0), np.int64)
        return Batch(tokens=empty, loss_mask=empty.astype(bool), meta=[], window=cfg.window, pad_id=cfg.pad_id)
    tokens, mask, lengths, left = pack_rows(rows, cfg.window, cfg.pad_id)
    for meta, pad, length in zip(metas, left, lengths.tolist()):
        meta["left_pad"] = pad + meta.pop("question_pad", 0)  # all PADs before the first real token
        meta["n_windows"] = length // cfg.window
    return Batch(tokens=tokens, loss_mask=mask, meta=metas, window=cfg.window, pad_id=cfg.pad_id, lengths=lengths)


# --------------------------------------------------------------------------------------------------- scoring

_INT = re.compile(r"-?\d+")
_VAR = re.compile(r"V\d+")


def _per_op(correct: np.ndarray, batch: Batch) -> dict[str, float]:
    ops = np.array([m["op"] for m in batch.meta], dtype=np.int64)
    out = {"exact": float(correct.mean())}
    for op in np.unique(ops).tolist():
        out[f"exact_op{op}"] = float(correct[ops == op].mean())
    return out


def score(predictions: Any, batch: Batch) -> dict[str, float]:
    """Teacher-forced exact match: a row counts when every answer token and ``<eos>`` is argmax-correct.

    That equals greedy-decoding exact match (`spec/paper.md` A25). Returns ``exact`` and ``exact_op{k}``.
    """
    if len(batch) == 0:
        raise InvalidInput("cannot score an empty batch")
    pred = target_predictions(predictions, batch)
    wrong = (pred != batch.tokens) & batch.loss_mask
    return _per_op(~wrong.any(axis=1), batch)


def parse_answer(text: str | None, meta: dict[str, Any]) -> bool:
    """Whether a decoded answer string is right: first integer vs the answer (value), or V-name set equality."""
    if text is None:
        return False
    if isinstance(meta["answer_value"], list):
        return set(_VAR.findall(text)) == set(meta["answer_value"])
    match = _INT.search(text.replace(" ", ""))  # the compact form spells "- 1 2" for -12
    return match is not None and int(match.group()) == int(meta["answer_value"])


def score_answers(answers: Sequence[str | None], batch: Batch) -> dict[str, float]:
    """Exact match of decoded answer strings (greedy continuation after the answer cue), overall and per op."""
    if len(answers) != len(batch) or len(batch) == 0:
        raise InvalidInput(f"need one answer per row: {len(answers)} answers for {len(batch)} rows")
    return _per_op(np.array([parse_answer(a, m) for a, m in zip(answers, batch.meta)]), batch)


# --------------------------------------------------------------------------------------------------- symbolic


_SYM_FIXED = (PAD, BOS, EOS, UNK, *"0123456789", "=", "+", "-", ";", ",", "Q", "A")


class GSMSymbolicConfig(GSMConfig):
    """Symbolic generator (spec §3.3) with the compact tokenisation of spec §3.6. Defaults: the CPU toy."""

    task_name = "gsm_symbolic"
    task_id = 3

    form: Literal["value", "set"] = Field("value", description="'value': one integer; 'set': which vars equal q")
    n_vars: int = Field(128, ge=4, le=100_000, description="variable pool; one token per variable")
    root_max: int = Field(10, ge=0, description="the root's value is ~ U{0..root_max}")
    core_extra: int = Field(2, ge=0, description="value form: up to this many extra core variables off the chain")
    question_position: Literal["first", "last"] = Field(
        "first", description="'first': the question opens the sequence (paper §6.3); 'last': it follows the context"
    )

    def var(self, i: int) -> str:
        """Name of pool variable i, e.g. V017 (zero-padded to the pool's width)."""
        return self.vocab()[len(_SYM_FIXED) + i]

    def build_vocab(self) -> list[str]:
        width = len(str(self.n_vars - 1))
        return [*_SYM_FIXED] + [f"V{i:0{width}d}" for i in range(self.n_vars)]

    def describe(self) -> str:
        return (
            f"gsm_symbolic: {self.form} form, question {self.question_position}, ops {self.ops[0]}-{self.ops[1]}, "
            f"{self.n_vars} variables, "
            f"{self.min_tokens}-{self.max_tokens} {self.count_with} tokens, L={self.window}, vocab {self.vocab_size}"
        )


SYMBOLIC_PRESETS: dict[str, GSMSymbolicConfig] = {
    "toy": GSMSymbolicConfig(),  # spec §3.6: 128 variables, 128-320 tokens, L = 64
    # Not in the paper (its subset is unstated); our extrapolation of the toy to the paper's lengths and window.
    "paper": GSMSymbolicConfig(n_vars=1024, min_tokens=2000, max_tokens=3300, L=2000),
}


@dataclass(frozen=True)
class _Stmt:
    lhs: int
    rhs: int | None  # None: a constant assignment
    amount: int  # rhs is None: the constant; otherwise the delta (-1, 0, +1)


def _num(v: int) -> list[str]:
    return (["-"] if v < 0 else []) + list(str(abs(v)))


def _stmt_tokens(cfg: GSMSymbolicConfig, s: _Stmt) -> list[str]:
    if s.rhs is None:
        return [cfg.var(s.lhs), "=", *_num(s.amount), ";"]
    tail = [] if s.amount == 0 else ["+" if s.amount > 0 else "-", "1"]
    return [cfg.var(s.lhs), "=", cfg.var(s.rhs), *tail, ";"]


def _stmt_text(cfg: GSMSymbolicConfig, s: _Stmt) -> str:
    if s.rhs is None:
        return f"assign {cfg.var(s.lhs)} = {s.amount}."
    tail = "" if s.amount == 0 else f" {'+' if s.amount > 0 else '-'} 1"
    return f"assign {cfg.var(s.lhs)} = {cfg.var(s.rhs)}{tail}."


def _sym_question(cfg: GSMSymbolicConfig, core: Core) -> tuple[list[str], str]:
    q = core.extra["query"]
    if cfg.form == "value":
        return ["Q", cfg.var(q), ";"], f"Question: What is the value of {cfg.var(q)}?"
    value = core.extra["query_value"]
    return ["Q", "=", *_num(value), ";"], f"Question: Which variables equal {value}?"


def _sym_answer_tokens(cfg: GSMSymbolicConfig, core: Core) -> list[str]:
    if cfg.form == "value":
        return _num(int(core.answer_value))
    out: list[str] = []
    for i, name in enumerate(core.answer_value):
        out += ([","] if i else []) + [name]
    return out


def _sym_length(cfg: GSMSymbolicConfig, question: tuple[list[str], str], answer: list[str], core: Core) -> int:
    stmts: list[_Stmt] = core.payload
    if cfg.count_with == "model":
        return len(question[0]) + sum(len(_stmt_tokens(cfg, s)) for s in stmts) + 1 + len(answer) + 1
    tail = count_cl100k(f" Answer: {core.answer}")
    return count_cl100k(question[1] + " Context:") + _cl100k_pieces(cfg, stmts) + tail


def _cl100k_pieces(cfg: GSMSymbolicConfig, stmts: Sequence[_Stmt]) -> int:
    # Sentences are joined with single spaces; cl100k splits before " assign", so counts add up piece by piece.
    return sum(count_cl100k(" " + _stmt_text(cfg, s)) for s in stmts)


def draw_symbolic_core(cfg: GSMSymbolicConfig, rng: np.random.Generator, op: int) -> Core | None:
    """Spec §3.3 steps 1-3 and 6-7 (the noise comes later, from another stream)."""
    if cfg.form == "value":
        # Build the chain root -> ... -> X of `op` statements first, then hang extra core variables anywhere; X is
        # drawn among the nodes at depth exactly `op` (spec §3.3 step 7: "at least that many nodes").
        size = op + int(rng.integers(0, cfg.core_extra + 1))
        parent = [-1] + list(range(op - 1)) + [int(rng.integers(0, i)) for i in range(op, size)]
    else:
        size = op  # upstream: the op count is the number of core variables
        parent = [-1] + [int(rng.integers(0, i)) for i in range(1, size)]
    if size > cfg.n_vars:
        raise ConfigError(f"gsm_symbolic: {size} core variables exceed the pool of {cfg.n_vars}")
    names = rng.choice(cfg.n_vars, size=size, replace=False).tolist()
    deltas = rng.integers(-1, 2, size=size).tolist()  # copy, +1, -1 uniformly
    values = [int(rng.integers(0, cfg.root_max + 1))]
    depth = [1]
    for i in range(1, size):
        values.append(values[parent[i]] + deltas[i])
        depth.append(depth[parent[i]] + 1)
    stmts = [_Stmt(names[0], None, values[0])] + [_Stmt(names[i], names[parent[i]], deltas[i]) for i in range(1, size)]
    if cfg.form == "value":
        candidates = [i for i in range(size) if depth[i] == op]
        x = candidates[int(rng.integers(0, len(candidates)))]
        answer_value: Any = values[x]
        answer = str(values[x])
        extra = {"query": names[x], "query_value": values[x], "depth": op}
    else:
        x = int(rng.integers(0, size))
        answer_value = sorted(cfg.var(names[i]) for i in range(size) if values[i] == values[x])
        answer = ", ".join(answer_value)
        extra = {"query": names[x], "query_value": values[x], "depth": depth[x]}
    core = Core(op=op, key="", answer=answer, answer_value=answer_value, payload=stmts, extra=extra)
    question = _sym_question(cfg, core)
    core.key = core_key(cfg.form, [_stmt_text(cfg, s) for s in stmts], question[1])
    core.extra["core_tokens"] = _sym_length(cfg, question, _sym_answer_tokens(cfg, core), core)
    if core.extra["core_tokens"] > cfg.max_tokens:
        return None
    return core


def finish_symbolic(
    cfg: GSMSymbolicConfig, core: Core, rng: np.random.Generator
) -> tuple[list[int], list[bool], dict[str, Any]]:
    """Spec §3.3 steps 4-5 and 8: a noise tree with an unassigned root, grown to the target length; shuffle."""
    stmts: list[_Stmt] = list(core.payload)
    length = core.extra["core_tokens"]
    target = int(rng.integers(cfg.min_tokens, cfg.max_tokens + 1)) if cfg.noise else 0
    used = {s.lhs for s in stmts}
    free = rng.permutation(np.setdiff1d(np.arange(cfg.n_vars), list(used))).tolist()
    ups = rng.random(len(free)).tolist()  # parent of noise node i: floor(u * i), uniform over the earlier nodes
    deltas = rng.integers(-1, 2, size=len(free)).tolist()
    noise: list[_Stmt] = []
    if cfg.noise and length < target and len(free) >= 2:
        nodes = [free[0]]  # the noise root: never assigned, so every noise value stays undetermined
        for i in range(1, len(free)):
            s = _Stmt(free[i], nodes[int(ups[i] * len(nodes))], deltas[i])
            cost = len(_stmt_tokens(cfg, s)) if cfg.count_with == "model" else _cl100k_pieces(cfg, [s])
            if length + cost > cfg.max_tokens:
                break  # spec §3.5: a statement that overshoots is dropped and we stop
            nodes.append(free[i])
            noise.append(s)
            length += cost
            if length >= target:
                break
    order = rng.permutation(len(stmts) + len(noise)).tolist()
    everything = stmts + noise
    shuffled = [everything[i] for i in order]
    q_tokens, q_text = _sym_question(cfg, core)
    context = [t for s in shuffled for t in _stmt_tokens(cfg, s)]
    words = (q_tokens + context if cfg.question_position == "first" else context + q_tokens) + ["A"]
    answer = [*_sym_answer_tokens(cfg, core), EOS]
    index = cfg.token_index()
    ids = [index[w] for w in words + answer]
    mask = [False] * len(words) + [True] * len(answer)
    pad = 0
    if cfg.question_position == "last":
        # Keep the question in the label window with its answer (an agent is asked in its live window): if it would
        # straddle a window boundary, left-pad (inert) so it opens the next window instead. Never adds a window.
        q_start, L = len(context), cfg.window
        if q_start // L != (len(ids) - 1) // L:
            pad = L - q_start % L
            ids = [cfg.pad_id] * pad + ids
            mask = [False] * pad + mask
    body = " ".join(_stmt_text(cfg, s) for s in shuffled)
    if cfg.question_position == "first":
        text = f"{q_text} Context: {body} Answer: {core.answer}"
    else:
        text = f"Context: {body} {q_text} Answer: {core.answer}"
    meta = {
        "form": cfg.form,
        "question_position": cfg.question_position,
        "text": text,
        "depth": core.extra["depth"],
        "n_core": len(stmts),
        "n_noise": len(noise),
        "target_tokens": target,
        "n_tokens": len(ids) - pad,
        "question_pad": pad,
    }
    if cfg.count_with == "cl100k":
        meta["n_tokens_cl100k"] = count_cl100k(text)
    return ids, mask, meta


def generate(split: Split, n: int, seed: int, config: GSMSymbolicConfig | None = None, **overrides: Any) -> Batch:
    """``n`` symbolic problems; rows padded to whole windows (see the module docstring)."""
    cfg = cast(GSMSymbolicConfig, (config or GSMSymbolicConfig()).with_overrides(**overrides))
    return generate_rows(cfg, split, n, seed, draw_symbolic_core, finish_symbolic)
