"""The gated delta rule: a chunk-parallel implementation and its per-token reference.

Recurrence (state laid out key-major, ``S ∈ R^{K×V}``, the layout of fla's reference ops):

    S_t = a_t (I − b_t k_t k_tᵀ) S_{t−1} + b_t k_t v_tᵀ,      o_t = S_tᵀ q_t,      a_t = exp(g_t)

(Yang, Kautz, Hatamizadeh, "Gated Delta Networks", arXiv 2412.06464; paper.md §2.2). The ops neither normalise nor
scale q and k: the layer does that. Both functions take and return the same shapes:

    q, k: [B, T, H, K]   v: [B, T, H, V]   g (log-decay ≤ 0), beta ∈ (0, 1): [B, T, H]
    initial_state / final_state: [B, H, K, V]

Compute happens in float32 (float64 if any input is float64, for tests); the state is returned in that dtype and the
output in v's dtype. Call these functions with keywords for g and beta (fla disagrees with itself on their order).

Backends (`choose_backend`, a pure function): on a CUDA device `gated_delta_rule` runs flash-linear-attention's Triton
kernel ``chunk_gated_delta_rule`` (the ``fla`` extra); everywhere else, and wherever that kernel cannot take the
inputs, it runs `gated_delta_rule_chunked`, this module's own chunked op — the CPU path, and with
`gated_delta_rule_reference` the reference the kernel is tested against (scripts/gpu_check.sh). The torch path always
computes in float32 with autocast off, so S stays float32 under bf16 autocast (paper.md §2.2 [ours]).
``AGENTSLEEP_GDR_BACKEND=torch`` forces the torch path (``fla`` demands the kernel; ``auto``, the default, chooses).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

from agentsleep.errors import InvalidInput

DEFAULT_CHUNK_SIZE = 64
BACKEND_ENV = "AGENTSLEEP_GDR_BACKEND"
BACKENDS = ("auto", "torch", "fla")
FLA_MAX_HEAD_DIM = 256  # fla's chunk kernels: "head dimension larger than 256" is refused (common/chunk_delta_h.py)
FLA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Backend = Literal["torch", "fla"]


@dataclass(frozen=True)
class Dispatch:
    """Which implementation runs the gated delta rule, and why (for logs and error messages)."""

    backend: Backend
    reason: str


def choose_backend(
    *, device_type: str, dtype: torch.dtype, head_k: int, head_v: int, fla_available: bool, requested: str = "auto"
) -> Dispatch:
    """The dispatch rule, with no side effects (tested on CPU for every branch).

    Args:
        device_type: ``q.device.type`` ("cpu", "cuda", ...). dtype: the compute dtype of the inputs.
        head_k, head_v: d_k and d_v. fla_available: fla and triton are importable (`fla_available`).
        requested: "auto", "torch" (force this module's op) or "fla" (demand the kernel: an error if it cannot run).

    Raises:
        InvalidInput: an unknown ``requested``, or "fla" requested where the kernel cannot run (the reason is named).
    """
    if requested not in BACKENDS:
        raise InvalidInput(f"{BACKEND_ENV} / backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return Dispatch("torch", f"forced ({BACKEND_ENV}=torch)")
    blocker = None
    if device_type != "cuda":
        blocker = f"fla's Triton kernels need a CUDA device, the inputs are on {device_type!r}"
    elif not fla_available:
        blocker = "fla-core / triton are not installed (pip install 'agentsleep[fla]')"
    elif dtype not in FLA_DTYPES:
        blocker = f"fla's kernels take float32/bfloat16/float16, not {dtype}"
    elif head_k > FLA_MAX_HEAD_DIM:
        blocker = f"fla's kernels take d_k ≤ {FLA_MAX_HEAD_DIM}, got {head_k}"
    if blocker is None:
        return Dispatch("fla", "CUDA device with fla available")
    if requested == "fla":
        raise InvalidInput(f"{BACKEND_ENV}=fla, but the kernel cannot run here: {blocker}")
    return Dispatch("torch", blocker)


@cache
def fla_available() -> bool:
    """Whether fla's Triton ops can be imported (checked without importing them: the import costs seconds)."""
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """The backend asked for by ``AGENTSLEEP_GDR_BACKEND`` (default "auto")."""
    return os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None) -> torch.dtype:
    if q.dim() != 4 or k.shape != q.shape:
        raise InvalidInput(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise InvalidInput(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V]; got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise InvalidInput(f"{name} must be [B, T, H] = [{B}, {T}, {H}]; got {tuple(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise InvalidInput(
            f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[-1]}]; got {tuple(initial_state.shape)}"
        )
    tensors = [q, k, v, g, beta] + ([initial_state] if initial_state is not None else [])
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gated_delta_rule_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token loop: the definition, used as the oracle for every fast path.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g, beta: ``[B, T, H]``.
        initial_state: ``[B, H, K, V]``, optional (zeros).

    Returns:
        o: ``[B, T, H, V]`` in v's dtype. final_state: ``[B, H, K, V]`` in the compute dtype.
    """
    dt = _check(q, k, v, g, beta, initial_state)
    with torch.autocast(q.device.type, enabled=False):  # S in float32 even under bf16 autocast
        return _recurrent(q, k, v, g, beta, initial_state, dt)


def _recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None, dt: torch.dtype
) -> tuple[Tensor, Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]  # decay: a_t S
        pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)  # what S currently recalls for k_t
        delta = beta[:, t, :, None] * (v[:, t] - pred)  # [B, H, V]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]  # rank-1 write k_t δ_tᵀ
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))  # read the updated state
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V, dtype=dt)
    return o.to(v.dtype), S


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    initial_state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The fast gated delta rule: fla's Triton kernel on CUDA, `gated_delta_rule_chunked` elsewhere (module doc).

    Args and returns as `gated_delta_rule_chunked`, plus ``backend`` ("auto" / "torch" / "fla"; default: the
    ``AGENTSLEEP_GDR_BACKEND`` environment variable, else "auto"). On the fla path under autocast, q, k, v and beta
    enter the kernel in the autocast dtype (as fla's own layers feed it) and o comes back in it; g and the state are
    float32 there too (fla keeps S in float32).
    """
    dt = _check(q, k, v, g, beta, initial_state)
    if q.shape[1] > 0:
        d = choose_backend(
            device_type=q.device.type,
            dtype=dt,
            head_k=q.shape[-1],
            head_v=v.shape[-1],
            fla_available=fla_available(),
            requested=requested_backend() if backend is None else backend,
        )
        if d.backend == "fla":
            return _fla_chunk(q, k, v, g, beta, initial_state)
    return gated_delta_rule_chunked(q, k, v, g=g, beta=beta, initial_state=initial_state, chunk_size=chunk_size)


@cache
def _fla_op() -> Any:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # imported on first CUDA use only

    return chunk_gated_delta_rule


def _fla_chunk(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """fla's ``chunk_gated_delta_rule``, called by keyword (its positional order is (q, k, v, g, beta)). Our q is
    already scaled by the layer, hence ``scale=1``; state layout [B, H, K, V] is fla's default (key-major)."""
    dev = q.device.type
    act = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else v.dtype
    o, S = _fla_op()(
        q=q.to(act),
        k=k.to(act),
        v=v.to(act),
        g=g.float(),
        beta=beta.to(act),
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True,
    )
    return o, S


def gated_delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    initial_state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel gated delta rule (WY/UT form): parallel inside a chunk, a short loop across chunks.

    Within a chunk starting from state S₀, with cumulative log-decay γ_t = Σ_{i≤t} g_i and written deltas
    Δ_t = b_t (v_t − a_t S_{t−1}ᵀ k_t), unrolling the recurrence gives (paper.md §2.2, "Chunk-parallel form"):

        (I + A) Δ = diag(b) (V − diag(e^γ) K S₀)          A[t,i] = b_t e^{γ_t−γ_i} k_t·k_i   (i < t)
        O   = diag(e^γ) Q S₀ + (tril(Q Kᵀ) ⊙ E) Δ           E[t,i] = e^{γ_t−γ_i}             (i ≤ t)
        S_C = e^{γ_C} S₀ + Kᵀ diag(e^{γ_C−γ}) Δ

    The triangular solve is done once per chunk for both right-hand sides, Δ = U − W S₀, so the sequential part per
    chunk is three small matmuls. Exponents are masked to −∞ above the diagonal *before* exp, so nothing overflows:
    every exponent that is evaluated is ≤ 0. Padding (to a multiple of the chunk) uses g = 0, beta = 0, which neither
    writes nor decays the state. Fully differentiable (autograd through the solve).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g (log-decay ≤ 0), beta ∈ (0, 1): ``[B, T, H]``.
        initial_state: ``[B, H, K, V]``, optional (zeros).
        chunk_size: tokens per chunk; any T is accepted (the last chunk is padded).

    Returns:
        o: ``[B, T, H, V]`` in v's dtype. final_state: ``[B, H, K, V]`` (float32, or float64 for float64 inputs).

    Examples::

        >>> B, T, H, K, V = 1, 100, 2, 64, 64
        >>> q, k = torch.nn.functional.normalize(torch.randn(2, B, T, H, K), dim=-1)
        >>> v = torch.randn(B, T, H, V)
        >>> g, beta = -torch.rand(B, T, H), torch.rand(B, T, H)
        >>> o, S = gated_delta_rule_chunked(q, k, v, g=g, beta=beta)
        >>> o.shape, S.shape
        (torch.Size([1, 100, 2, 64]), torch.Size([1, 2, 64, 64]))
    """
    dt = _check(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be ≥ 1, got {chunk_size}")
    with torch.autocast(q.device.type, enabled=False):  # S in float32 even under bf16 autocast
        return _chunked(q, k, v, g, beta, initial_state, chunk_size, dt)


def _chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None, chunk_size: int,
    dt: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        S0 = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
        return v.new_zeros(B, 0, H, V), S0
    C = min(chunk_size, T)  # short inputs (decoding) use one exact-size chunk: no padding work
    pad = (-T) % C
    n = (T + pad) // C

    def to_chunks(x: Tensor) -> Tensor:  # [B, T, H, *] -> [B, H, n, C, *]
        x = x.to(dt)
        if pad:  # F.pad lists dims last-first: (last dims untouched) then (0, pad) on T
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.transpose(1, 2)  # [B, H, T', *]
        return x.reshape(B, H, n, C, *x.shape[3:])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)  # [B, H, n, C, K|V]
    gc = to_chunks(g).cumsum(-1)  # γ within each chunk: [B, H, n, C]
    bc = to_chunks(beta)  # [B, H, n, C]

    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # i ≤ t
    strict = incl.clone().fill_diagonal_(False)  # i < t
    E = (gc[..., :, None] - gc[..., None, :]).masked_fill(~incl, float("-inf")).exp()  # [B, H, n, C, C]

    A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * E).masked_fill(~strict, 0.0)
    rhs = torch.cat([bc[..., None] * vc, (bc * gc.exp())[..., None] * kc], dim=-1)  # [B, H, n, C, V+K]
    eye = torch.eye(C, dtype=dt, device=q.device)
    U, W = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    P = (qc @ kc.transpose(-1, -2)) * E  # intra-chunk read weights, E already zero above the diagonal
    q_decay = qc * gc.exp()[..., None]  # reads of S₀, decayed to each position
    k_decay = kc * (gc[..., -1:] - gc).exp()[..., None]  # writes, decayed to the chunk end
    chunk_decay = gc[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]

    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for i in range(n):
        delta = U[:, :, i] - W[:, :, i] @ S  # [B, H, C, V]
        outs.append(q_decay[:, :, i] @ S + P[:, :, i] @ delta)  # [B, H, C, V]
        S = chunk_decay[:, :, i] * S + k_decay[:, :, i].transpose(-1, -2) @ delta
    o = torch.stack(outs, dim=2).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)  # [B, T, H, V]
    return o.to(v.dtype), S
