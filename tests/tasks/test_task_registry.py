"""Every task and preset: the spec §0 layout rules, tokenizer round trips, registry, padding helpers."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from agentsleep.errors import InvalidInput
from agentsleep.tasks import Batch, get_task, list_tasks, pack_rows, validate_layout
from agentsleep.tasks.base import SPLIT_IDS, seed_sequence, target_aligned

CASES = [(name, preset) for name, presets in list_tasks().items() for preset in presets]
# GSM dedup needs the test set's cores; keep it small here (its own tests cover the full mechanism).
SMALL = {
    "gsm_symbolic": {"test_size": 16},
    "gsm_zoo": {"test_size": 16},
    "gsm_english": {"test_size": 16},
    "family": {"test_size": 16},
}
VARIABLE = ("gsm", "family")  # variable-length rows, right-padded to whole windows


def small_batch(name: str, preset: str, split: str = "train", seed: int = 0):
    task = get_task(name, preset, **SMALL.get(name, {}))
    n = 4 if name.startswith("gsm") and preset == "paper" else 12  # paper-scale GSM rows are 2,000-3,300 tokens
    return task, task.generate(split, n, seed)


@pytest.mark.parametrize(("name", "preset"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_layout_rules(name: str, preset: str) -> None:
    for split in ("train", "test"):
        task, batch = small_batch(name, preset, split)
        L = task.window
        assert batch.window == L and batch.pad_id == task.pad_id
        assert batch.tokens.dtype == np.int64 and batch.loss_mask.dtype == np.bool_
        assert batch.seq_len <= task.seq_len
        if not name.startswith(VARIABLE):
            assert batch.seq_len == task.seq_len  # fixed layouts
        assert batch.tokens.min() >= 0 and batch.tokens.max() < task.vocab_size
        for row, mask, length in zip(batch.tokens, batch.loss_mask, batch.lengths):
            idx = np.flatnonzero(mask)
            assert len(idx) > 0
            assert not np.any(idx % L == 0), "rule 0.2: a target at a window's position 0"
            assert idx.min() // L == idx.max() // L == (length - 1) // L, "rule 0.3: targets outside the last window"
            assert not np.any(mask[row == task.pad_id]), "rule 0.4: PAD is a target"
            assert task.bos_id not in row, "rule 0.6: generators emit no BOS"
            if name.startswith(VARIABLE):
                assert length % L == 0 and (row[length:] == task.pad_id).all()  # right-padded to whole windows
            else:
                # Rule 0.1: the label-free prefix is whole windows, and every row has the same chunk layout.
                assert length == task.seq_len and idx.min() // L == (task.seq_len - 1) // L
        validate_layout(batch, task.vocab_size)


@pytest.mark.parametrize(("name", "preset"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_tokenizer_round_trip(name: str, preset: str, tmp_path) -> None:
    task, batch = small_batch(name, preset)
    path = task.save_tokenizer(tmp_path / "ckpt")
    assert path.name == "tokenizer.json" and path.exists()
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == task.vocab_size
    assert tok.token_to_id("<pad>") == task.pad_id and tok.token_to_id("<bos>") == task.bos_id
    for row in batch.tokens[:4]:
        ids = row.tolist()
        text = tok.decode(ids, skip_special_tokens=False)
        assert text == task.decode(ids)
        assert tok.encode(text).ids == ids
        assert tok.encode(text, add_special_tokens=False).ids == ids


def test_rule110_text_round_trip(tmp_path) -> None:
    task = get_task("rule110", "toy")
    tok = Tokenizer.from_file(str(task.save_tokenizer(tmp_path / "tokenizer.json")))
    text = "010011101011" * 4 + "Q1011"
    ids = tok.encode(text).ids
    assert len(ids) == task.seq_len and ids[48] == 2
    assert tok.decode(ids) == text
    assert tok.encode("<bos>01<pad>").ids == [task.bos_id, 0, 1, task.pad_id]


def test_documented_ids() -> None:
    r = get_task("rule110", "paper")
    assert (r.vocab_size, r.pad_id, r.bos_id, r.window, r.seq_len) == (5, 3, 4, 24, 101)
    d = get_task("depo", "paper")
    assert (d.vocab_size, d.pad_id, d.bos_id, d.window, d.seq_len) == (120, 0, 118, 75, 360)
    g = get_task("gsm_symbolic", "toy")
    assert (g.vocab_size, g.pad_id, g.bos_id, g.window, g.seq_len) == (149, 0, 1, 64, 320)
    z = get_task("gsm_zoo", "toy")
    assert (z.pad_id, z.bos_id, z.window) == (0, 1, 64)


def test_registry_overrides_and_errors() -> None:
    t = get_task("rule110", "toy", W=16, t=8)
    assert (t.config.width, t.config.steps, t.window, t.seq_len) == (16, 8, 16, 69)
    assert get_task("rule110", "toy", width=20).window == 20
    assert get_task("depo", "toy", K=4).config.hops == 4
    assert "rule110" in t.describe() and "W=16" in t.describe()
    with pytest.raises(InvalidInput):
        get_task("nope")
    with pytest.raises(InvalidInput):
        get_task("rule110", "huge")
    with pytest.raises(InvalidInput):
        get_task("rule110", "toy", bogus=1)
    with pytest.raises(ValueError):  # pydantic validation: 4 labels + Q do not fit a window of 4
        get_task("rule110", "toy", W=4)
    with pytest.raises(ValueError):
        get_task("depo", "toy", M=5)  # 5 queries of up to 6 tokens exceed the 25-token QA block
    with pytest.raises(InvalidInput):
        t.generate("training", 2, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        t.generate("train", 2, -1)
    cfg = t.config
    with pytest.raises(ValueError):
        cfg.width = 3  # type: ignore[misc]  # frozen


def test_split_seed_streams_are_disjoint() -> None:
    states = {
        tuple(seed_sequence(task, split, seed).generate_state(4).tolist())
        for task in (1, 2, 3, 4)
        for split in SPLIT_IDS
        for seed in (0, 1)
    }
    assert len(states) == 4 * 3 * 2


@pytest.mark.parametrize("name", ["rule110", "depo"])
def test_task_score_through_registry(name: str) -> None:
    task = get_task(name, "toy")
    batch = task.generate("test", 50, 0)
    assert task.score(batch.tokens, batch)["exact"] == 1.0
    logits = np.full((*batch.tokens.shape, task.vocab_size), -1.0)
    np.put_along_axis(logits, batch.tokens[..., None], 1.0, axis=2)
    assert task.score(logits, batch)["exact"] == 1.0  # target-aligned logits
    # A model's next-token logits (index i predicts token i + 1), last input position dropped.
    next_token = logits[:, 1:]
    assert task.score(target_aligned(next_token), batch)["exact"] == 1.0
    with pytest.raises(InvalidInput, match="target_aligned"):
        task.score(next_token, batch)


def test_pack_rows_moves_answers_into_the_last_window() -> None:
    L, pad = 8, 0
    # Content of 9 tokens whose 3 targets would sit at 6, 7, 8: straddling the boundary at 8.
    toks = list(range(1, 10))
    mask = [False] * 6 + [True] * 3
    tokens, m, lengths, left = pack_rows([(toks, mask)], L, pad)
    assert lengths.tolist() == [16] and left == [3]
    assert np.flatnonzero(m[0]).tolist() == [9, 10, 11]
    assert tokens[0, :3].tolist() == [pad] * 3 and tokens[0, 12:].tolist() == [pad] * 4
    # A target that would land exactly on a window's position 0 moves to position 1.
    tokens, m, lengths, left = pack_rows([(list(range(1, 10)), [False] * 8 + [True])], L, pad)
    assert left == [1] and np.flatnonzero(m[0]).tolist() == [9]
    # Already fine: right padding only.
    tokens, m, lengths, left = pack_rows([(list(range(1, 12)), [False] * 9 + [True] * 2)], L, pad)
    assert left == [0] and lengths.tolist() == [16]
    with pytest.raises(InvalidInput):
        pack_rows([(list(range(1, 20)), [False] + [True] * 18)], L, pad)  # answer longer than a window


def test_validate_layout_catches_violations() -> None:
    tokens = np.arange(1, 17, dtype=np.int64)[None, :]
    good = np.zeros((1, 16), bool)
    good[0, 13:15] = True
    validate_layout(Batch(tokens, good, [{}], window=8, pad_id=0))
    bad_pos0 = good.copy()
    bad_pos0[0, 8] = True
    with pytest.raises(InvalidInput, match=r"rule 0\.2"):
        validate_layout(Batch(tokens, bad_pos0, [{}], window=8, pad_id=0))
    early = np.zeros((1, 16), bool)
    early[0, 3] = True
    early[0, 13] = True
    with pytest.raises(InvalidInput, match=r"rule 0\.3"):
        validate_layout(Batch(tokens, early, [{}], window=8, pad_id=0))
    padded = tokens.copy()
    padded[0, 13] = 0
    with pytest.raises(InvalidInput, match=r"rule 0\.4"):
        validate_layout(Batch(padded, good, [{}], window=8, pad_id=0))


def test_examples_list_form() -> None:
    task = get_task("gsm_symbolic", "toy", test_size=8)
    batch = task.generate("val", 6, 0)
    for ex, length in zip(batch.examples(), batch.lengths):
        assert set(ex) == {"tokens", "loss_mask", "meta"}
        assert len(ex["tokens"]) == len(ex["loss_mask"]) == length
        assert set(ex["loss_mask"]) == {0, 1}
