"""The fingerprint rules (agentsleep.model.fingerprint, docs/store.md "Fingerprints"): v2 covers exactly what changes
the computation, a field at its default changes nothing, v1 is reproduced for every 0.1.0 model, and one comparison
(`accepts`) decides everywhere — FastWeights, checkpoints, engines, the store."""

from __future__ import annotations

import copy
import json
import math
import pickle
import random
import struct
from pathlib import Path

import pydantic_core
import pytest
import torch

from agentsleep.errors import CheckpointError, SnapshotMismatch
from agentsleep.model.checkpoint import CONFIG_FILE
from agentsleep.model.fingerprint import (
    CURRENT_RULE,
    NOT_COMPUTATIONAL,
    V1_FIELDS,
    Fingerprint,
    accepted,
    accepts,
    canonical_config,
    checkpoint_fingerprint,
    fingerprint_of,
    json_float,
    mismatch,
    recorded_fingerprint,
    rule_of,
)
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.model.state import FastWeights
from agentsleep.runtime import AgentMemory, TorchEngine
from agentsleep.store import SnapshotStore
from agentsleep.store.jobs import sleep_queue

from .helpers import CHECKPOINTS, V2, expected, model

BASE = dict(vocab_size=32, d_model=64, layout="ga", gdn_head_dim=64, intermediate_size=64, window=8, bos_token_id=1)
# Another valid value for every field of today's HybridConfig: each must change v2 unless it is NOT_COMPUTATIONAL.
ALT = {
    "vocab_size": 33, "d_model": 128, "layout": "ag", "attn_heads": 1, "attn_kv_heads": 1, "attn_head_dim": 64,
    "gdn_heads": 2, "gdn_v_heads": 2, "gdn_head_dim": 128, "gdn_v_head_dim": 128, "conv_size": 3,
    "intermediate_size": 96, "window": 9, "eviction": "sliding", "passes": 2, "rope_theta": 5e5, "norm_eps": 1e-5,
    "qk_norm": False, "bos_token_id": 2, "pad_token_id": 0, "tie_embeddings": True, "init_std": 0.05,
}  # fmt: skip
TENSORS = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 3.0, "b": torch.ones(5)}


def _tiny(seed: int = 0, **overrides: object) -> SleepHybrid:
    torch.manual_seed(seed)
    return SleepHybrid(HybridConfig(**{**BASE, **overrides})).eval()


def _with_weights_of(src: SleepHybrid, **overrides: object) -> SleepHybrid:
    m = SleepHybrid(HybridConfig(**{**src.config.model_dump(), **overrides})).eval()
    m.load_state_dict(src.state_dict())
    m.refresh_fingerprint()
    return m


def _logits(m: SleepHybrid) -> torch.Tensor:
    """Algorithm 1 over three windows: a label-free one (slept with N passes), then two scored ones."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, 32, (2, 22), generator=g)
    mask = torch.zeros_like(tokens)
    mask[:, 8:] = 1
    with torch.no_grad():
        return m(tokens, mask)[0]


# ---------------------------------------------------------------------------------------------------- the recipes


def test_every_field_that_changes_the_computation_changes_v2_and_no_other_does() -> None:
    assert set(ALT) == set(V1_FIELDS) <= set(HybridConfig.model_fields)
    base = fingerprint_of(HybridConfig(**BASE), TENSORS)
    for name, value in ALT.items():
        fp = fingerprint_of(HybridConfig(**{**BASE, name: value}), TENSORS)
        if name in NOT_COMPUTATIONAL:
            assert fp == base and fp.aliases != base.aliases, name  # v1 hashed every field; v2 leaves it out
        else:
            assert fp != base, name


@pytest.mark.parametrize(
    ("field", "value"), [("window", 6), ("passes", 3), ("eviction", "sliding"), ("rope_theta", 50.0), ("norm_eps", 0.5)]
)
def test_computational_fields_change_the_outputs_of_the_same_weights(field: str, value: object) -> None:
    a = _tiny()
    b = _with_weights_of(a, **{field: value})
    assert not torch.allclose(_logits(a), _logits(b))
    assert a.fingerprint != b.fingerprint


def test_non_computational_fields_leave_outputs_and_v2_alone() -> None:
    a = _tiny()
    b = _with_weights_of(a, init_std=0.5)
    assert torch.equal(_logits(a), _logits(b)) and a.fingerprint == b.fingerprint
    with torch.no_grad():
        a.lm_head.weight.copy_(a.embed_tokens.weight)  # untied, equal numbers
    a.refresh_fingerprint()
    tied = _with_weights_of(a, tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert torch.equal(_logits(a), _logits(tied)) and a.fingerprint == tied.fingerprint
    assert a.fingerprint.aliases != tied.fingerprint.aliases  # v1 hashed it


def test_every_weight_counts_and_dict_order_does_not() -> None:
    m = _tiny()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    base = fingerprint_of(m.config, sd)
    assert fingerprint_of(m.config, dict(reversed(list(sd.items())))) == base
    for name in sd:
        bumped = dict(sd)
        bumped[name] = sd[name].clone().flatten()
        bumped[name][0] += 1.0
        bumped[name] = bumped[name].reshape(sd[name].shape)
        assert fingerprint_of(m.config, bumped) != base, name
    renamed = {("x." + k if k == "norm.weight" else k): v for k, v in sd.items()}
    assert fingerprint_of(m.config, renamed) != base
    reshaped = {**sd, "norm.weight": sd["norm.weight"].reshape(1, -1)}
    assert fingerprint_of(m.config, reshaped) != base


def test_a_field_at_its_default_is_left_out_so_new_fields_change_nothing() -> None:
    implicit, explicit = HybridConfig(**BASE), HybridConfig(**BASE, rope_theta=10000.0, passes=1, qk_norm=True)
    assert canonical_config(implicit) == canonical_config(explicit)
    assert "rope_theta" not in canonical_config(implicit) and "init_std" not in canonical_config(implicit)
    assert fingerprint_of(implicit, TENSORS) == fingerprint_of(explicit, TENSORS)

    class Later(HybridConfig):  # what a later release does: new fields with neutral defaults
        loop: tuple[int, int] | None = None
        insert_memory: tuple[int, ...] = ()

    now = fingerprint_of(HybridConfig(**BASE), TENSORS)
    later = fingerprint_of(Later(**BASE), TENSORS)
    assert later == now and later.aliases == now.aliases
    looped = fingerprint_of(Later(**BASE, loop=(0, 1)), TENSORS)
    assert looped != now and looped.aliases == ()  # 0.1.0 had no loops: no v1 identity
    assert fingerprint_of(Later(**BASE, insert_memory=(0,)), TENSORS) not in (now, looped)


def test_fingerprint_strings_carry_their_rule() -> None:
    fp = fingerprint_of(HybridConfig(**BASE), TENSORS)
    assert fp.startswith(f"{CURRENT_RULE}:") and len(fp) == 35 and rule_of(fp) == "v2"
    assert rule_of(fp.aliases[0]) == "v1" and rule_of("v7:abc") == "v7" and rule_of("toy-abc") == "unknown"


# ---------------------------------------------------------------------------------------------------- v1 frozen


def test_v1_json_float_format_is_pydantic_cores() -> None:
    """0.1.0 hashed ``model_dump_json()``; its floats are pydantic-core's (ryu digits, Python-like exponents), not
    Python's ``repr``. The fixture's 41 recorded configs pin it too (test_v0_1_0). Subnormal floats are left out:
    their ``repr`` depends on the FPU's flush-to-zero mode (tests run with ``torch.set_flush_denormal(True)``), and
    no config holds one."""
    table = [(1e-6, "1e-6"), (1e-5, "0.00001"), (1.5e-5, "0.000015"), (0.02, "0.02"), (10000.0, "10000.0"),
             (1e15, "1000000000000000.0"), (1e16, "1e+16"), (1.5e20, "1.5e+20"), (3e-300, "3e-300"), (-2.5, "-2.5"),
             (0.0, "0.0"), (-0.0, "-0.0"), (math.inf, "null")]  # fmt: skip
    assert [(x, json_float(x)) for x, _ in table] == table
    rng = random.Random(0)
    for _ in range(20000):
        bits = rng.getrandbits(64)
        x = struct.unpack("<d", struct.pack("<Q", bits))[0]
        if math.isfinite(x) and (bits >> 52) & 0x7FF:  # a zero exponent field: subnormal (or zero)
            assert json_float(x) == pydantic_core.to_json(x).decode(), repr(x)
        y = rng.uniform(-1, 1) * 10 ** rng.randint(-25, 25)
        assert json_float(y) == pydantic_core.to_json(y).decode(), repr(y)


def test_v1_json_is_the_0_1_0_dump_for_every_recorded_config() -> None:
    from agentsleep.model.fingerprint import _v1_json

    for case in expected()["fingerprint_cases"]:
        assert _v1_json(HybridConfig(**case["config"])) == case["config_json"]


# ---------------------------------------------------------------------------------------------------- the type


def test_fingerprint_is_a_str_that_keeps_its_aliases() -> None:
    fp = model("hard").fingerprint
    assert isinstance(fp, str) and fp == V2["hard"] and hash(fp) == hash(V2["hard"]) and str(fp) == V2["hard"]
    assert json.dumps({"f": fp}) == json.dumps({"f": V2["hard"]}) and type(str(fp)) is str
    for twin in (pickle.loads(pickle.dumps(fp)), copy.deepcopy(fp), copy.copy(fp)):
        assert twin == fp and twin.aliases == fp.aliases
    assert accepted(fp) == (V2["hard"], expected()["checkpoints"]["hard"]["fingerprint"])
    assert accepted("plain") == ("plain",) and accepts("plain", "plain") and not accepts("plain", "other")
    assert Fingerprint("v2:x", ["v2:x", "a", "a"]).aliases == ("a",)


def test_mismatch_names_both_rules_and_what_to_do() -> None:
    fp = model("hard").fingerprint
    other_v1 = "0" * 32
    for actual, words in [
        (other_v1, "compute different things"),
        ("v2:" + "0" * 32, "compute different things"),
        ("v9:" + "0" * 32, "upgrade agentsleep"),
        ("toy", "compute different things"),
    ]:
        err = mismatch(fp, actual, "snapshot s1")
        assert type(err) is SnapshotMismatch
        msg = str(err)
        assert actual in msg and fp in msg and fp.aliases[0] in msg and words in msg, msg
        assert f"(rule {rule_of(actual)})" in msg and "(rule v2)" in msg and "(rule v1)" in msg
    assert "no v1 fingerprint" in str(mismatch(Fingerprint("v2:" + "1" * 32), other_v1, "agent 'a'"))
    assert "older rule" in str(mismatch(other_v1, fp, "snapshot s1"))


# ---------------------------------------------------------------------------------------------------- everywhere


def _v1_tagged(m: SleepHybrid, seed: int = 0) -> FastWeights:
    g = torch.Generator().manual_seed(seed)
    ssm = [torch.randn(s.shape, generator=g) for s in m.init_state(1).ssm]
    return FastWeights(ssm=ssm, fingerprint=m.fingerprint.aliases[0])


def test_fast_weights_accept_legacy_tags_and_come_back_current() -> None:
    m = model("hard")
    old = _v1_tagged(m)
    back = FastWeights.from_bytes(old.to_bytes(), fingerprint=m.fingerprint)
    assert back.fingerprint is m.fingerprint and back.digest() == old.digest()
    assert FastWeights.from_bytes(old.to_bytes()).fingerprint == old.fingerprint  # without a model: as stored
    with pytest.raises(SnapshotMismatch, match="made by model"):
        FastWeights.from_bytes(old.to_bytes(), fingerprint=model("sliding").fingerprint)
    both = FastWeights.stack([old, m.init_state(1)])
    assert both.fingerprint is m.fingerprint and both.batch_size == 2
    with pytest.raises(SnapshotMismatch, match="different models"):
        FastWeights.stack([old, _v1_tagged(model("hard")), FastWeights(ssm=list(old.ssm), fingerprint="other")])


def test_engines_adopt_a_legacy_state_as_their_models() -> None:
    m = model("hard")
    old = _v1_tagged(m)
    m.check_state(old)
    adopted = m.adopt_state(old)
    assert adopted.fingerprint is m.fingerprint and adopted.ssm[0] is old.ssm[0] and old.fingerprint != m.fingerprint
    engine = TorchEngine(m)
    engine.import_state("a", AgentMemory(state=old, window=(5, 6)))
    assert engine.export_state("a").state.fingerprint == m.fingerprint
    with pytest.raises(SnapshotMismatch):
        m.check_state(FastWeights(ssm=list(old.ssm), fingerprint="1" * 32))


def test_checkpoints_record_v2_and_aliases_and_0_1_0_ones_still_load(tmp_path: Path) -> None:
    m = model("hard")
    assert json.loads((CHECKPOINTS / "hard" / CONFIG_FILE).read_text())["fingerprint"] == m.fingerprint.aliases[0]
    assert recorded_fingerprint(json.loads((CHECKPOINTS / "hard" / CONFIG_FILE).read_text())) is None
    m.save_pretrained(tmp_path / "ck")
    raw = json.loads((tmp_path / "ck" / CONFIG_FILE).read_text())
    assert raw["fingerprint"] == V2["hard"] and raw["fingerprint_aliases"] == list(m.fingerprint.aliases)
    rec = recorded_fingerprint(raw)
    assert rec == m.fingerprint and rec.aliases == m.fingerprint.aliases
    assert recorded_fingerprint(type("HF", (), raw)()) == m.fingerprint  # attribute access (vLLM's HF config)
    assert checkpoint_fingerprint(tmp_path / "ck") == m.fingerprint
    assert SleepHybrid.from_pretrained(tmp_path / "ck").fingerprints == m.fingerprints
    for key, bad in [("fingerprint", "v2:" + "0" * 32), ("fingerprint", "0" * 32), ("fingerprint_aliases", ["0" * 32])]:
        (tmp_path / "ck" / CONFIG_FILE).write_text(json.dumps({**raw, key: bad}))
        with pytest.raises(CheckpointError, match="re-save"):
            SleepHybrid.from_pretrained(tmp_path / "ck")


def test_store_accepts_aliases_and_refuses_other_models_with_a_typed_error(tmp_path: Path) -> None:
    m = model("hard")
    with SnapshotStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        rec = store.save("a", _v1_tagged(m), [3, 4])  # what 0.1.0 would have written
        assert store.agent("a").fingerprint == m.fingerprint.aliases[0]
        loaded = store.load(rec.id, fingerprint=m.fingerprint)
        assert loaded.record.fingerprint == m.fingerprint.aliases[0] and loaded.state.fingerprint is m.fingerprint
        with pytest.raises(SnapshotMismatch, match="rule v1"):
            store.latest("a", fingerprint=model("sliding").fingerprint)
        with pytest.raises(SnapshotMismatch):  # another model's state for this agent
            store.save("a", FastWeights(ssm=list(loaded.state.ssm), fingerprint=model("sliding").fingerprint))
        store.save("a", loaded.state, [5])  # the same model under the current rule: the agent moves to it
        assert store.agent("a").fingerprint == m.fingerprint
        with pytest.raises(SnapshotMismatch, match="older rule"):  # a bare legacy string cannot know
            store.save("a", _v1_tagged(m))
        # exported by 0.1.0, imported now: a new agent keeps the tag it was made with and revives all the same
        store.import_snapshot(store.export_snapshot(rec.id), agent_id="b")
        assert store.agent("b").fingerprint == m.fingerprint.aliases[0]
        engine = TorchEngine(m)
        assert engine.revive("b", store).window == (3, 4)
    # Sleep jobs are queued under the agent row's tag (the v1 one until the next save): a worker of the model listens
    # on the queue of every fingerprint it answers to, a worker of another model on none of them.
    queues = {sleep_queue(fp) for fp in accepted(m.fingerprint)}
    assert sleep_queue(m.fingerprint.aliases[0]) in queues and sleep_queue(str(m.fingerprint)) in queues
    assert not queues & {sleep_queue(fp) for fp in accepted(model("sliding").fingerprint)}
