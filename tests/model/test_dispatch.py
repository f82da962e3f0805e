"""Kernel dispatch of the gated delta rule (agentsleep.model.ops): the decision is a pure function, tested here for
every branch on CPU; the CUDA tests compare fla's Triton kernel with the project's reference and only run where a GPU
is (scripts/gpu_check.sh runs them)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from agentsleep.errors import InvalidInput
from agentsleep.model import ops
from agentsleep.model.ops import (
    BACKEND_ENV,
    choose_backend,
    fla_available,
    gated_delta_rule,
    gated_delta_rule_chunked,
    gated_delta_rule_reference,
)

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (no GPU on this host); scripts/gpu_check.sh runs it")


def decide(**kw) -> ops.Dispatch:
    base = dict(device_type="cuda", dtype=torch.float32, head_k=128, head_v=128, fla_available=True)
    return choose_backend(**{**base, **kw})


def test_cuda_with_fla_takes_the_kernel_for_every_supported_dtype() -> None:
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert decide(dtype=dt).backend == "fla"
    assert decide(head_k=256, head_v=512).backend == "fla"


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"device_type": "cpu"}, "CUDA device"),
        ({"fla_available": False}, "not installed"),
        ({"dtype": torch.float64}, "float64"),
        ({"head_k": 257}, "d_k ≤ 256"),
        ({"requested": "torch"}, "forced"),
    ],
    ids=["cpu", "no-fla", "float64", "wide-keys", "forced-torch"],
)
def test_everything_else_takes_the_torch_op_and_says_why(kw: dict, why: str) -> None:
    d = decide(**kw)
    assert d.backend == "torch" and why in d.reason


def test_demanding_fla_where_it_cannot_run_is_an_error_not_a_silent_fallback() -> None:
    with pytest.raises(InvalidInput, match="CUDA device"):
        decide(device_type="cpu", requested="fla")
    with pytest.raises(InvalidInput, match="not installed"):
        decide(fla_available=False, requested="fla")
    assert decide(requested="fla").backend == "fla"
    with pytest.raises(InvalidInput, match="must be one of"):
        decide(requested="triton")


def test_fla_availability_is_checked_without_importing_it() -> None:
    want = importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None
    assert fla_available() is want


def _inputs(B=2, T=70, H=2, K=32, V=24, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1) * K**-0.5
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    gate = -torch.rand(B, T, H, generator=g) * 0.3
    beta = torch.rand(B, T, H, generator=g)
    s0 = torch.randn(B, H, K, V, generator=g) * 0.1
    return [t.to(device=device, dtype=dtype if t is not gate else torch.float32) for t in (q, k, v, gate, beta, s0)]


def test_cpu_dispatch_is_the_chunked_op_and_the_env_switch_works(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, g, beta, s0 = _inputs()
    o, S = gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0)
    o2, S2 = gated_delta_rule_chunked(q, k, v, g=g, beta=beta, initial_state=s0)
    assert torch.equal(o, o2) and torch.equal(S, S2)
    monkeypatch.setenv(BACKEND_ENV, "fla")
    with pytest.raises(InvalidInput, match="CUDA device"):
        gated_delta_rule(q, k, v, g=g, beta=beta)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert torch.equal(gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0)[0], o)
    monkeypatch.setenv(BACKEND_ENV, "nonsense")
    with pytest.raises(InvalidInput, match="must be one of"):
        gated_delta_rule(q, k, v, g=g, beta=beta)


@pytest.mark.parametrize("op", [gated_delta_rule, gated_delta_rule_reference], ids=["chunked", "reference"])
def test_the_torch_path_keeps_float32_under_bf16_autocast(op) -> None:
    """S is summed over thousands of tokens and N passes: it stays float32 whatever autocast says (paper.md §2.2)."""
    q, k, v, g, beta, s0 = _inputs(T=20)
    o, S = op(q, k, v, g=g, beta=beta, initial_state=s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_ac, S_ac = op(q, k, v, g=g, beta=beta, initial_state=s0)
    assert S_ac.dtype == torch.float32 and o_ac.dtype == torch.float32
    assert torch.equal(S_ac, S) and torch.equal(o_ac, o)


# ---------------------------------------------------------------------------------------------------- CUDA only


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 63, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fla_kernel_matches_the_reference_in_values_and_gradients(T: int, dtype: torch.dtype) -> None:
    assert fla_available(), "the GPU check needs the fla extra (scripts/setup_env.sh installs it)"
    cpu = _inputs(T=T, K=64, V=64, dtype=torch.float64)
    dev = [t.detach().to("cuda", dtype if i not in (3, 5) else torch.float32).requires_grad_() for i, t in
           enumerate(cpu)]  # fmt: skip
    ref = [t.detach().requires_grad_() for t in cpu]
    o, S = gated_delta_rule(*dev[:3], g=dev[3], beta=dev[4], initial_state=dev[5], backend="fla")
    o_ref, S_ref = gated_delta_rule_reference(*ref[:3], g=ref[3], beta=ref[4], initial_state=ref[5])
    assert S.dtype == torch.float32
    tol = 2e-3 if dtype == torch.float32 else 3e-2  # fp32 inputs may run as TF32 inside Triton's dot
    scale = lambda t: t.abs().max().item() + 1e-6  # noqa: E731
    assert (o.double().cpu() - o_ref).abs().max().item() <= tol * scale(o_ref), "o"
    assert (S.double().cpu() - S_ref).abs().max().item() <= tol * scale(S_ref), "final state"
    do = torch.randn_like(o_ref)
    dS = torch.randn_like(S_ref)
    grads = torch.autograd.grad((o * do.to(o)).sum() + (S * dS.to(S)).sum(), dev)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(), ref)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_ref):
        assert (a.double().cpu() - b).abs().max().item() <= 3 * tol * scale(b), name


@cuda
@pytest.mark.cuda
def test_a_model_on_cuda_runs_the_kernel_and_agrees_with_the_cpu_model() -> None:
    from agentsleep.model.hybrid import HybridConfig, SleepHybrid

    torch.manual_seed(0)
    m = SleepHybrid(HybridConfig(vocab_size=32, d_model=128, layout="agag", window=80, bos_token_id=1)).eval()
    tokens = torch.randint(2, 32, (2, 250))
    mask = torch.zeros_like(tokens)
    mask[:, 200:] = 1
    with torch.no_grad():
        _, loss_cpu = m(tokens, mask, 2)
        calls = 0
        real = ops._fla_chunk

        def counting(*a, **kw):
            nonlocal calls
            calls += 1
            return real(*a, **kw)

        ops._fla_chunk = counting
        try:
            _, loss_gpu = m.cuda()(tokens.cuda(), mask.cuda(), 2)
        finally:
            ops._fla_chunk = real
    assert calls > 0, "the GDN layers on CUDA must run fla's kernel"
    assert abs(loss_gpu.item() - loss_cpu.item()) <= 1e-3 * max(1.0, abs(loss_cpu.item()))
