"""The Jet memory layer ('j'): the dynamic conv against its per-token reference, the layer against a from-the-definition
reference, and the hybrid's invariants (paper.md §10) with Jet blocks: N = 1 is the plain model, decoding equals the
parallel forward, pads are inert; plus config, fingerprint and checkpoint behaviour of the new kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.model.fingerprint import canonical_config, fingerprint_of
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.model.jet import JetGatedDeltaNet, dynamic_short_conv, dynamic_short_conv_reference
from agentsleep.model.layers import apply_rope, rope_cos_sin
from agentsleep.model.ops import gated_delta_rule_reference
from tests.model.equivalence import three_ways

V, BOS, PAD = 9, 7, 8


def make(layout: str = "ajaj", eviction: str = "hard", bos: int | None = BOS, window: int = 6, **kw) -> SleepHybrid:
    cfg = HybridConfig(
        vocab_size=V, d_model=64, layout=layout, window=window, eviction=eviction, bos_token_id=bos, pad_token_id=PAD,
        **kw,
    )  # fmt: skip
    m = SleepHybrid(cfg).double().eval()
    with torch.no_grad():  # S must matter: slow forgetting, strong read-out, a visibly token-dependent kernel
        for b in m.layers:
            if b.kind == "j":
                b.linear_attn.A_log.fill_(-3.0)
                b.linear_attn.out_proj.weight.mul_(8.0)
                b.linear_attn.dynamic_conv1d.kernel_generator.w2.weight.mul_(20.0)
    return m


def toks(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize(
    ("B", "T", "C", "W", "with_state"),
    [(1, 1, 3, 4, False), (2, 5, 24, 4, True), (3, 37, 7, 2, True), (2, 64, 16, 3, False), (1, 2, 5, 4, True)],
    ids=lambda v: str(v),
)
def test_dynamic_conv_equals_reference_in_values_and_gradients(B, T, C, W, with_state) -> None:
    torch.manual_seed(42)
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    kern = torch.randn(B, T, C, W, dtype=torch.float64, requires_grad=True)
    st = torch.randn(B, C, W - 1, dtype=torch.float64, requires_grad=True) if with_state else None
    y, s = dynamic_short_conv(x, kern, st)
    y_ref, s_ref = dynamic_short_conv_reference(x, kern, st)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    inputs = [x, kern] + ([st] if st is not None else [])
    g = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs)
    g_ref = torch.autograd.grad((y_ref * dy).sum() + (s_ref * ds).sum(), inputs)
    for name, a, b in zip(("dx", "dkernels", "dstate"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_dynamic_conv_split_and_carry_equals_one_call() -> None:
    x, kern = torch.randn(2, 11, 6, dtype=torch.float64), torch.randn(2, 11, 6, 4, dtype=torch.float64)
    y, s = dynamic_short_conv(x, kern)
    y1, s1 = dynamic_short_conv(x[:, :5], kern[:, :5])
    y2, s2 = dynamic_short_conv(x[:, 5:], kern[:, 5:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-12)
    assert torch.equal(s2, s)


def test_a_constant_kernel_is_the_static_depthwise_conv() -> None:
    """With the generated part at zero, Jet's conv is a static depthwise causal conv (GDN's conv1d, values only)."""
    x, w = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y, _ = dynamic_short_conv(x, w.expand(2, 9, 5, 4))
    static = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None], groups=5).transpose(1, 2)
    torch.testing.assert_close(y, static, rtol=0, atol=1e-12)


def test_bad_conv_shapes_raise_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="kernels"):
        dynamic_short_conv(torch.randn(1, 3, 4), torch.randn(1, 3, 5, 4))
    with pytest.raises(InvalidInput, match="conv_state"):
        dynamic_short_conv(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 4), torch.randn(1, 4, 2))


# ---------------------------------------------------------------------------------------------------- the layer


def jet_layer_reference(layer: JetGatedDeltaNet, x: torch.Tensor, S0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Jet layer written from its definition (module docstring of agentsleep.model.jet) with the per-token
    references, reading the weights directly (not through the layer's methods)."""
    B, T, _ = x.shape
    hk, hv, dk, dv, r = layer.h_k, layer.h_v, layer.d_k, layer.d_v, layer.ratio
    W = layer.conv_size
    qkvz = (x @ layer.in_proj_qkvz.weight.T).view(B, T, hk, 2 * dk + 2 * r * dv)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], -1)
    ba = (x @ layer.in_proj_ba.weight.T).view(B, T, hk, 2 * r)
    b, a = ba.split([r, r], -1)
    gen = layer.dynamic_conv1d.kernel_generator
    kern = (F.silu(x @ gen.w1.weight.T) @ gen.w2.weight.T + gen.w2.bias).view(B, T, hv * dv, W)
    v, _ = dynamic_short_conv_reference(v.reshape(B, T, hv * dv), kern)
    v = F.silu(v).reshape(B, T, hv, dv)
    q = F.normalize(F.silu(q), dim=-1).repeat_interleave(r, 2) * dk**-0.5
    k = F.normalize(F.silu(k), dim=-1).repeat_interleave(r, 2)
    beta = b.reshape(B, T, hv).sigmoid()
    g = -layer.A_log.exp() * F.softplus(a.reshape(B, T, hv) + layer.dt_bias)
    o, S = gated_delta_rule_reference(q, k, v, g=g, beta=beta, initial_state=S0)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm.eps)  # per-head RMSNorm ...
    o = o * layer.norm.weight * F.silu(z.reshape(B, T, hv, dv))  # ... gated by SiLU(z)
    return o.reshape(B, T, hv * dv) @ layer.out_proj.weight.T, S


@pytest.mark.parametrize("T", [3, 20, 70], ids=lambda t: f"T{t}")  # ≤ 8 takes the recurrent op, > 64 two chunks
@pytest.mark.parametrize("heads", [(1, 1), (1, 2)], ids=["hv1", "gqa2"])
def test_jet_layer_equals_its_definition(T: int, heads: tuple[int, int]) -> None:
    cfg = HybridConfig(vocab_size=V, d_model=64, layout="aj", gdn_heads=heads[0], gdn_v_heads=heads[1])
    layer = JetGatedDeltaNet(cfg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, T, 64, dtype=torch.float64)
    S0 = torch.randn(2, layer.h_v, layer.d_k, layer.d_v, dtype=torch.float64) * 0.1
    out, S, conv = layer(x, S0)
    ref_out, ref_S = jet_layer_reference(layer, x, S0)
    torch.testing.assert_close(out, ref_out, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(S, ref_S, rtol=1e-7, atol=1e-9)
    assert conv.shape == (2, layer.value_dim, cfg.conv_size - 1)
    assert not hasattr(layer, "conv1d") or layer.conv1d is None  # Jet has no static conv


def test_kernel_generator_learns_from_a_fresh_init() -> None:
    """Both generator matrices get gradient at init (Jet-Nemotron zero-inits both, a fixed point from scratch)."""
    m = SleepHybrid(HybridConfig(vocab_size=V, layout="aj", window=6, bos_token_id=BOS)).train()
    tokens = toks(2, 14, seed=1)
    mask = torch.zeros_like(tokens)
    mask[:, 12:] = 1
    _, loss = m(tokens, mask, passes=2)
    loss.backward()
    gen = m.layers[1].linear_attn.dynamic_conv1d.kernel_generator
    for p in (gen.w1.weight, gen.w2.weight, gen.w2.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- the model


def flat_jet_hybrid_logits(m: SleepHybrid, tokens: torch.Tensor) -> torch.Tensor:
    """Hard eviction, N = 1, with BOS: one pass over the flat sequence with a block-diagonal causal mask, one
    uninterrupted delta-rule scan per Jet layer, the dynamic conv restarted at every window. Written from the
    definition with the layer reference above; returns the logits at every token's slot [B, T, V]."""
    cfg = m.config
    L, B, T = cfg.window, *tokens.shape
    pieces, win_id, pos, tok_slot, slot = [], [], [], [], 0
    for w, s in enumerate(range(0, T, L)):
        pieces += [torch.full((B, 1), cfg.bos_token_id), tokens[:, s : s + L]]
        n = tokens[:, s : s + L].shape[1] + 1
        win_id += [w] * n
        pos += list(range(n))
        tok_slot += list(range(slot + 1, slot + n))
        slot += n
    ids, win, positions = torch.cat(pieces, 1), torch.tensor(win_id), torch.tensor(pos)
    Sn = ids.shape[1]
    mask = (torch.arange(Sn)[None, :] <= torch.arange(Sn)[:, None]) & (win[:, None] == win[None, :])
    h = m.embed_tokens(ids)
    for blk in m.layers:
        x = blk.input_layernorm(h)
        if blk.kind == "a":
            a = blk.self_attn
            q = a.q_norm(a.q_proj(x).view(B, Sn, a.n_heads, a.head_dim).transpose(1, 2))
            k = a.k_norm(a.k_proj(x).view(B, Sn, a.n_kv, a.head_dim).transpose(1, 2))
            v = a.v_proj(x).view(B, Sn, a.n_kv, a.head_dim).transpose(1, 2)
            cos, sin = rope_cos_sin(positions, a.head_dim, a.theta, torch.float64)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = a.o_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, Sn, -1))
        else:  # the delta rule scans on; the conv restarts per window: run the reference window by window
            layer, S, ys = blk.linear_attn, None, []
            S = torch.zeros(B, layer.h_v, layer.d_k, layer.d_v, dtype=torch.float64)
            for w in range(int(win.max()) + 1):
                sel = (win == w).nonzero().flatten()
                yw, S = jet_layer_reference(layer, x[:, sel], S)
                ys.append(yw)
            y = torch.cat(ys, 1)
        h = h + y
        h = h + blk.mlp(blk.post_attention_layernorm(h))
    logits = m.logits(h)
    return logits[:, torch.tensor(tok_slot) - 1]  # the slot before a token predicts it


def test_n1_equals_the_flat_plain_jet_hybrid() -> None:
    m = make("ajaj")
    tokens = toks(2, 22, seed=3)
    mask = torch.zeros_like(tokens)
    mask[:, 18:] = 1
    with torch.no_grad():
        aligned, _ = m(tokens, mask, passes=1)
        flat = flat_jet_hybrid_logits(m, tokens)
    torch.testing.assert_close(aligned[:, 18:], flat[:, 18:], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("layout", ["ajaj", "agaj"])
def test_decoding_and_window_api_equal_algorithm1(eviction: str, layout: str) -> None:
    m = make(layout, eviction)
    N, tokens = 3, toks(2, 20, seed=1)
    aligned, chunk_logits, step, st, st2 = three_ways(m, tokens, N)
    torch.testing.assert_close(chunk_logits[:, 0], aligned[:, 19], rtol=0, atol=1e-10)
    torch.testing.assert_close(step, chunk_logits, rtol=0, atol=1e-9)
    for a, b in zip(st.ssm, st2.ssm):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with torch.no_grad():  # and the content of earlier windows reaches the logits only through S
        other = m.sleep(toks(2, 6, seed=9), m.init_state(2), N)
        assert not torch.allclose(m.forward_chunk(tokens[:, 18:], other)[0], chunk_logits)


def test_padding_is_inert_in_jet_layers() -> None:
    m = make("ajaj")
    real = toks(2, 6, seed=8)
    with torch.no_grad():
        s0 = m.sleep(real, m.init_state(2), 2)
        s1 = m.sleep(torch.full((2, 6), PAD), s0, 3)
    assert all(torch.equal(a, b) for a, b in zip(s0.ssm, s1.ssm))


# ---------------------------------------------------------------------------------------------------- config, identity


def test_config_accepts_j_and_lists_it_as_unservable() -> None:
    cfg = HybridConfig(vocab_size=V, layout="AJag")
    assert cfg.layout == "ajag"
    assert any("Jet" in p for p in cfg.serving_problems())
    assert HybridConfig(vocab_size=V, layout="agag").serving_problems() == []
    with pytest.raises(ConfigError, match="'a', 'g' and 'j'"):
        HybridConfig(vocab_size=V, layout="ax")
    with pytest.raises(ConfigError):
        HybridConfig(vocab_size=V, layout="aj", jet_generator_reduction=0)


def test_new_field_at_its_default_changes_no_fingerprint_and_otherwise_does() -> None:
    tensors = {"w": torch.ones(2, 2)}
    plain = HybridConfig(vocab_size=V, layout="ag")
    assert "jet_generator_reduction" not in canonical_config(plain)
    explicit = HybridConfig(vocab_size=V, layout="ag", jet_generator_reduction=8)
    assert fingerprint_of(plain, tensors) == fingerprint_of(explicit, tensors)
    assert fingerprint_of(plain, tensors).aliases == fingerprint_of(explicit, tensors).aliases  # v1 alias kept
    jet = HybridConfig(vocab_size=V, layout="aj")
    assert fingerprint_of(jet, tensors) != fingerprint_of(plain, tensors)
    assert fingerprint_of(HybridConfig(vocab_size=V, layout="aj", jet_generator_reduction=4), tensors) != (
        fingerprint_of(jet, tensors)
    )


def test_checkpoint_round_trip_bit_for_bit(tmp_path: Path) -> None:
    m = make("ajag").float()
    m.save_pretrained(tmp_path / "jet")
    back = SleepHybrid.from_pretrained(tmp_path / "jet")
    assert back.config == m.config and back.fingerprint == m.fingerprint
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    tokens = toks(1, 10, seed=4)
    mask = torch.zeros_like(tokens)
    mask[:, 7:] = 1
    with torch.no_grad():
        assert torch.equal(m(tokens, mask, 2)[0], back(tokens, mask, 2)[0])
