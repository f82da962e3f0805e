"""FastWeightConnector: restore equals recompute, edited states act exactly as the reference predicts, the header stays
resident per state across turns, sleep copies the state out of vLLM's pages, and bad restores are reported instead of
served."""

from __future__ import annotations

import pytest
import torch

from agentsleep.model.state import FastWeights
from agentsleep.serving.resident import state_key

from .helpers import (
    BOS,
    VOCAB,
    dense_logprobs,
    explained_by_rounding,
    first_divergence,
    make_model,
    noise_state,
    rand_tokens,
    raw_generate,
    ref_forced,
    ref_greedy,
)

pytestmark = pytest.mark.vllm


def _tokens(out) -> list[int]:
    return [int(t) for t in out.outputs[0].token_ids]


def _check_against_reference(engine, reference, S, window: list[int], kv: dict, n: int = 8) -> list[int]:
    out = raw_generate(engine, [BOS, *window], kv, n, logprobs=VOCAB)
    params = out.kv_transfer_params or {}
    assert "error" not in params, params
    got = _tokens(out)
    want, _ = ref_greedy(reference, S, window, n)
    assert explained_by_rounding(got, want, dense_logprobs(out), ref_forced(reference, S, window, got))
    return got


def test_restore_equals_recompute(engine, reference) -> None:
    """A zero state restored into the header, then the window re-run, equals one request over the whole window."""
    W, Q = rand_tokens(10, 21), rand_tokens(6, 22)
    first = raw_generate(engine, [BOS, *W], None, 4)
    window = W + _tokens(first)
    sid = engine.states.save("rc", reference.init_state(1), window, reason="manual").id
    restored = raw_generate(engine, [BOS, *window, *Q], {"agent_id": "rc", "snapshot_id": sid}, 8, logprobs=VOCAB)
    scratch = raw_generate(engine, [BOS, *window, *Q], None, 8, logprobs=VOCAB)  # no connector involved
    assert restored.num_cached_tokens == 1 and scratch.num_cached_tokens == 0
    # The header comes from the float32 reference, vLLM's own BOS from bf16: equal up to rounding, so the tokens
    # agree until a near-tie (in this run: all 8, or a first divergence whose margin rounding explains).
    got, want = _tokens(restored), _tokens(scratch)
    ours, ref = dense_logprobs(restored), dense_logprobs(scratch)
    same = first_divergence(got, want)
    assert (ours[: same + 1] - ref[: same + 1]).abs().nan_to_num(0.0, 0.0, 0.0).max() < 0.35
    assert explained_by_rounding(got, want, ours, ref)
    params = restored.kv_transfer_params
    assert params["restored"] is True and params["restored_from"] == sid
    assert params["state_key"] == state_key(reference.init_state(1))
    assert engine.states.current_id("rc") == sid  # a restore never saves (turns are saved by the server)


def test_zeroed_and_edited_states_act_as_the_reference_predicts(engine, reference) -> None:
    W = rand_tokens(12, 31)
    S = noise_state(reference)
    zero = reference.init_state(1)
    edited = FastWeights(ssm=[S.ssm[0], S.ssm[1] * -1.0], fingerprint=S.fingerprint)  # flip one layer's memory
    outs = {}
    for name, state in (("noise", S), ("zero", zero), ("edited", edited)):
        sid = engine.states.save(f"edit-{name}", state, W, reason="manual").id
        kv = {"agent_id": f"edit-{name}", "snapshot_id": sid}
        outs[name] = _check_against_reference(engine, reference, state, W, kv)
    assert outs["noise"] != outs["zero"] and outs["noise"] != outs["edited"]  # the edit is visible in the output
    assert outs["zero"] == _tokens(raw_generate(engine, [BOS, *W], None, 8))  # a zeroed state is a fresh agent


def test_resident_header_is_keyed_by_the_state_not_the_snapshot(engine, reference) -> None:
    """Turns change the snapshot id but not S: the header computed for one S serves every later turn without a
    store read, and a key naming another state is refused, never served."""
    S = noise_state(reference, seed=3)
    key = state_key(S)
    sid = engine.states.save("chain", S, rand_tokens(4, 40), reason="manual").id
    window = engine.states.load(sid).window
    for hop in range(3):
        Q = rand_tokens(3, 41 + hop)
        # hop 0 loads the snapshot (a miss); later hops name a snapshot id that does not exist: only the resident
        # header (found by the state's content key) can serve them
        kv = {"agent_id": "chain", "snapshot_id": sid if hop == 0 else f"gone-{hop}", "state_key": key}
        got = _check_against_reference(engine, reference, S, [*window, *Q], kv, n=4)
        window = [*window, *Q, *got]
    other = noise_state(reference, seed=4)
    other_sid = engine.states.save("chain-other", other, [5, 6], reason="manual").id
    wrong = raw_generate(engine, [BOS, 5, 6], {"agent_id": "chain-other", "snapshot_id": other_sid,
                                               "state_key": "not-the-key"}, 2)  # fmt: skip
    assert "does not hold the state" in wrong.kv_transfer_params["error"]
    assert wrong.kv_transfer_params["restored"] is False


def test_sleep_copies_the_state_out_of_the_pages(engine, reference) -> None:
    """One pass over the window on vLLM equals the reference's 1-pass sleep up to bf16; a transposed read would not."""
    S = noise_state(reference, seed=5)
    W = rand_tokens(20, 51)
    sid = engine.states.save("sleeper", S, W, reason="manual").id
    kv = {"agent_id": "sleeper", "snapshot_id": sid, "sleep": True, "expect_current": sid}
    out = raw_generate(engine, [BOS, *W], kv, 1)
    assert out.kv_transfer_params["sleep"] == "pending"
    engine.flush()  # offline vLLM stops stepping after the last request; the copy runs in the next step
    slept = engine.states.latest("sleeper")
    assert slept.record.reason == "sleep" and slept.window == [] and slept.record.tokens_consolidated == len(W)
    want = reference.sleep(torch.tensor([W]), S, 1)
    for got, ref in zip(slept.state.ssm, want.ssm):
        scale = ref.abs().max()
        assert (got - ref).abs().max() <= 0.05 * scale
        assert (got.transpose(-1, -2) - ref).abs().max() > 0.2 * scale  # the check can see a layout error
    # the capture's save is a compare-and-set: a sleep computed from a superseded snapshot saves nothing
    stale = raw_generate(engine, [BOS, *W], kv, 1)
    engine.flush()
    assert stale.kv_transfer_params["sleep"] == "pending" and engine.states.current_id("sleeper") == slept.record.id


def test_bad_restores_are_reported_not_served(engine, reference) -> None:
    W = rand_tokens(6, 61)
    unknown = raw_generate(engine, [BOS, *W], {"agent_id": "ghost", "snapshot_id": "nope"}, 2)
    assert "UnknownSnapshot" in unknown.kv_transfer_params["error"]
    no_agent = raw_generate(engine, [BOS, *W], {"agent_id": "ghost"}, 2)
    assert "UnknownAgent" in no_agent.kv_transfer_params["error"]
    alien = make_model(seed=1)  # another model: its snapshot must not be restored into this one
    engine.states.save("alien", FastWeights(ssm=alien.init_state(1).ssm, fingerprint=alien.fingerprint), W,
                       reason="manual")  # fmt: skip
    mismatch = raw_generate(engine, [BOS, *W], {"agent_id": "alien"}, 2)
    assert "SnapshotMismatch" in mismatch.kv_transfer_params["error"]
    assert "snapshot_id" not in mismatch.kv_transfer_params  # nothing was saved from the wrong starting point
    # prompt log-probs make vLLM skip the connector: reported, not silently served from S = 0
    sid = engine.states.save("plp", noise_state(reference), W, reason="manual").id
    plp = raw_generate(engine, [BOS, *W], {"agent_id": "plp", "snapshot_id": sid}, 2, prompt_logprobs=1)
    assert "not restored" in plp.kv_transfer_params["error"]
    bad = raw_generate(engine, [BOS, *W], {"agent_id": "x", "restore": "yes"}, 2)
    assert "restore must be true or false" in bad.kv_transfer_params["error"]
    typo = raw_generate(engine, [BOS, *W], {"agent_id": "x", "snapshotid": "y"}, 2)
    assert "did you mean 'snapshot_id'" in typo.kv_transfer_params["error"]
    assert raw_generate(engine, [BOS, *W], None, 2).kv_transfer_params is None  # stateless requests pass through
