"""Episode construction: the facts, distractors, questions and answers are what the generators say they are."""

from __future__ import annotations

import numpy as np
import pytest

from agentsleep.episodes.build import (
    default_split,
    depo_episodes,
    gsm_episodes,
    parse_depo_row,
    parse_gsm_reply,
    render_english,
    stateful_gsm_episodes,
)
from agentsleep.episodes.types import Episode
from agentsleep.tasks import depo
from tests.episodes.helpers import depo_task, gsm_task


def _names(ids: tuple[int, ...], mv: int) -> list[tuple[int, ...]]:
    out, cur = [], []
    for t in ids:
        cur.append(t)
        if t > mv:
            out.append(tuple(cur))
            cur = []
    assert not cur, "a turn ends inside a name"
    return out


@pytest.mark.parametrize(("hidden", "decoys"), [(13, 12), (8, 8), (25, 0)])
def test_depo_episode_is_a_hidden_cycle_among_decoys(hidden: int, decoys: int) -> None:
    cfg = depo_task().config
    mv = cfg.mini_vocab
    episodes = depo_episodes(cfg, 12, seed=3, hidden=hidden, decoys=decoys)
    assert len({e.id for e in episodes}) == 12
    for ep in episodes:
        facts = [t for t in ep.turns if t.role == "fact"]
        distractors = [t for t in ep.turns if t.role == "distractor"]
        asks = [t for t in ep.turns if t.role == "question"]
        assert ep.turns[-len(asks) :] == tuple(asks)  # every question after every fact
        assert asks[0].sleep_before and not any(t.sleep_before for t in ep.turns if t is not asks[0])
        edges = {}
        for t in facts:
            names = _names(t.ids, mv)
            assert len(names) % 2 == 0 and 2 <= len(names) <= 6  # one to three whole edges per turn
            edges.update({names[i]: names[i + 1] for i in range(0, len(names), 2)})
        decoy_edges = {}
        for t in distractors:
            names = _names(t.ids, mv)
            decoy_edges.update({names[i]: names[i + 1] for i in range(0, len(names), 2)})
        # Two cycles over disjoint names: the hidden one of `hidden` nodes, the decoy of `decoys` nodes.
        assert len(edges) == hidden and set(edges.values()) == set(edges)
        assert len(decoy_edges) == decoys and set(decoy_edges.values()) == set(decoy_edges)
        assert not set(edges) & set(decoy_edges)
        for cycle in (edges, decoy_edges):
            if cycle:
                node, seen = next(iter(cycle)), set()
                while node not in seen:
                    seen.add(node)
                    node = cycle[node]
                assert len(seen) == len(cycle)  # one cycle, not several
        # Questions: HOP_k start ANS, on hidden nodes; the answer is the k-th successor, a stop id ends it.
        for t in asks:
            q = ep.questions[t.question]
            k = t.ids[0] - cfg.hop_id0 + 1
            assert t.ids[-1] == cfg.ans_id and q.meta["k"] == k and q.group == f"k={k}" and k in cfg.eval_k()
            node = tuple(t.ids[1:-1])
            assert node in edges
            for _ in range(k):
                node = edges[node]
            assert q.expected == node and q.expected[-1] in ep.stop_ids
            assert t.reply == cfg.max_len == ep.reserve
        assert ep.max_tokens <= cfg.seq_len  # hidden + decoys = n_max keeps it within the trained size


def test_default_split_fills_the_node_bound_with_two_real_cycles() -> None:
    assert default_split(25) == (16, 9) and default_split(8) == (5, 3)
    assert default_split(7) == (7, 0)  # 2 decoys cannot form a cycle next to a hidden one of >= 3
    for n_max in range(3, 80):
        hidden, decoys = default_split(n_max)
        assert hidden + decoys == n_max and hidden >= 3 and (decoys == 0 or decoys >= 3)


def test_depo_no_decoys_is_the_generators_test_row() -> None:
    cfg = depo_task().config
    ep = depo_episodes(cfg, 1, seed=5, hidden=cfg.n_max, decoys=0)[0]
    row = depo.generate("test", 1, 5, cfg).tokens[0]
    edges, queries = parse_depo_row(row, cfg)
    sent = [t for turn in ep.turns if turn.role == "fact" for t in turn.ids]
    assert sent == [t for u, v in edges for t in u + v]  # the same edges in the same (shuffled) order
    assert [(q.meta["k"], q.expected) for q in ep.questions] == [(k, a) for k, _, a in queries]


def test_episodes_are_seeded_and_json_round_trips() -> None:
    cfg = depo_task().config
    a, b = depo_episodes(cfg, 3, seed=1), depo_episodes(cfg, 3, seed=1)
    assert a == b and depo_episodes(cfg, 3, seed=2) != a
    assert [Episode.model_validate_json(e.model_dump_json()) for e in a] == a


@pytest.mark.parametrize("position", ["last", "first"])
def test_gsm_episode_carries_the_generators_problem(position: str) -> None:
    task = gsm_task(position)
    cfg = task.config
    episodes = gsm_episodes(cfg, 24, seed=0)
    vocab = cfg.vocab()
    for ep, meta in zip(episodes, task.generate("test", 24, 0).meta):
        texts = [[vocab[i] for i in t.ids] for t in ep.turns]
        if position == "last":
            assert texts[-1][0] == "Q" and texts[-1][-2:] == [";", "A"] and ep.turns[-1].reply > 0
            facts, asked = texts[:-1], texts[-1][1]
        else:
            assert texts[0][0] == "Q" and texts[0][-1] == ";" and texts[-1] == ["A"]
            facts, asked = texts[1:-1], texts[0][1]
        # Solve the statements independently: the expected answer is the asked variable's value.
        defs: dict[str, tuple[str | None, int]] = {}
        for words in facts:
            statements = " ".join(words).split(" ;")[:-1]
            assert 1 <= len(statements) <= 3 and words[-1] == ";"
            for st in statements:
                lhs, eq, *rhs = st.split()
                assert eq == "=" and lhs.startswith("V")
                if rhs[0].startswith("V"):
                    defs[lhs] = (rhs[0], 0 if len(rhs) == 1 else int(rhs[1] + rhs[2]))
                else:
                    defs[lhs] = (None, int("".join(rhs)))

        def value(v: str, defs: dict[str, tuple[str | None, int]] = defs) -> int:
            rhs, amount = defs[v]
            return amount if rhs is None else value(rhs) + amount

        q = ep.questions[0]
        assert value(asked) == int(q.answer) == meta["answer_value"] and q.group == f"op={meta['op']}"
        assert parse_gsm_reply(cfg, q.expected) == q.answer and q.expected[-1] == ep.stop_ids[0]
        assert len(q.expected) <= ep.reserve == ep.turns[-1].reply


def test_stateful_gsm_harness_self_test_and_layout() -> None:
    from agentsleep.tasks.stateful_gsm import StatefulGSM

    cfg = gsm_task().config
    gym = StatefulGSM(size=12, seed=1)
    assert gym.self_test()["passed"]  # answer_value scores 1.0, None scores 0.0 with reasoning-gym's own scorer
    episodes = stateful_gsm_episodes(cfg, size=12, seed=1)
    assert [e.meta["rg_index"] for e in episodes] == gym.indices
    unk = cfg.token_index()["<unk>"]
    for ep in episodes:
        assert ep.meta["version"] == "0.1.25" and ep.meta["seed"] == 1 and ep.meta["indices"] == gym.indices
        last = ep.turns[-1]
        assert last.ids[-1] == cfg.token_index()["A"] and last.reply > 0 and last.question == 0
        assert any(t.sleep_before for t in ep.turns if t.role == "question")  # context evicted before the question
        assert all(len(t.ids) <= cfg.window // 2 + 1 for t in ep.turns)
        ids = [i for t in ep.turns for i in t.ids]
        assert unk in ids and any(cfg.vocab()[i].isdigit() for i in ids)  # words unknown, digits readable


def test_render_english_keeps_digits_and_operators() -> None:
    cfg = gsm_task().config
    vocab = cfg.vocab()
    assert [vocab[i] for i in render_english(cfg, "Tom has 12 apples, 3 - 1 = 2.")] == [
        "<unk>", "<unk>", "1", "2", "<unk>", ",", "3", "-", "1", "=", "2", "<unk>"
    ]  # fmt: skip
    assert np.all(np.array(render_english(cfg, "")) >= 0)
