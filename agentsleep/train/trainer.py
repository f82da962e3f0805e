"""Algorithm 1 training, end to end: a config, a few pure functions and one small loop (nanoGPT spirit).

* Data: step s trains on ``task.generate("train", batch_size, seed=step_seed(data_seed, s))``, so runs with different
  N (or a resumed run) see exactly the same batches in the same order (paper §6: fixed seeds, same data order; A28).
* Model: `SleepHybrid` built from the task's vocabulary and window plus ``TrainConfig.model`` overrides; optionally
  warm-started from another checkpoint (``init_from``; the recipe of spec/tasks.md §1.5b).
* Loss: `SleepHybrid.forward` — label-free windows get N passes, label windows one, full BPTT (A26); optional
  activation checkpointing per (window, pass) and optional truncated BPTT (``detach_every`` windows).
* Optimiser: Muon for block matrices + AdamW for the rest (`agentsleep.train.optim`), linear warm-up, grad clipping.
* Output directory (the checkpoint a user loads, and what a resumed run reads)::

      config.json  model.safetensors  tokenizer.json      SleepHybrid.from_pretrained(dir) / vLLM
      train_config.json                                   this TrainConfig (seed included)
      eval.json                                           final held-out scores
      log.jsonl                                           one line per log step: step, tokens, wall, loss, metrics
      resume/  optimizer.safetensors optimizer.json trainer_state.json model.safetensors   (latest resumable step)
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from agentsleep.errors import CheckpointError, ConfigError, InvalidInput
from agentsleep.model.adaptive import AutoPasses, forward_adaptive
from agentsleep.model.hybrid import MEMORY_KINDS, HybridConfig, SleepHybrid
from agentsleep.model.state import FastWeights
from agentsleep.tasks import Task, depo, get_task
from agentsleep.train import chat_data, distributed
from agentsleep.train.optim import OptimizerName, Optimizers, lr_factor

log = logging.getLogger(__name__)

PassesDist = Literal["fixed", "uniform", "log_uniform", "lognormal_poisson"]
PASSES_STREAM = 0x5EED_9A55  # tags the N-draw stream so it never coincides with a task's data stream

RESUME_DIR = "resume"
TRAIN_CONFIG_FILE, EVAL_FILE, LOG_FILE, STATE_FILE = "train_config.json", "eval.json", "log.jsonl", "trainer_state.json"


class TrainConfig(BaseModel):
    """Every knob of one training run. Defaults: the CPU toy recipe documented in docs/training.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str = Field("rule110", description="task name in the agentsleep.tasks registry")
    preset: str = Field("toy", description="task preset (paper | toy | …)")
    task_overrides: dict[str, Any] = Field(default_factory=dict, description="task knobs, e.g. {'W': 16, 't': 4}")
    model: dict[str, Any] = Field(
        default_factory=dict, description="HybridConfig overrides (d_model, layout, heads, window, …)"
    )
    curriculum: list[tuple[int, dict[str, Any]]] = Field(
        default_factory=list,
        description="(start step, task overrides) stages applied on top of task_overrides until the next stage; "
        "evaluation always uses the target task (task_overrides alone). Identical for every N, so data stay equal.",
    )
    passes: int = Field(
        1,
        ge=1,
        description="N: sleep passes over every label-free window; with a sampled passes_dist, N_max (the largest N "
        "drawn, and the checkpoint's default sleep depth)",
    )
    passes_dist: PassesDist = Field(
        "fixed",
        description="how N is chosen per training window (or step): 'fixed' = always `passes`; 'uniform' = "
        "U{passes_min..passes}; 'log_uniform' = P(N = n) ∝ 1/n on [passes_min, passes] (about equal mass per "
        "doubling of N); 'lognormal_poisson' = 1 + Poisson(λ), log λ ~ N(log(passes_mean − 1) − σ²/2, σ), "
        "redrawn until it lies in [passes_min, passes] (Geiping et al. 2025, §3.1; see docs/training.md)",
    )
    passes_min: int = Field(1, ge=1, description="smallest N a sampled passes_dist draws")
    passes_mean: float | None = Field(
        None, gt=1, description="lognormal_poisson: mean of N before truncation (default: (passes_min + passes) / 2)"
    )
    passes_sigma: float = Field(0.5, gt=0, description="lognormal_poisson: σ of log λ (Geiping et al. use 0.5)")
    passes_per: Literal["window", "step"] = Field(
        "window",
        description="sampled N: one draw per label-free window (states of mixed depth, as an agent that sleeps for "
        "as long as it can), or one per step for every window",
    )
    eval_passes: list[int] = Field(
        default_factory=list,
        description="extra N at which the final checkpoint is scored (eval.json 'by_passes'); the headline scores and "
        "the evals during training use `passes`",
    )
    steps: int = Field(2000, ge=0, description="optimizer steps (one batch each)")
    batch_size: int = Field(64, ge=1)
    optimizer: OptimizerName = Field("muon", description="muon = Muon (block matrices) + AdamW (rest); adamw = all")
    lr_muon: float = Field(2e-3, ge=0, description="paper §6: 2e-3 for from-scratch tasks")
    lr_adamw: float = Field(2e-3, ge=0, description="AdamW LR (paper: 5e-5 beside Muon; toys need more)")
    muon_scale: Literal["rms", "shape"] = Field("rms", description="Muon update scaling (see muon.update_scale)")
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(100, ge=0, description="linear warm-up steps")
    schedule: Literal["constant", "cosine"] = "constant"
    clip: float | None = Field(1.0, description="global grad-norm clip (None = off)")
    seed: int = Field(0, ge=0, description="model init (and data order unless data_seed is set)")
    data_seed: int | None = Field(None, description="training data order; default = seed")
    eval_every: int = Field(250, ge=0, description="steps between held-out evals (0 = only at the end)")
    eval_size: int = Field(1024, ge=1, description="held-out examples scored during training")
    final_eval_size: int = Field(4096, ge=1, description="held-out examples scored at the end")
    eval_seed: int = Field(0, ge=0, description="seed of the held-out set (split 'test', disjoint from training)")
    save_every: int = Field(500, ge=0, description="steps between resumable checkpoints (0 = only at the end)")
    init_from: str | None = Field(None, description="warm start: checkpoint directory to load the weights from")
    init_optimizer: bool = Field(False, description="with init_from: also load its optimizer state, if saved")
    start_step: int = Field(
        0,
        ge=0,
        description="with init_from: continue the data stream (and schedule) at this step, e.g. the step the "
        "warm-start checkpoint was taken at, so a warm-started run sees exactly the batches its source would have seen",
    )
    detach_every: int | None = Field(None, ge=1, description="truncated BPTT: detach S every k windows (None = full)")
    gate_init: Literal["model", "slow"] = Field(
        "slow",
        description="GDN decay init. 'model': the layer's Mamba2 draw (A ~ U[1, 16], dt ~ logU[1e-3, 1e-1]); with one "
        "GDN head per layer that draw is a lottery (some seeds keep e^-13 of window 0 by the label window). 'slow': "
        "A = 1, dt ~ logU[1e-3, 1e-2], so every head starts by remembering the whole sequence (see docs/training.md).",
    )
    activation_checkpointing: bool = Field(False, description="recompute each (window, pass) in backward")
    compile: bool = Field(False, description="torch.compile every block (CPU: needs a C compiler)")
    threads: int = Field(1, ge=1, description="torch threads (one per run was the most stable on 2 shared cores)")
    # ---- scale (docs/training.md "At scale"): devices, precision, torchrun, the paper's recipes, chat data
    device: str = Field(
        "auto", description="'auto' (the rank's GPU if CUDA is available, else the CPU), 'cpu', 'cuda', 'cuda:1'"
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="'bfloat16': autocast activations to bf16; weights, optimizer state and S stay float32 "
        "(paper.md §6 [ours])",
    )
    fsdp: bool = Field(False, description="under torchrun: shard the model with FSDP2 (fully_shard) instead of DDP")
    world_size: int = Field(1, ge=1, description="processes the run trained with (recorded by the trainer)")
    stage: Literal[0, 1, 2] = Field(
        0,
        description="the paper's two-stage warm-up (§6): 1 = only the memory layers learn, hard eviction; 2 = the "
        "whole model, sliding-window eviction, from the stage-1 checkpoint (init_from). 0 = no recipe",
    )
    trainable: str = Field(
        "all",
        description="parameters that learn: 'all', 'memory' (the memory mixers: GDN / Jet layers and their input "
        "norms, i.e. the inserted memory layers of an attention model), or comma-separated glob patterns over "
        "parameter names (e.g. 'layers.1*.linear_attn.*,lm_head.*')",
    )
    data: str | None = Field(
        None, description="chat fine-tuning: a JSONL file of {'messages': [...]} (needs init_from with a chat template)"
    )
    eval_data: str | None = Field(None, description="chat fine-tuning: held-out conversations (JSONL) to score")
    log_every: int | None = Field(None, ge=1, description="steps between log rows (default: eval_every)")

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        """Stage 1 / 2 fill in what they mean unless given explicitly (paper §6: 1 epoch of the memory layers alone
        under hard eviction, then the whole model under sliding-window eviction)."""
        if not isinstance(data, dict) or data.get("stage") in (None, 0):
            return data
        stage = int(data["stage"])
        d = dict(data)
        d.setdefault("trainable", "memory" if stage == 1 else "all")
        d["model"] = {"eviction": "hard" if stage == 1 else "sliding", **dict(d.get("model") or {})}
        return d

    @model_validator(mode="after")
    def _passes_range(self) -> TrainConfig:
        if self.passes_dist != "fixed" and self.passes_min > self.passes:
            raise ValueError(f"passes_min ({self.passes_min}) > passes ({self.passes}, the N_max of the draw)")
        if self.passes_dist == "lognormal_poisson" and self.passes_mean is not None:
            if not self.passes_min <= self.passes_mean <= self.passes:
                raise ValueError(f"passes_mean {self.passes_mean} is outside [{self.passes_min}, {self.passes}]")
        if any(n < 1 for n in self.eval_passes):
            raise ValueError(f"eval_passes must be ≥ 1, got {self.eval_passes}")
        if self.stage == 2 and not self.init_from:
            raise ValueError("stage 2 continues from the stage-1 checkpoint: give init_from (--init-from STAGE1_DIR)")
        if self.data is not None and not self.init_from:
            raise ValueError("chat data (--data) trains a model with a chat template: give init_from (--init-from DIR)")
        if self.eval_data is not None and self.data is None:
            raise ValueError("eval_data is for chat fine-tuning: give data too")
        return self

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def sampled_passes(self) -> bool:
        return self.passes_dist != "fixed" and self.passes_min < self.passes


# ---------------------------------------------------------------------------------------------------- pure pieces


def step_seed(data_seed: int, step: int) -> int:
    """Seed of training batch ``step``: injective in (data_seed, step) for step < 2^32."""
    return (data_seed << 32) | step


def passes_probs(cfg: TrainConfig) -> dict[int, float]:
    """P(N = n) for n in passes_min..passes under ``cfg.passes_dist`` (exact for uniform; lognormal_poisson by a
    fixed-seed Monte Carlo of 200k draws, for the docs and tests)."""
    lo, hi = (cfg.passes, cfg.passes) if not cfg.sampled_passes else (cfg.passes_min, cfg.passes)
    if lo == hi:
        return {hi: 1.0}
    if cfg.passes_dist == "uniform":
        return {n: 1.0 / (hi - lo + 1) for n in range(lo, hi + 1)}
    if cfg.passes_dist == "log_uniform":
        return _log_uniform(lo, hi)
    draws = _draw(cfg, np.random.default_rng(0), 200_000)
    return {n: float(np.mean(draws == n)) for n in range(lo, hi + 1)}


def _draw(cfg: TrainConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` values of N from ``cfg.passes_dist``, each in [passes_min, passes]."""
    lo, hi = cfg.passes_min, cfg.passes
    if cfg.passes_dist == "uniform":
        return rng.integers(lo, hi + 1, size=n)
    if cfg.passes_dist == "log_uniform":
        probs = _log_uniform(lo, hi)
        return rng.choice(np.array(list(probs)), size=n, p=np.array(list(probs.values())))
    # Geiping et al. 2025 (§3.1): τ ~ N(log r̄ − σ²/2, σ), r ~ Poisson(e^τ) + 1, so E[r] = r̄ + 1 untruncated; we shift
    # by one so that E[N] = passes_mean, and redraw values outside [lo, hi] (truncation keeps the shape inside).
    mean = cfg.passes_mean if cfg.passes_mean is not None else (lo + hi) / 2
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        tau = rng.normal(math.log(mean - 1) - cfg.passes_sigma**2 / 2, cfg.passes_sigma, size=2 * n)
        r = rng.poisson(np.exp(tau)) + 1
        out = np.concatenate([out, r[(r >= lo) & (r <= hi)]])
    return out[:n]


def _log_uniform(lo: int, hi: int) -> dict[int, float]:
    """P(N = n) ∝ 1/n on [lo, hi]: the discrete log-uniform, so N = 1, 2, 3-4 and 5-8 each get a similar share (0.37,
    0.18, 0.22, 0.23 for 1..8) where U{1..8} gives 5-8 half of all draws and N = 2 an eighth."""
    weights = {n: 1.0 / n for n in range(lo, hi + 1)}
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()}


def draw_passes(cfg: TrainConfig, data_seed: int, step: int, n_windows: int) -> list[int]:
    """N for each of ``n_windows`` windows of training step ``step`` (one shared draw if ``passes_per == "step"``).

    A pure function of (data_seed, step), like the batch itself, so a resumed run and a rerun draw the same N.
    """
    if not cfg.sampled_passes:
        return [cfg.passes] * n_windows
    rng = np.random.default_rng([PASSES_STREAM, data_seed, step])
    k = 1 if cfg.passes_per == "step" else n_windows
    draws = [int(v) for v in _draw(cfg, rng, k)]
    return draws * n_windows if cfg.passes_per == "step" else draws


def passes_label(cfg: TrainConfig) -> str:
    """``"2"``, ``"U{1..8}"`` or ``"LNP{1..8}, mean 3"``: the training N of a run, for tables and progress bars."""
    if not cfg.sampled_passes:
        return str(cfg.passes)
    rng = f"{{{cfg.passes_min}..{cfg.passes}}}"
    per = " per step" if cfg.passes_per == "step" else ""
    if cfg.passes_dist == "uniform":
        return "U" + rng + per
    if cfg.passes_dist == "log_uniform":
        return "LogU" + rng + per
    mean = cfg.passes_mean if cfg.passes_mean is not None else (cfg.passes_min + cfg.passes) / 2
    return f"LNP{rng} mean {mean:g}" + per


def make_task(cfg: TrainConfig, stage: dict[str, Any] | None = None) -> Task:
    """The target task, or the target with a curriculum stage's overrides on top."""
    return get_task(cfg.task, cfg.preset, **{**cfg.task_overrides, **(stage or {})})


def stage_at(cfg: TrainConfig, step: int) -> int | None:
    """Index of the curriculum stage in force at ``step`` (None = the target task)."""
    idx = None
    for i, (start, _) in enumerate(cfg.curriculum):
        if step >= start:
            idx = i
    return idx


def model_config(cfg: TrainConfig, task: Task) -> HybridConfig:
    """HybridConfig for this task: its vocabulary, window, BOS and PAD, plus the run's overrides."""
    base: dict[str, Any] = {
        "vocab_size": task.vocab_size,
        "window": task.window,
        "bos_token_id": task.bos_id,
        "pad_token_id": task.pad_id,
        "d_model": 64,
        "layout": "agag",
        "attn_heads": 2,
        "gdn_heads": 1,
        "gdn_head_dim": 64,
    }
    base.update(cfg.model)
    base["passes"] = cfg.passes
    return HybridConfig(**base)


def build_model(cfg: TrainConfig, task: Task) -> SleepHybrid:
    """Fresh model from ``cfg.seed``, or the weights of ``cfg.init_from`` (architecture must match; N may differ)."""
    hc = model_config(cfg, task)
    torch.manual_seed(cfg.seed)
    model = SleepHybrid(hc)
    if cfg.gate_init == "slow":
        init_slow_gates(model)
    if cfg.init_from:
        src = SleepHybrid.from_pretrained(cfg.init_from)
        a, b = src.config.model_dump(exclude=RUN_FIELDS), hc.model_dump(exclude=RUN_FIELDS)
        if a != b:
            diff = {k: (a[k], b[k]) for k in a if a[k] != b.get(k)}
            hint = (
                ""
                if src.config.model_dump().get("vocab_size") == task.vocab_size
                else (" (a Hugging Face or other pretrained model fine-tunes on chat data: --data conversations.jsonl)")
            )
            raise CheckpointError(f"--init-from {cfg.init_from} has a different architecture: {diff}{hint}")
        model.load_state_dict(src.state_dict())
        model.source_dir = src.source_dir
    model.refresh_fingerprint()
    return model


# HybridConfig fields a warm start may change: how the same weights are run, not what they are (paper §6's stage 2
# switches hard to sliding eviction; N, L and the looped range are the recipe's to choose).
RUN_FIELDS = {"passes", "eviction", "window", "loop", "max_attention_span", "check_serving"}

SLOW_DT = (1e-3, 1e-2)  # per-token decay g = -A·dt with A = 1: 0.5%–10% lost over a 100-token sequence


@torch.no_grad()
def init_slow_gates(model: SleepHybrid, dt_range: tuple[float, float] = SLOW_DT) -> None:
    """Re-draw every GDN head's decay so S starts out long-lived: A_log = 0 (A = 1), dt log-uniform in ``dt_range``,
    stored as softplus⁻¹(dt) like the layer's own init. Uses the global torch RNG (seeded by the caller)."""
    for blk in model.layers:
        if blk.kind not in MEMORY_KINDS:  # GDN and Jet layers share the gate parameterisation
            continue
        gdn = blk.linear_attn
        gdn.A_log.zero_()
        lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
        dt = torch.exp(torch.empty_like(gdn.dt_bias).uniform_(lo, hi))
        gdn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def compile_blocks(model: SleepHybrid) -> None:
    """torch.compile each block in place (parameter names and checkpoints are unchanged)."""
    for blk in model.layers:
        blk.compile(dynamic=False)


def windowed_loss(
    model: SleepHybrid,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    passes: int | Sequence[int],
    *,
    use_checkpoint: bool = False,
    detach_every: int | None = None,
) -> torch.Tensor:
    """Mean masked CE of Algorithm 1; with ``detach_every = k`` the state S is detached after every k-th window
    (truncated BPTT across windows, paper §8 limitation 1). ``passes`` is one N for every label-free window, or one
    per window index (sampled-N training; label windows still get one pass). With one N and no truncation this is
    exactly ``model.forward``."""
    if isinstance(passes, int | np.integer):
        if detach_every is None:
            return model(tokens, loss_mask, int(passes), use_checkpoint=use_checkpoint)[1]
        per_window: Sequence[int] = []
    else:
        per_window = passes
    L = model.config.window
    n_windows = -(-tokens.shape[1] // L)
    if per_window and len(per_window) < n_windows:
        raise ValueError(f"{len(per_window)} pass counts for {n_windows} windows")
    state = model.init_state(tokens.shape[0])
    loss_sum, n_targets = torch.zeros(()), 0
    for w, s in enumerate(range(0, tokens.shape[1], L)):
        x, m = tokens[:, s : s + L], loss_mask[:, s : s + L].bool()
        scored = bool(m.any())
        n_w = int(per_window[w]) if per_window else int(passes)  # type: ignore[arg-type]
        h, state, has_bos = model._run_window(x, state, 1 if scored else n_w, use_checkpoint)
        if detach_every is not None and (w + 1) % detach_every == 0:
            state = FastWeights(
                ssm=[t.detach() for t in state.ssm],
                kv=[(k.detach(), v.detach()) for k, v in state.kv],
                kv_valid=state.kv_valid,
                fingerprint=state.fingerprint,
            )
        if scored:
            logits = model.logits(h)
            aligned = logits[:, : x.shape[1]] if has_bos else F.pad(logits[:, :-1], (0, 0, 1, 0))
            if not has_bos:
                m = m.clone()
                m[:, 0] = False
            loss_sum = loss_sum + F.cross_entropy(aligned[m], x[m], reduction="sum")
            n_targets += int(m.sum())
    return loss_sum / max(n_targets, 1)


def batch_loss(
    model: SleepHybrid, batch: Any, passes: int | Sequence[int], cfg: TrainConfig | None = None
) -> tuple[torch.Tensor, int]:
    """Loss over a task `Batch` (rows grouped by window count, A24) and the number of targets it averages over.

    ``passes``: one N, or one per window index (every row group uses the same list from window 0)."""
    groups = [batch] if np.all(batch.lengths == batch.seq_len) else list(batch.buckets().values())
    total, n = torch.zeros(()), 0
    for b in groups:
        x, m = torch.from_numpy(b.tokens).to(model.device), torch.from_numpy(b.loss_mask).to(model.device)
        k = int(m.sum())
        loss = windowed_loss(
            model,
            x,
            m,
            passes,
            use_checkpoint=bool(cfg and cfg.activation_checkpointing),
            detach_every=cfg.detach_every if cfg else None,
        )
        total, n = total + loss * k, n + k
    return total / max(n, 1), n


@torch.no_grad()
def predict(
    model: SleepHybrid, batch: Any, passes: int | AutoPasses, chunk: int = 256, *, used: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Target-aligned argmax ids ``[n, T]`` and per-token cross-entropy ``[n, T]`` (0 off targets), in chunks.

    ``passes``: N for every label-free window, or `AutoPasses` (adaptive sleep); then the passes each row used in
    each slept window are appended to ``used`` (one flat array per row group)."""
    was_training = model.training
    model.eval()
    n, T = batch.tokens.shape
    ids = np.full((n, T), -1, dtype=np.int64)
    ce = np.zeros((n, T), dtype=np.float64)
    for s in range(0, n, chunk):
        sub = batch.select(np.arange(s, min(n, s + chunk)))
        groups = sub.buckets() if not np.all(sub.lengths == sub.seq_len) else {0: sub}
        rows_of = (
            {0: np.arange(len(sub))}
            if len(groups) == 1 and 0 in groups
            else {c: np.flatnonzero(sub.n_windows == c) for c in groups}
        )
        for c, b in groups.items():
            x, m = torch.from_numpy(b.tokens).to(model.device), torch.from_numpy(b.loss_mask).to(model.device)
            if isinstance(passes, AutoPasses):
                logits, per_window = forward_adaptive(
                    model, x, m, max_passes=passes.max_passes, tol=passes.tol, criterion=passes.criterion
                )
                if used is not None:
                    used.append(per_window[per_window > 0].numpy())
            else:
                logits, _ = model(x, m, passes)  # [b, T', V] target-aligned
            tok_ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none") * m  # [b, T']
            rows = s + rows_of[c]
            ids[rows, : x.shape[1]] = logits.argmax(-1).cpu().numpy()
            ce[rows, : x.shape[1]] = tok_ce.cpu().numpy()
    model.train(was_training)
    return ids, ce


def evaluate(model: SleepHybrid, task: Task, batch: Any, passes: int | AutoPasses) -> dict[str, float]:
    """Task scores on a held-out batch plus the mean target loss (and per-k CE where the task defines it).

    With ``passes=AutoPasses(...)`` (adaptive sleep) the scores also hold ``mean_passes`` (over slept windows) and
    ``max_passes_used``."""
    used: list[np.ndarray] = []
    ids, ce = predict(model, batch, passes, used=used)
    out = dict(task.score(ids, batch))
    out["loss"] = float(ce[batch.loss_mask].mean())
    if isinstance(passes, AutoPasses):
        flat = np.concatenate(used) if used else np.zeros(0)
        out["mean_passes"] = float(flat.mean()) if len(flat) else 0.0
        out["max_passes_used"] = float(flat.max()) if len(flat) else 0.0
    if task.name == "depo":  # the paper's Depo metric is test loss per k (spec §2.4)
        out.update(depo.per_k_ce(ce, batch, task.config))  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------------- checkpoints


def save_run(
    out: Path,
    model: SleepHybrid,
    task: Task | None,
    cfg: TrainConfig,
    *,
    step: int,
    scores: dict[str, float] | None,
    by_passes: dict[int, dict[str, float]] | None = None,
    tokens: int | None = None,
) -> None:
    """The user-facing checkpoint: config.json (+ training facts under "agentsleep"), weights, tokenizer, config.

    ``by_passes``: scores of the same weights at other N (sampled-N runs), written to eval.json as ``by_passes``.
    ``task``: None for chat fine-tuning (the tokenizer and chat template are the source checkpoint's, copied)."""
    extra = {
        "task": task.name if task is not None else "chat",
        "task_config": task.config.model_dump(mode="json") if task is not None else {"data": cfg.data},
        "train_config": cfg.model_dump(mode="json"),
        "seed": cfg.seed,
        "step": step,
        "tokens": tokens if tokens is not None else step * cfg.batch_size * (task.seq_len if task else 0),
        "eval": scores or {},
    }
    model.save_pretrained(out, extra_config=extra)
    if task is not None:
        task.save_tokenizer(out / "tokenizer.json")
    (out / TRAIN_CONFIG_FILE).write_text(cfg.model_dump_json(indent=2) + "\n")
    if scores is not None:
        row: dict[str, Any] = {"step": step, "passes": cfg.passes, **scores}
        if by_passes:
            row["by_passes"] = {str(n): by_passes[n] for n in sorted(by_passes)}
        (out / EVAL_FILE).write_text(json.dumps(row, indent=2) + "\n")


def save_resume(
    out: Path,
    model: SleepHybrid | dict[str, torch.Tensor],
    opts: Optimizers,
    state: dict[str, Any],
    *,
    write: bool = True,
) -> None:
    """Everything needed to continue bit-identically: weights, optimizer tensors, step/tokens/wall.

    ``model``: the model, or its whole weights (gathered from FSDP2 shards). Under FSDP2 every rank calls this (the
    optimizer state is gathered too); only ``write`` ranks write."""
    d = out / RESUME_DIR
    if write:
        d.mkdir(parents=True, exist_ok=True)
        sd = model if isinstance(model, dict) else model.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    opts.save(d, write=write)
    if write:
        (d / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


# Settings a resumed run may change: they do not change what the next steps compute (up to float rounding of the
# gradient all-reduce, for the process count and the sharding).
RESUME_MAY_CHANGE = ("steps", "eval_every", "save_every", "final_eval_size", "eval_passes", "log_every", "device",
                     "world_size", "fsdp")  # fmt: skip


def check_resume(out: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The resumable state of ``out`` (None if there is none), after checking it was trained with ``cfg``."""
    d = out / RESUME_DIR
    if not (d / STATE_FILE).is_file():
        return None
    saved = json.loads((out / TRAIN_CONFIG_FILE).read_text()) if (out / TRAIN_CONFIG_FILE).is_file() else None
    if saved is not None:  # fields added since the run started take their defaults
        saved = TrainConfig.model_validate(saved).model_dump(mode="json")
        mine = cfg.model_dump(mode="json")
        diff = {k for k in mine if k not in RESUME_MAY_CHANGE and saved.get(k) != mine[k]}
        if diff:
            raise CheckpointError(f"{out} was trained with different settings ({sorted(diff)}); use another --out")
    return json.loads((d / STATE_FILE).read_text())


def load_resume(out: Path, model: SleepHybrid, opts: Optimizers | None, cfg: TrainConfig) -> dict[str, Any] | None:
    """`check_resume`, then the saved weights into ``model`` (and the optimizer state into ``opts``, if given)."""
    state = check_resume(out, cfg)
    if state is None:
        return None
    model.load_state_dict(load_file(str(out / RESUME_DIR / "model.safetensors")))
    model.refresh_fingerprint()
    if opts is not None:
        opts.load(out / RESUME_DIR)
    return state


# ---------------------------------------------------------------------------------------------------- what learns


def trainable_names(model: SleepHybrid, spec: str) -> list[str]:
    """The parameters ``spec`` (`TrainConfig.trainable`) selects, in ``named_parameters`` order.

    Raises:
        ConfigError: a spec that selects nothing, or a glob pattern that matches no parameter (a typo).
    """
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        return names
    if spec == "memory":
        heads = tuple(
            f"layers.{i}.{part}."
            for i, blk in enumerate(model.layers)
            if blk.kind in MEMORY_KINDS
            for part in ("linear_attn", "input_layernorm")
        )
        chosen = [n for n in names if n.startswith(heads)]
        if not chosen:
            raise ConfigError(f"trainable='memory', but the model has no memory layer (layout {model.config.layout!r})")
        return chosen
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if not patterns or unmatched:
        raise ConfigError(
            f"trainable={spec!r}: {unmatched or 'no pattern'} matches no parameter; use 'all', 'memory' or glob "
            f"patterns over names such as {names[:3]}"
        )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def apply_trainable(model: SleepHybrid, spec: str) -> int:
    """Freeze every parameter ``spec`` does not select; returns the number of trainable weights."""
    keep = set(trainable_names(model, spec))
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        count += p.numel() if name in keep else 0
    return count


# ---------------------------------------------------------------------------------------------------- data sources


class TaskData:
    """Training data from a built-in generator (`agentsleep.tasks`): scored with the task's own metric."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.task = make_task(cfg)
        self.stage_tasks = [make_task(cfg, ov) for _, ov in cfg.curriculum]
        self.name = cfg.task

    def build(self) -> SleepHybrid:
        return build_model(self.cfg, self.task)

    def train_batch(self, step: int) -> Any:
        i = stage_at(self.cfg, step)
        src = self.task if i is None else self.stage_tasks[i]
        return src.generate("train", self.cfg.batch_size, step_seed(self.cfg.effective_data_seed, step))

    def eval_batch(self, n: int) -> Any:
        return self.task.generate("test", n, self.cfg.eval_seed)

    def loss(self, model: SleepHybrid, batch: Any, passes: int | Sequence[int]) -> tuple[torch.Tensor, int]:
        return batch_loss(model, batch, passes, self.cfg)

    def evaluate(self, model: SleepHybrid, batch: Any, passes: int | AutoPasses) -> dict[str, float]:
        return evaluate(model, self.task, batch, passes)

    def n_targets(self, batch: Any) -> int:
        return int(batch.loss_mask.sum())

    def n_tokens(self, batch: Any) -> int:
        return int(batch.lengths.sum())

    def n_windows(self, batch: Any, window: int) -> int:
        return -(-int(batch.tokens.shape[1]) // window)

    def save(self, out: Path, model: SleepHybrid, **kw: Any) -> None:
        save_run(out, model, self.task, self.cfg, **kw)


class ChatData:
    """Conversations in a JSONL file rendered with the ``init_from`` checkpoint's chat template
    (`agentsleep.train.chat_data`); scored by assistant-token loss and accuracy on ``eval_data``."""

    def __init__(self, cfg: TrainConfig) -> None:
        assert cfg.data is not None and cfg.init_from is not None  # TrainConfig checks both
        self.cfg = cfg
        self.name = "chat"
        self.rows = chat_data.load_conversations(cfg.data, cfg.init_from)
        self.eval_rows = chat_data.load_conversations(cfg.eval_data, cfg.init_from) if cfg.eval_data else []
        log.info("%d training conversations (%d tokens), %d held out", len(self.rows),
                 sum(len(c) for c in self.rows), len(self.eval_rows))  # fmt: skip

    def build(self) -> SleepHybrid:
        """The pretrained model (float32 master weights) with the run's overrides (window, loop, insert_memory …)."""
        model = SleepHybrid.from_pretrained(
            self.cfg.init_from,  # type: ignore[arg-type]
            dtype=torch.float32,
            **{**self.cfg.model, "passes": self.cfg.passes},
        )
        vocab = model.config.vocab_size
        for c in self.rows + self.eval_rows:
            if len(c) and int(c.tokens.max()) >= vocab:
                raise InvalidInput(f"line {c.line}: token id {int(c.tokens.max())} is outside the vocabulary ({vocab})")
        return model.train()

    def train_batch(self, step: int) -> chat_data.ChatBatch:
        idx = chat_data.rows_for_step(len(self.rows), self.cfg.batch_size, self.cfg.effective_data_seed, step)
        return chat_data.ChatBatch(tuple(self.rows[i] for i in idx))

    def eval_batch(self, n: int) -> chat_data.ChatBatch | None:
        return chat_data.ChatBatch(tuple(self.eval_rows[:n])) if self.eval_rows else None

    def loss(
        self, model: SleepHybrid, batch: chat_data.ChatBatch, passes: int | Sequence[int]
    ) -> tuple[torch.Tensor, int]:
        return chat_data.batch_loss(
            model,
            batch,
            passes,
            use_checkpoint=self.cfg.activation_checkpointing,
            detach_every=self.cfg.detach_every,
        )

    def evaluate(self, model: SleepHybrid, batch: chat_data.ChatBatch, passes: int | AutoPasses) -> dict[str, float]:
        if isinstance(passes, AutoPasses):
            raise InvalidInput("adaptive sleep (-N auto) is not implemented for chat data; give a number of passes")
        return chat_data.evaluate(model, batch, passes)

    def n_targets(self, batch: chat_data.ChatBatch) -> int:
        return batch.n_targets

    def n_tokens(self, batch: chat_data.ChatBatch) -> int:
        return batch.n_tokens

    def n_windows(self, batch: chat_data.ChatBatch, window: int) -> int:
        return batch.max_windows(window)

    def save(self, out: Path, model: SleepHybrid, **kw: Any) -> None:
        save_run(out, model, None, self.cfg, **kw)


def make_data(cfg: TrainConfig) -> TaskData | ChatData:
    return ChatData(cfg) if cfg.data is not None else TaskData(cfg)


# ---------------------------------------------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train one model; write the checkpoint directory; return ``{"step", "tokens", "wall", "eval", "history"}``.

    Re-running with the same config into the same directory resumes from the latest resumable step and continues
    bit-identically (same batches, same optimizer state; CPU float32 with a fixed thread count). Under ``torchrun``
    every process calls this; rank 0 alone writes (`agentsleep.train.distributed`).
    """
    torch.set_flush_denormal(True)  # the decaying fast-weight state fills with denormals otherwise (~6x slower)
    torch.set_num_threads(cfg.threads)
    env = distributed.setup(cfg.device)
    try:
        return _train(cfg.model_copy(update={"world_size": env.world}), Path(out_dir), env, resume, progress, on_eval)
    finally:
        distributed.teardown(env)


def _train(
    cfg: TrainConfig,
    out: Path,
    env: distributed.Distributed,
    resume: bool,
    progress: bool,
    on_eval: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, Any]:
    main = env.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    env.barrier()
    data = make_data(cfg)
    model = data.build()
    start, tokens, wall = cfg.start_step, 0, 0.0
    history: list[dict[str, Any]] = []
    state = load_resume(out, model, None, cfg) if resume else None  # weights now, optimizer state once it exists
    if state is not None:
        start, tokens, wall = state["step"], state["tokens"], state["wall"]
        history = [r for r in _read_log(out) if r["step"] <= start]
        log.info("resuming %s at step %d", out, start)
    elif cfg.init_from and cfg.start_step:  # the source's cost counts: equal tokens means equal tokens
        src = _read_state(Path(cfg.init_from))
        if src is not None:
            if src["step"] != cfg.start_step:
                raise CheckpointError(f"{cfg.init_from} stopped at step {src['step']}, not start_step={cfg.start_step}")
            tokens, wall = src["tokens"], src["wall"]
            history = [r for r in _read_log(Path(cfg.init_from)) if r["step"] <= cfg.start_step]
    n_train = apply_trainable(model, cfg.trainable)
    if cfg.trainable != "all":
        log.info("training %s: %d of %d weights", cfg.trainable, n_train, sum(p.numel() for p in model.parameters()))
    model.to(env.device)
    if cfg.compile:
        compile_blocks(model)
    sharded = cfg.fsdp and env.world > 1
    root = distributed.wrap(model, env, fsdp=sharded, find_unused="e" in model.config.mlp_kinds)
    opts = Optimizers(
        model,
        name=cfg.optimizer,
        lr_muon=cfg.lr_muon,
        lr_adamw=cfg.lr_adamw,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        muon_scale=cfg.muon_scale,
    )
    if state is not None:
        opts.load(out / RESUME_DIR)
    elif cfg.init_from and cfg.init_optimizer and (Path(cfg.init_from) / RESUME_DIR / "optimizer.json").is_file():
        opts.load(Path(cfg.init_from) / RESUME_DIR)
    env.barrier()  # every rank has read the resumable state before rank 0 rewrites the run's files
    if main:
        (out / TRAIN_CONFIG_FILE).write_text(cfg.model_dump_json(indent=2) + "\n")
        _write_log(out, history)
    amp = (
        (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16))
        if cfg.precision == "bfloat16"
        else contextlib.nullcontext
    )
    eval_batch = data.eval_batch(cfg.eval_size)
    model.train()

    def run_eval(step: int, batch: Any, passes: int | AutoPasses) -> dict[str, float]:
        with torch.no_grad(), amp():
            scores = root(data.evaluate, batch, passes)  # every rank runs it (FSDP2 needs them all); rank 0 keeps it
        if on_eval is not None and main:
            on_eval(step, scores)
        return scores

    def save_resumable(step: int) -> None:
        weights = _export_weights(model, env, sharded)
        save_resume(out, weights, opts, {"step": step, "tokens": tokens, "wall": wall}, write=main)
        env.barrier()

    if state is None and cfg.eval_every and eval_batch is not None:  # fresh or warm-started: score the start
        scores = run_eval(start, eval_batch, cfg.passes)
        history.append({"step": start, "tokens": tokens, "wall": round(wall, 3), "eval": scores})
        if main:
            _append_log(out, history[-1])
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not (progress and main),
        desc=f"{data.name} N={passes_label(cfg)}" + (f" x{env.world}" if env.world > 1 else ""),
        dynamic_ncols=True,
    )
    log_every = cfg.log_every or cfg.eval_every
    losses: list[float] = []
    L = model.config.window
    for step in bar:
        batch = data.train_batch(step)
        t0 = time.perf_counter()
        opts.set_lr_factor(lr_factor(step, warmup=cfg.warmup, total=cfg.steps, schedule=cfg.schedule))
        n_windows = data.n_windows(batch, L)
        passes: int | list[int] = (
            draw_passes(cfg, cfg.effective_data_seed, step, n_windows) if cfg.sampled_passes else cfg.passes
        )
        if env.world == 1:
            with amp():
                loss, _ = root(data.loss, batch, passes)
            scaled, value = loss, loss.item()
        else:  # this rank's rows; the scaled loss makes the averaged gradient the whole batch's (distributed.scale)
            n_global = data.n_targets(batch)
            with amp():
                loss, n_local = root(data.loss, batch.select(distributed.shard_rows(len(batch), env.rank, env.world)),
                                     passes)  # fmt: skip
            scaled = distributed.scale(loss, n_local, n_global, env.world)
            value = env.sum(loss.item() * n_local) / max(n_global, 1)
        opts.zero_grad()
        scaled.backward()
        gnorm = distributed.clip_grad_norm([p for p in model.parameters() if p.requires_grad], cfg.clip)
        opts.step()
        wall += time.perf_counter() - t0
        tokens += data.n_tokens(batch)
        losses.append(value)
        done = step + 1
        do_eval = bool(cfg.eval_every and done % cfg.eval_every == 0 and eval_batch is not None)
        if (log_every and done % log_every == 0) or done == cfg.steps or do_eval:
            row: dict[str, Any] = {
                "step": done,
                "tokens": tokens,
                "wall": round(wall, 3),
                "loss": float(np.mean(losses)),
                "grad_norm": gnorm,
            }
            losses = []
            if do_eval:
                row["eval"] = run_eval(done, eval_batch, cfg.passes)
                bar.set_postfix(loss=f"{row['loss']:.3f}", **_headline(row["eval"]))
            history.append(row)
            if main:
                _append_log(out, row)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_resumable(done)
    bar.close()
    final_batch = data.eval_batch(cfg.final_eval_size)
    final: dict[str, float] = {}
    by_passes: dict[int, dict[str, float]] = {}
    if final_batch is not None:
        final = run_eval(cfg.steps, final_batch, cfg.passes)
        by_passes = {n: run_eval(cfg.steps, final_batch, n) for n in cfg.eval_passes if n != cfg.passes}
        if by_passes:
            by_passes[cfg.passes] = final
    weights = _export_weights(model, env, sharded)
    if main:
        export = _export_model(model, weights, sharded)
        data.save(out, export, step=cfg.steps, scores=final if final_batch is not None else None,
                  by_passes=by_passes, tokens=tokens)  # fmt: skip
    save_resume(out, weights, opts, {"step": cfg.steps, "tokens": tokens, "wall": wall}, write=main)
    env.barrier()
    log.info("trained %s N=%s: %s", data.name, passes_label(cfg), _headline(final))
    return {"step": cfg.steps, "tokens": tokens, "wall": wall, "eval": final, "history": history}


def _export_weights(model: SleepHybrid, env: distributed.Distributed, sharded: bool) -> Any:
    """What a checkpoint is written from: the model itself, or (FSDP2) its weights gathered on rank 0."""
    return distributed.full_state_dict(model, env) if sharded else model


def _export_model(model: SleepHybrid, weights: Any, sharded: bool) -> SleepHybrid:
    """The model to save: the trained one, or (FSDP2) a CPU copy built from the gathered weights."""
    if not sharded:
        model.refresh_fingerprint()
        return model
    with torch.device("meta"):
        copy = SleepHybrid(model.config)
    copy.load_state_dict(weights, assign=True)
    if model.config.tie_embeddings:
        copy.lm_head.weight = copy.embed_tokens.weight
    copy.source_dir = model.source_dir
    copy.refresh_fingerprint()
    return copy


def _read_state(run: Path) -> dict[str, Any] | None:
    p = run / RESUME_DIR / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def _headline(scores: dict[str, float]) -> dict[str, str]:
    return {k: f"{scores[k]:.3f}" for k in ("exact", "per_label") if k in scores}


def _read_log(out: Path) -> list[dict[str, Any]]:
    p = out / LOG_FILE
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def _write_log(out: Path, rows: list[dict[str, Any]]) -> None:
    (out / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _append_log(out: Path, row: dict[str, Any]) -> None:
    with (out / LOG_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")


def load_log(out_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL training log of a run directory."""
    return _read_log(Path(out_dir))
