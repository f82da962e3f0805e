"""The `gsm_english` task: reasoning-gym's problems split statefully, laid out as the runtime sleeps, scored by
reasoning-gym; numbers as digit tokens that decode back to the number."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from agentsleep.errors import InvalidInput
from agentsleep.memory.policy import SleepPolicy
from agentsleep.tasks import get_task
from agentsleep.tasks import gsm_english as ge
from agentsleep.tasks.english import CHATTER, split_words
from agentsleep.tasks.gsm_english import GSMEnglishConfig
from agentsleep.tasks.stateful_gsm import INSTRUCTION

pytest.importorskip("reasoning_gym")

CFG = GSMEnglishConfig(test_size=20, vocab_sample=600)


def test_rows_are_reasoning_gym_problems_split_statefully() -> None:
    import reasoning_gym

    batch = ge.generate("train", 24, 0, CFG)
    index = CFG.token_index()
    for meta in batch.meta:
        entry = reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=meta["rg_seed"])[0]
        assert meta["answer"] == str(entry["answer"])
        text = entry["question"].removesuffix(INSTRUCTION)
        facts = [m for m in meta["messages"] if m["role"] == "fact"]
        heard = [t for m in facts for t in CFG.encode_lenient(m["text"])] + CFG.encode_lenient(meta["question"])
        assert heard == CFG.encode_lenient(text)  # every word of the problem, in order, nothing else
        assert meta["k"] == len(text.split(". ")) - 1 or meta["k"] >= 1
        assert all(not m["text"].startswith("#") for m in meta["messages"])  # never cut inside a number
        assert meta["n_unk"] == sum(index.get(w) is None for w in split_words(text))


def test_windows_follow_the_runtime_sleep_policy() -> None:
    policy = SleepPolicy(window=CFG.window, passes=1, soft_threshold=CFG.soft_threshold)
    batch = ge.generate("train", 30, 1, CFG)
    L = CFG.window
    for i, meta in enumerate(batch.meta):
        ids = [CFG.encode_lenient(m["text"]) for m in meta["messages"]]
        windows, cur, w = [], [], 0
        for j, t in enumerate(ids):
            if policy.must_sleep_before(w, len(t) + CFG.reserve):
                windows.append(cur)
                cur, w = [], 0
            cur.append(j)
            w += len(t)
            if policy.should_sleep_after_turn(w):
                windows.append(cur)
                cur, w = [], 0
        windows += [cur] if cur else []
        assert meta["windows"] == windows
        row = batch.tokens[i, : batch.lengths[i]]
        q = CFG.encode_lenient(meta["question"])
        assert row[len(windows) * L : len(windows) * L + len(q)].tolist() == q
        answer = [*CFG.encode_lenient(meta["answer"]), CFG.eos_id]
        assert batch.tokens[i][batch.loss_mask[i]].tolist() == answer
    batch.validate(CFG.vocab_size)


def test_numbers_are_digits_that_decode_back(tmp_path) -> None:
    tok = Tokenizer.from_file(str(get_task("gsm_english", test_size=0).save_tokenizer(tmp_path)))
    text = "She bought 125 apples for $3 and 40% of 12.25 kg, so she'll pay 1025."
    enc = tok.encode(text)
    assert enc.tokens[2:5] == ["1", "##2", "##5"]
    assert enc.tokens[enc.tokens.index("of") + 1 :][:5] == ["1", "##2", "##.", "##2", "##5"]
    assert "'ll" in enc.tokens and "<unk>" not in enc.tokens
    assert split_words(text) == enc.tokens
    assert tok.decode(enc.ids).replace("$ 3", "$3") == text


def test_score_is_reasoning_gyms() -> None:
    task = get_task("gsm_english", test_size=20, vocab_sample=600)
    batch = task.generate("test", 20, 0)
    assert task.score(batch.tokens, batch)["exact"] == 1.0
    pred = batch.tokens.copy()
    idx = task.config.token_index()
    for i in range(5):
        first = np.flatnonzero(batch.loss_mask[i])[0]
        pred[i, first] = idx["9"] if batch.meta[i]["answer"][0] != "9" else idx["8"]
    assert task.score(pred, batch)["exact"] == pytest.approx(15 / 20)
    answers = ge.predicted_answers(batch.tokens, batch, task.config)
    assert answers == [m["answer"] for m in batch.meta]
    assert ge.score_answer("12", "12") == 1.0 and ge.score_answer("13", "12") == 0.01
    assert ge.score_answer(None, "12") == 0.0


def test_seeds_dedup_and_chatter() -> None:
    a, b = ge.generate("train", 12, 3, CFG), ge.generate("train", 12, 3, CFG)
    assert np.array_equal(a.tokens, b.tokens)
    test = {m["key"] for m in ge.generate("test", 20, 0, CFG).meta}
    assert len(test) == 20
    assert not test & {m["key"] for m in ge.generate("train", 200, 0, CFG).meta}
    chatty = ge.generate("train", 40, 0, CFG.with_overrides(chatter=3))
    lines = [m["text"] for meta in chatty.meta for m in meta["messages"] if m["role"] == "distractor"]
    assert lines and set(lines) <= set(CHATTER)
    with pytest.raises(InvalidInput, match="Zyxwv"):
        CFG.encode("Zyxwv has 3 apples.")
    with pytest.raises(ValueError):
        GSMEnglishConfig(reserve=40)


@pytest.mark.parametrize("name", ["family", "gsm_english"])
def test_trains_end_to_end_with_its_word_level_tokenizer(name: str, tmp_path) -> None:
    """`agentsleep train`'s loop on an English task: variable-length rows bucketed by window count, the checkpoint
    carries the WordLevel tokenizer, and its eval is reasoning-gym's score."""
    from agentsleep.model.hybrid import SleepHybrid
    from agentsleep.train import TrainConfig, train

    knobs = {"test_size": 8} | ({"vocab_sample": 300} if name == "gsm_english" else {})
    cfg = TrainConfig(task=name, task_overrides=knobs, model={"layout": "ag"}, passes=2, steps=2, batch_size=4,
                      eval_every=0, eval_size=8, final_eval_size=8, save_every=0)  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False)
    assert set(result["eval"]) >= {"exact", "loss"} and 0.0 <= result["eval"]["exact"] <= 1.0
    tok = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
    task = get_task(name, **knobs)
    assert tok.get_vocab() == task.tokenizer().get_vocab()
    assert SleepHybrid.from_pretrained(tmp_path / "run").config.vocab_size == task.vocab_size
