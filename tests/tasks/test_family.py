"""The `family` task: answers and hop counts re-derived from the rendered English by an independent solver; windows
re-derived from the runtime's own `SleepPolicy`; seeds, dedup, scoring through reasoning-gym; the tokenizer."""

from __future__ import annotations

import itertools
import re
from collections import Counter, deque

import numpy as np
import pytest
from tokenizers import Tokenizer

from agentsleep.errors import InvalidInput
from agentsleep.memory.policy import SleepPolicy
from agentsleep.tasks import family as fam
from agentsleep.tasks import get_task
from agentsleep.tasks.base import EOS, PAD
from agentsleep.tasks.english import CHATTER
from agentsleep.tasks.family import FamilyConfig

pytest.importorskip("reasoning_gym")

MARRIED = re.compile(r"^(\w+) is married to (\w+)\.$")
CHILDREN = re.compile(r"^They have (?:a child|children) called (.+)\.$")
QUESTION = re.compile(r"^(?:What is|How is|What relation is) (\w+) (?:related )?to (\w+)\?$")


def solve(messages: list[str], question: str, male: set[str]) -> tuple[str, int]:
    """Relation of person1 to person2 (reasoning-gym's rules, rewritten from its docs) and the shortest path between
    them over the married-to and parent-of edges the story states."""
    spouse: dict[str, str] = {}
    parents: dict[str, set[str]] = {}
    last: tuple[str, str] | None = None
    for s in messages:
        if s in CHATTER:
            continue
        if m := MARRIED.match(s):
            a, b = m.groups()
            spouse[a], spouse[b] = b, a
            last = (a, b)
        else:
            m = CHILDREN.match(s)
            assert m and last, s
            for c in re.split(r", | and ", m.group(1)):
                parents[c] = set(last)
    m = QUESTION.match(question)
    assert m, question
    p1, p2 = m.groups()
    g = p1 in male
    par = lambda x: parents.get(x, set())  # noqa: E731
    grand = lambda x: {gp for p in par(x) for gp in par(p)}  # noqa: E731
    if p1 in par(p2):
        rel = "father" if g else "mother"
    elif p2 in par(p1):
        rel = "son" if g else "daughter"
    elif spouse.get(p1) == p2:
        rel = "husband" if g else "wife"
    elif par(p1) and par(p1) == par(p2):
        rel = "brother" if g else "sister"
    elif p1 in grand(p2):
        rel = "grandfather" if g else "grandmother"
    elif par(p1) & grand(p2):
        rel = "uncle" if g else "aunt"
    elif par(p2) & grand(p1):
        rel = "nephew" if p2 in male else "niece"
    elif p1 in spouse and p2 in par(spouse[p1]):
        rel = "father-in-law" if p2 in male else "mother-in-law"
    else:
        raise AssertionError(f"no relation between {p1} and {p2}")
    edges: dict[str, set[str]] = {}
    for a, b in spouse.items():
        edges.setdefault(a, set()).add(b)
    for c, ps in parents.items():
        for p in ps:
            edges.setdefault(c, set()).add(p)
            edges.setdefault(p, set()).add(c)
    dist, todo = {p1: 0}, deque([p1])
    while todo:
        x = todo.popleft()
        for y in edges.get(x, ()):
            if y not in dist:
                dist[y] = dist[x] + 1
                todo.append(y)
    return rel, dist[p2]


@pytest.mark.parametrize(("size", "names"), [((4, 8), 0), ((9, 11), 0), ((4, 6), 8)])
def test_answers_and_hops_by_independent_solver(size: tuple[int, int], names: int) -> None:
    cfg = FamilyConfig(min_family_size=size[0], max_family_size=size[1], names_per_gender=names, L=24, test_size=0)
    male = set(fam._package_words()[0])
    batch = fam.generate("test", 90, 1, cfg)
    for meta in batch.meta:
        rel, hops = solve([m["text"] for m in meta["messages"]], meta["question"], male)
        assert rel == meta["answer"] == meta["relation"]
        assert hops == meta["k"] == fam.HOPS[rel]
    ks = Counter(m["k"] for m in batch.meta)
    assert ks == Counter(dict.fromkeys(cfg.available_hops, 90 // len(cfg.available_hops)))  # balanced held-out


def test_windows_follow_the_runtime_sleep_policy() -> None:
    """Each window holds the messages an agent with `SleepPolicy` (soft threshold, reply reserve) would hold."""
    for cfg in (FamilyConfig(test_size=0), FamilyConfig(test_size=0, L=24, chatter=5, soft_threshold=0.6)):
        policy = SleepPolicy(window=cfg.window, passes=1, soft_threshold=cfg.soft_threshold)
        batch = fam.generate("train", 40, 3, cfg)
        for i, meta in enumerate(batch.meta):
            ids = [cfg.encode(m["text"]) for m in meta["messages"]]
            windows, cur, w = [], [], 0
            for j, t in enumerate(ids):
                if policy.must_sleep_before(w, len(t) + cfg.reserve):
                    windows.append(cur)
                    cur, w = [], 0
                cur.append(j)
                w += len(t)
                if policy.should_sleep_after_turn(w):
                    windows.append(cur)
                    cur, w = [], 0
            windows += [cur] if cur else []
            assert meta["windows"] == windows
            L = cfg.window
            row = batch.tokens[i, : batch.lengths[i]]
            for wi, group in enumerate(windows):
                body = [t for j in group for t in ids[j]]
                assert row[wi * L : wi * L + len(body)].tolist() == body
                assert (row[wi * L + len(body) : (wi + 1) * L] == cfg.pad_id).all()
            q = row[len(windows) * L :]
            question = cfg.encode(meta["question"])
            answer = [*cfg.encode(meta["answer"]), cfg.eos_id]
            assert q[: len(question) + len(answer)].tolist() == question + answer  # the question opens its window
            assert np.flatnonzero(batch.loss_mask[i]).tolist() == [
                len(windows) * L + len(question) + j for j in range(len(answer))
            ]
            assert meta["n_windows"] == len(windows) + 1 and batch.lengths[i] == (len(windows) + 1) * L


def test_chatter_never_splits_a_couple_from_its_children() -> None:
    cfg = FamilyConfig(chatter=6, test_size=0)
    batch = fam.generate("train", 60, 0, cfg)
    counts = Counter()
    for meta in batch.meta:
        texts = [m["text"] for m in meta["messages"]]
        roles = [m["role"] for m in meta["messages"]]
        counts[roles.count("distractor")] += 1
        assert all((t in CHATTER) == (r == "distractor") for t, r in zip(texts, roles))
        for a, b in itertools.pairwise(texts):
            if b.startswith("They "):
                assert MARRIED.match(a), (a, b)
    assert set(counts) == set(range(7))  # 0..chatter distractors per story


def test_seeds_splits_and_dedup() -> None:
    cfg = FamilyConfig(test_size=200)
    a, b = fam.generate("train", 30, 5, cfg), fam.generate("train", 30, 5, cfg)
    assert np.array_equal(a.tokens, b.tokens) and a.meta == b.meta
    assert fam.generate("train", 10, 5, cfg).meta == a.meta[:10]  # example j does not depend on n
    c = fam.generate("train", 30, 6, cfg)
    assert [m["key"] for m in a.meta] != [m["key"] for m in c.meta]
    test = fam.generate("test", 200, 0, cfg)
    test_keys = {m["key"] for m in test.meta}
    assert len(test_keys) == 200  # no duplicate story in the test set
    for split in ("train", "val"):
        rows = fam.generate(split, 300, 1, cfg)
        assert not test_keys & {m["key"] for m in rows.meta}
    seeds = {m["rg_seed"] for m in a.meta + c.meta + test.meta}
    assert len(seeds) == len(a.meta) + len(c.meta) + len(test.meta)  # one reasoning-gym stream per example


def test_size_knob_fills_more_windows() -> None:
    size = {"min_family_size": 9, "max_family_size": 11, "chatter": 0, "test_size": 0}
    small = fam.generate("train", 80, 0, FamilyConfig(max_family_size=5, chatter=0, test_size=0))
    large = fam.generate("train", 80, 0, FamilyConfig(**size, L=24))
    big = fam.generate("train", 80, 0, FamilyConfig(**size))
    n = lambda b: np.mean([m["n_windows"] for m in b.meta])  # noqa: E731
    assert n(small) < n(large) < n(big)
    assert max(m["family_size"] for m in large.meta) >= 9
    assert n(small) >= 2 and min(m["n_windows"] for m in big.meta) >= 4  # facts in several windows, then the question


def test_score_is_reasoning_gyms() -> None:
    task = get_task("family", test_size=0)
    batch = task.generate("test", 40, 2)
    assert task.score(batch.tokens, batch) == {"exact": 1.0, "exact_k1": 1.0, "exact_k2": 1.0}
    pred = batch.tokens.copy()
    rows = np.flatnonzero(batch.loss_mask.any(1))[:10]
    wrong_rel = task.config.token_index()["uncle"]
    for i in rows[:5]:  # a wrong relation word
        j = np.flatnonzero(batch.loss_mask[i])[0]
        pred[i, j] = wrong_rel if batch.meta[i]["answer"] != "uncle" else task.config.token_index()["aunt"]
    for i in rows[5:]:  # the right word but no <eos>: greedy decoding would go on, so the answer is wrong
        pred[i, np.flatnonzero(batch.loss_mask[i])[1]] = task.config.token_index()["and"]
    scores = task.score(pred, batch)
    assert scores["exact"] == pytest.approx(30 / 40)
    answers = fam.predicted_answers(pred, batch, task.config)
    assert answers[rows[6]] == batch.meta[rows[6]]["answer"] + " and"
    assert fam.score_answer(batch.meta[0]["answer"].upper(), batch.meta[0]["answer"]) == 1.0  # reasoning-gym's rule
    assert fam.score_answer(None, "mother") == 0.0
    with pytest.raises(InvalidInput):
        task.score(batch.tokens[:0], batch.select([]))


def test_tokenizer_reads_and_writes_english(tmp_path) -> None:
    task = get_task("family", test_size=0, names_per_gender=0, max_family_size=8)  # all of reasoning-gym's names
    tok = Tokenizer.from_file(str(task.save_tokenizer(tmp_path)))
    text = "Lily is married to Owen. They have children called Mia, Zoe and Kai. What is Lily to Mia? mother-in-law"
    ids = tok.encode(text).ids
    assert ids == task.config.encode(text)
    assert tok.decode(ids) == text == task.decode(ids)
    assert tok.token_to_id("mother-in-law") is not None  # one word
    assert tok.encode("Lily is married to Bartholomew.").tokens[-2] == "<unk>"  # the model's view of a new name
    with pytest.raises(InvalidInput, match="Bartholomew"):
        task.config.encode("Lily is married to Bartholomew.")
    assert {PAD, EOS, "<unk>", "<bos>"} <= set(tok.get_vocab())
    batch = task.generate("train", 8, 0)
    for meta, row, length in zip(batch.meta, batch.tokens, batch.lengths):
        for m in meta["messages"]:
            assert tok.decode(tok.encode(m["text"]).ids) == m["text"]
        text = tok.decode(row[:length].tolist(), skip_special_tokens=False)
        assert text.count("<pad>") == int((row[:length] == task.pad_id).sum())
        assert tok.encode(text).ids == row[:length].tolist()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        FamilyConfig(min_family_size=2)
    with pytest.raises(ValueError):
        FamilyConfig(min_family_size=7, max_family_size=6)
    with pytest.raises(ValueError):
        FamilyConfig(question_hops=(3,))  # no aunts or uncles in families of at most 8
    with pytest.raises(ValueError):
        FamilyConfig(chatter=len(CHATTER) + 1)
    with pytest.raises(ValueError):
        FamilyConfig(names_per_gender=3)  # 6 names cannot name a family of 8
    cfg = FamilyConfig(min_family_size=9, max_family_size=11, question_hops=(2, 3), L=24, test_size=0)
    assert {m["k"] for m in fam.generate("train", 30, 0, cfg).meta} <= {2, 3}
    assert fam.package_version() == fam.PINNED_VERSION


def test_name_pool_knob() -> None:
    cfg = FamilyConfig(names_per_gender=8, max_family_size=6, test_size=0)
    male, female = cfg.names()
    assert len(male) == len(female) == 8
    batch = fam.generate("train", 40, 0, cfg)
    used = {w for m in batch.meta for w in re.findall(r"[A-Z][a-z]+", m["text"])} - {"They", "What", "How"}
    used -= {w for line in CHATTER for w in re.findall(r"[A-Z][a-z]+", line)}
    assert used <= set(male) | set(female) and len(used) > 8
    assert cfg.vocab_size < FamilyConfig().vocab_size  # names outside the pool are outside the vocabulary
    with pytest.raises(InvalidInput, match=fam._package_words()[0][-1]):
        cfg.encode(f"{fam._package_words()[0][-1]} is married to {female[0]}.")
