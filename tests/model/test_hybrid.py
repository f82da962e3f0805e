"""Invariants of the sleep hybrid (paper.md §10): N=1 is the plain hybrid, S is the only carrier, decoding equals the
parallel forward, N>1 changes consolidation only, pads are inert, both eviction modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentsleep.errors import ConfigError, InvalidInput, SnapshotMismatch, WindowOverflow
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.model.layers import apply_rope, rope_cos_sin
from agentsleep.model.ops import gated_delta_rule_reference
from tests.model.equivalence import three_ways

V = 9  # toy vocabulary: 0..6 content, 7 = BOS, 8 = PAD
BOS, PAD = 7, 8


def make(eviction: str = "hard", bos: int | None = BOS, layout: str = "agag", window: int = 6, **kw) -> SleepHybrid:
    cfg = HybridConfig(
        vocab_size=V, d_model=64, layout=layout, window=window, eviction=eviction, bos_token_id=bos,
        pad_token_id=PAD, gdn_heads=1, **kw,
    )  # fmt: skip
    m = SleepHybrid(cfg).double().eval()
    with torch.no_grad():  # make S matter: slow forgetting and a strong GDN read-out (spec/vllm-cpu.md §8.7 lesson)
        for b in m.layers:
            if b.kind == "g":
                b.linear_attn.A_log.fill_(-3.0)
                b.linear_attn.out_proj.weight.mul_(8.0)
    return m


def toks(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ an independent flat "plain hybrid"


def flat_hybrid_logits(m: SleepHybrid, tokens: torch.Tensor) -> torch.Tensor:
    """One pass over the flat sequence: block-diagonal (hard) or banded (sliding) causal mask, one uninterrupted GDN
    scan, the short conv restarted at every window, window-local (hard) or global (sliding) RoPE positions.

    Written from the paper's definition with the model's weights, not with the model's window code.
    Returns logits per flat slot [B, slots, V] and the slot index of every input token.
    """
    cfg = m.config
    L = cfg.window
    B, T = tokens.shape
    pieces, win_id, pos, tok_slot = [], [], [], []
    slot = 0
    for w, s in enumerate(range(0, T, L)):
        chunk = tokens[:, s : s + L]
        bos_here = cfg.bos_token_id is not None and (cfg.eviction == "hard" or w == 0)
        if bos_here:
            pieces.append(torch.full((B, 1), cfg.bos_token_id))
        pieces.append(chunk)
        n = chunk.shape[1] + int(bos_here)
        win_id += [w] * n
        pos += list(range(n)) if cfg.eviction == "hard" else list(range(slot, slot + n))
        tok_slot += list(range(slot + int(bos_here), slot + n))
        slot += n
    ids = torch.cat(pieces, 1)
    S = ids.shape[1]
    win = torch.tensor(win_id)
    positions = torch.tensor(pos)
    qi, kj = torch.arange(S)[:, None], torch.arange(S)[None, :]
    if cfg.eviction == "hard":
        mask = (kj <= qi) & (win[:, None] == win[None, :])
    else:
        mask = (kj <= qi) & (qi - kj < L)
    h = m.embed_tokens(ids)
    for blk in m.layers:
        x = blk.input_layernorm(h)
        if blk.kind == "a":
            a = blk.self_attn
            q = a.q_proj(x).view(B, S, a.n_heads, a.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(B, S, a.n_kv, a.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(B, S, a.n_kv, a.head_dim).transpose(1, 2)
            q, k = a.q_norm(q), a.k_norm(k)
            cos, sin = rope_cos_sin(positions, a.head_dim, a.theta, torch.float64)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, S, -1)
            y = a.o_proj(y)
        else:
            g_ = blk.linear_attn
            qq, kk, vv, z, b, aa = g_.split_projections(x)
            mixed = torch.cat([qq.reshape(B, S, -1), kk.reshape(B, S, -1), vv.reshape(B, S, -1)], -1)  # [B, S, C]
            w = g_.conv1d.weight[:, 0]  # [C, K]: tap K-1 multiplies the current token
            conv = torch.zeros_like(mixed)
            Kc = w.shape[1]
            for j in range(Kc):  # tap j looks j tokens back, only inside the same window
                shifted = F.pad(mixed, (0, 0, j, 0))[:, :S]
                same = torch.zeros(S, dtype=torch.bool)
                same[j:] = win[j:] == win[: S - j]
                conv = conv + shifted * w[:, Kc - 1 - j] * same[None, :, None]
            mixed = F.silu(conv)
            q_, k_, v_ = mixed.split([g_.key_dim, g_.key_dim, g_.value_dim], -1)
            q_ = F.normalize(q_.reshape(B, S, g_.h_k, g_.d_k), dim=-1) * g_.d_k**-0.5
            k_ = F.normalize(k_.reshape(B, S, g_.h_k, g_.d_k), dim=-1)
            beta = b.sigmoid()
            gg = -g_.A_log.exp() * F.softplus(aa + g_.dt_bias)
            o, _ = gated_delta_rule_reference(q_, k_, v_.reshape(B, S, g_.h_v, g_.d_v), g=gg, beta=beta)
            y = g_.out_proj(g_.norm(o, z).reshape(B, S, -1))
        h = h + y
        h = h + blk.mlp(blk.post_attention_layernorm(h))
    return m.logits(h), torch.tensor(tok_slot)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("bos", [BOS, None], ids=["bos", "nobos"])
def test_n1_equals_plain_hybrid_to_float64_precision(eviction, bos):
    m = make(eviction, bos)
    tokens = toks(2, 22)  # 4 windows of 6, the last one partial
    mask = torch.zeros_like(tokens)
    mask[:, 19:] = 1  # the last window is the prediction window
    with torch.no_grad():
        aligned, _ = m(tokens, mask, passes=1)
        flat, slot = flat_hybrid_logits(m, tokens)
    # the flat model's slot i predicts the token in slot i+1: compare the prediction windows' targets 19..21
    for t in (19, 20, 21):
        src = slot[t] - 1
        if bos is None and t % m.config.window == 0:
            continue
        assert (aligned[:, t] - flat[:, src]).abs().max().item() <= 1e-9


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_window_api_equals_algorithm1_and_decoding_equals_parallel(eviction):
    m = make(eviction)
    aligned, chunk_logits, step, st, st2 = three_ways(m, toks(2, 20, seed=1))
    assert torch.allclose(chunk_logits[:, 0], aligned[:, 19], atol=1e-10)
    assert torch.allclose(step, chunk_logits, atol=1e-9)
    for a, b in zip(st.ssm, st2.ssm):
        assert torch.allclose(a, b, atol=1e-10)


def test_s_is_the_only_carrier():
    m = make()
    a, b = toks(1, 6, seed=2), toks(1, 6, seed=3)
    q = toks(1, 4, seed=4)
    with torch.no_grad():
        s_a = m.sleep(a, m.init_state(), 2)
        s_b = m.sleep(b, m.init_state(), 2)
        la, _ = m.forward_chunk(q, s_a)
        lb, _ = m.forward_chunk(q, s_b)
        assert not torch.allclose(la, lb), "the content of an earlier window must reach later logits"
        # hand window b's state to window a's successor: everything else about window a is gone
        transplanted = s_b.clone()
        transplanted.fingerprint = s_a.fingerprint
        lt, _ = m.forward_chunk(q, transplanted)
        assert torch.equal(lt, lb)
        perturbed = s_a.clone()
        perturbed.ssm[0] += 0.05 * torch.randn_like(perturbed.ssm[0])
        lp, _ = m.forward_chunk(q, perturbed)
        assert not torch.allclose(lp, la)
        # the KV cache is empty at every window start under hard eviction (invariant 3)
        cache = m.start_window(s_a)
        for st in cache.layers:
            if st.kv is not None:
                assert st.kv[0].shape[2] == 1  # only this window's BOS
        # the cache never holds more than the window (+ BOS)
        for _ in range(6):
            m.extend(cache, q[:, :1])
        assert max(st.kv[0].shape[2] for st in cache.layers if st.kv is not None) == 7
        with pytest.raises(WindowOverflow):
            m.extend(cache, q[:, :1])


def test_more_passes_change_consolidation_only():
    m = make()
    ctx, q = toks(1, 12, seed=5), toks(1, 3, seed=6)
    with torch.no_grad():
        logits = {}
        for n in (1, 4):
            st = m.init_state()
            for s in range(0, 12, 6):
                st = m.sleep(ctx[:, s : s + 6], st, n)
            cache = m.start_window(st)
            calls = 0

            def count(*_):
                nonlocal calls
                calls += 1

            hook = m.layers[0].register_forward_hook(count)
            logits[n] = torch.cat([m.extend(cache, q[:, i : i + 1]) for i in range(3)], 1)
            hook.remove()
            assert calls == 3, "wake decoding runs exactly one pass per answer token, whatever N"
    assert not torch.allclose(logits[1], logits[4])


def test_n_equals_1_forward_is_not_changed_by_config_passes():
    m1, m4 = make(passes=1), make(passes=4)
    m4.load_state_dict(m1.state_dict())
    tokens = toks(2, 18, seed=7)
    mask = torch.zeros_like(tokens)
    mask[:, 13:] = 1
    with torch.no_grad():
        a, la = m1(tokens, mask, passes=1)
        b, lb = m4(tokens, mask, passes=1)
        _, l4 = m4(tokens, mask)  # config default N=4
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(la, l4)


def test_all_padding_windows_are_inert():
    m = make()
    real = toks(2, 6, seed=8)
    with torch.no_grad():
        s0 = m.sleep(real, m.init_state(2), 2)
        s1 = m.sleep(torch.full((2, 6), PAD), s0, 3)  # a left-padded sequence's leading windows
        assert all(torch.equal(a, b) for a, b in zip(s0.ssm, s1.ssm))
        # a padded key is invisible: changing the padded token's id does not matter (it is always PAD),
        # and padding in the middle leaves the other rows alone
        mixed = real.clone()
        mixed[0, 2] = PAD
        sm = m.sleep(mixed, m.init_state(2), 2)
        assert torch.allclose(sm.ssm[0][1], s0.ssm[0][1]) and not torch.allclose(sm.ssm[0][0], s0.ssm[0][0])


def test_gradients_reach_the_first_window_through_every_pass():
    m = make().float().train()
    tokens = toks(2, 15, seed=9)
    mask = torch.zeros_like(tokens)
    mask[:, 13:] = 1
    first_only = 0  # token id that appears only in the first window
    tokens[:, :6] = first_only
    tokens[:, 6:] = torch.where(tokens[:, 6:] == first_only, 1, tokens[:, 6:])
    _, loss = m(tokens, mask, passes=3)
    loss.backward()
    assert m.embed_tokens.weight.grad[first_only].abs().sum() > 0, "full BPTT through S (paper.md A26)"


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    m = make().float().train()
    tokens = toks(2, 15, seed=10)
    mask = torch.zeros_like(tokens)
    mask[:, 13:] = 1
    _, l1 = m(tokens, mask, passes=3)
    g1 = torch.autograd.grad(l1, list(m.parameters()), allow_unused=True)
    _, l2 = m(tokens, mask, passes=3, use_checkpoint=True)
    g2 = torch.autograd.grad(l2, list(m.parameters()), allow_unused=True)
    assert torch.allclose(l1, l2)
    for a, b in zip(g1, g2):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)


def test_sliding_state_carries_last_window_keys_and_hard_does_not():
    hard, sliding = make("hard"), make("sliding")
    with torch.no_grad():
        sh = hard.sleep(toks(1, 6), hard.init_state(), 2)
        ss = sliding.sleep(toks(1, 6), sliding.init_state(), 2)
    assert sh.kv == [] and sh.kv_valid is None
    assert all(k.shape[2] == 5 for k, _ in ss.kv) and ss.kv_valid.shape == (1, 5)  # L-1 retained tokens


def test_bad_inputs_and_configs():
    m = make()
    with pytest.raises(WindowOverflow):
        m.forward_chunk(toks(1, 7), m.init_state())
    with pytest.raises(InvalidInput):
        m(toks(1, 6), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(InvalidInput, match="no predictable target"):
        m(toks(1, 6), torch.zeros(1, 6, dtype=torch.long))
    other = make()
    with pytest.raises(SnapshotMismatch):
        m.check_state(other.init_state())
    with pytest.raises(ConfigError, match="GDN head sizes"):
        HybridConfig(vocab_size=5, gdn_head_dim=32)
    with pytest.raises(ConfigError, match="attn_head_dim"):
        HybridConfig(vocab_size=5, d_model=64, attn_heads=4)
    with pytest.raises(ConfigError, match="layout"):
        HybridConfig(vocab_size=5, layout="axg")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        HybridConfig(vocab_size=5, bos_token_id=5)
