"""Grading, intervals and tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agentsleep.episodes.build import depo_episodes, stateful_gsm_episodes
from agentsleep.episodes.harness import Grader
from agentsleep.episodes.report import constant_baseline, markdown_table, paired, score, text_table
from agentsleep.episodes.types import EpisodeOutcome, QuestionOutcome, wilson
from tests.episodes.helpers import depo_task, gsm_task


def test_grade_takes_the_answer_up_to_the_first_stop() -> None:
    cfg = depo_task().config
    ep = depo_episodes(cfg, 1, seed=0)[0]
    right = [list(ep.questions[t.question].expected) if t.question is not None else [] for t in ep.turns]
    assert ep.grade(right) == [True] * 4
    padded = [[*r, cfg.hop_id0] if r else r for r in right]  # anything after the stop is not part of the answer
    assert ep.grade(padded) == [True] * 4
    wrong = [r[:-1] for r in right]  # no stop: an unfinished name
    assert ep.grade(wrong) == [False] * 4
    with pytest.raises(ValueError):
        ep.grade(right[:-1])


def test_wilson_interval() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 10)
    assert hi == pytest.approx(0.2775, abs=1e-4)  # not the Wald interval's degenerate [0, 0]


def _outcome(cond: str, marks: list[tuple[str, bool]], **kw: object) -> EpisodeOutcome:
    qs = [QuestionOutcome(group=g, correct=c, answer="x", expected="y") for g, c in marks]
    return EpisodeOutcome(episode="e", condition=cond, replies=[], questions=qs, **kw)  # type: ignore[arg-type]


def test_score_and_tables() -> None:
    outs = [
        _outcome("A", [("k=1", True), ("k=2", False)], sleeps=3, killed_at=2, revive_equal=True, killed_in_flight=True),
        _outcome("A", [("k=1", True), ("k=2", True)], sleeps=5, killed_at=0, revive_equal=True, killed_in_flight=False),
        _outcome("B", [("k=1", False), ("k=10", False)], sleeps=1),
    ]
    a, b = score(outs)
    assert (a.condition, a.correct, a.questions, a.episodes, a.sleeps) == ("A", 3, 4, 2, 4.0)
    assert a.groups == {"k=1": [2, 2], "k=2": [1, 2]} and (a.kills, a.revive_equal, a.in_flight) == (2, 2, 1)
    assert b.accuracy == 0.0 and b.kills == 0 and math.isnan(b.group_accuracy("k=2")[0])
    md = markdown_table([a, b])
    header = md.splitlines()[0]
    assert header.index("k=2 %") < header.index("k=10 %")  # numeric group order, not lexical
    assert "| A | **75.0** [" in md and "2 (2 / 1)" in md
    assert text_table([a, b])[1][:2] == ["A", "75.0"]


def test_paired_sign_test() -> None:
    def out(cond: str, marks: list[bool], ep: str = "e") -> EpisodeOutcome:
        return _outcome(cond, [("k=1", m) for m in marks]).model_copy(update={"episode": ep})

    outs = [out("A", [True, True, True, False]), out("B", [False, False, True, True]), out("A", [True], "f")]
    outs.append(out("B", [False], "f"))
    assert paired(outs, "A", "B")[:2] == (3, 1) and paired(outs, "B", "A")[:2] == (1, 3)
    assert paired(outs, "A", "B")[2] == pytest.approx(2 * 5 / 16)  # P(X <= 1), X ~ Bin(4, 1/2), two-sided
    assert paired(outs, "A", "A") == (0, 0, 1.0)
    many = [out("A", [True] * 10), out("B", [False] * 10)]
    assert paired(many, "A", "B")[2] == pytest.approx(2 / 2**10)


def test_constant_baseline() -> None:
    eps = depo_episodes(depo_task().config, 5, seed=0)
    best, frac = constant_baseline(eps)
    answers = [q.answer for e in eps for q in e.questions]
    assert answers.count(best) == max(answers.count(a) for a in answers) and frac == answers.count(best) / 20


def test_stateful_gsm_is_scored_by_reasoning_gym(tmp_path: Path) -> None:
    task = gsm_task()
    task.save_tokenizer(tmp_path)
    ep = stateful_gsm_episodes(task.config, size=6, seed=1)[0]
    grader = Grader(tmp_path)
    right = [[] for _ in ep.turns]
    right[-1] = list(ep.questions[0].expected)
    got = grader.grade(ep, right)[0]
    assert got.correct and got.answer == ep.questions[0].answer
    wrong = [[] for _ in ep.turns]
    wrong[-1] = [task.config.token_index()["<eos>"]]  # says nothing: reasoning-gym scores None as 0.0
    assert not grader.grade(ep, wrong)[0].correct
