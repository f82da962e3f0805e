"""English episodes (reasoning-gym family stories and stateful GSM): built from the task's test rows, windows equal
to the training layout (so the agent's first answer token is the model-level prediction), kill and revive, grading
by reasoning-gym, transcripts whose sleep points match the session's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from agentsleep.episodes.build import english_episodes, english_score
from agentsleep.episodes.drivers import Condition
from agentsleep.episodes.harness import run_condition
from agentsleep.episodes.suite import find_checkpoints, plan, transcripts
from agentsleep.episodes.transcript import sleep_marks
from agentsleep.errors import InvalidInput
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.tasks import family, get_task
from agentsleep.tasks.english import CHATTER
from tests.episodes.helpers import build_checkpoint, family_task

pytest.importorskip("reasoning_gym")
FACTORY = "agentsleep.episodes.drivers:host_driver"


def test_episodes_are_the_test_rows_as_messages() -> None:
    task = family_task()
    cfg = task.config
    episodes = english_episodes(cfg, 12, seed=0)
    batch = family.generate("test", 12, 0, cfg)
    tok = task.tokenizer()
    for ep, meta in zip(episodes, batch.meta):
        *facts, question = ep.turns
        assert [tok.decode(list(t.ids)) for t in facts] == [m["text"] for m in meta["messages"]]
        assert [t.role for t in facts] == [m["role"] for m in meta["messages"]]
        assert all(t.reply == 0 and not t.sleep_before for t in facts)
        assert question.sleep_before and question.reply == cfg.reserve and question.question == 0
        assert tok.decode(list(question.ids)) == meta["question"]
        (q,) = ep.questions
        assert q.expected == (*cfg.encode(meta["answer"]), cfg.eos_id) and q.answer == meta["answer"]
        assert q.group == f"hops={meta['k']}" and ep.meta["windows"] == meta["windows"]
        assert english_score(ep, meta["answer"]) == 1.0 and english_score(ep, "cousin") == 0.0
    assert {e.questions[0].group for e in episodes} == {"hops=1", "hops=2"}
    assert any(t.role == "distractor" and tok.decode(list(t.ids)) in CHATTER for e in episodes for t in e.turns)
    with pytest.raises(InvalidInput):
        english_episodes(get_task("depo").config, 1)  # type: ignore[arg-type]


def test_gsm_english_episodes() -> None:
    cfg = get_task("gsm_english", test_size=6, vocab_sample=600).config
    episodes = english_episodes(cfg, 6, seed=0)
    for ep in episodes:
        assert ep.kind == "gsm_english" and ep.questions[0].group.startswith("facts=")
        assert ep.turns[-1].sleep_before and ep.reserve == cfg.reserve
        assert english_score(ep, ep.questions[0].answer) == 1.0


def test_agent_windows_are_the_training_windows(tmp_path: Path) -> None:
    """Through the real stack (AgentHost: engine, scheduler, store, kill and revive), each agent's first reply token
    is the model's prediction at the question's last token on the task row it was built from (teacher-forced,
    `SleepHybrid.forward`): the agent consolidated exactly the windows the model is trained on."""
    task = family_task()
    ckpt = build_checkpoint(tmp_path / "ckpt", task, 2, seed=21)
    episodes = english_episodes(task.config, 8, seed=3)
    outs = run_condition(episodes, Condition(name="sleep N=2", checkpoint=str(ckpt)), FACTORY, tmp_path / "run")
    assert all(o.revive_equal and o.killed_at is not None for o in outs)
    batch = task.generate("test", 8, 3)
    model = SleepHybrid.from_pretrained(ckpt).eval()
    for i, (ep, out) in enumerate(zip(episodes, outs)):
        n = int(batch.lengths[i])  # one row at a time: a batch's label window must be the same window for every row
        with torch.no_grad():
            logits, _ = model(
                torch.from_numpy(batch.tokens[i : i + 1, :n]), torch.from_numpy(batch.loss_mask[i : i + 1, :n]), 2
            )
        first_target = int(np.flatnonzero(batch.loss_mask[i])[0])
        assert out.replies[-1][0] == int(logits[0, first_target].argmax())
        assert out.sleeps == len(ep.meta["windows"]) + (1 if sum(len(t.ids) for t in ep.turns[-1:]) >= 13 else 0)


def test_grading_and_transcripts(suite: Path, tmp_path: Path) -> None:
    (block,) = plan(find_checkpoints(suite), ["family"], 3, seed=1)
    names = [c.name for c in block.conditions]
    assert names == ["sleep N=1", "sleep N=2", "window truncation (N=2 weights)", "full attention, whole episode"]
    for cond in block.conditions:
        block.outcomes += run_condition(block.episodes, cond, FACTORY, tmp_path / cond.name.replace(" ", "_"), seed=1)
    tok = Tokenizer.from_file(str(suite / "family-n2" / "tokenizer.json"))
    by_id = {e.id: e for e in block.episodes}
    for o in block.outcomes:
        ep = by_id[o.episode]
        (q,) = o.questions
        body = [t for t in ep.answer_of(o.replies[-1]) if t not in ep.stop_ids]
        assert q.answer == tok.decode(body, skip_special_tokens=False)  # the readable reply
        assert q.correct == (family.score_answer(q.answer, q.expected) == 1.0)  # graded by reasoning-gym
        assert o.revive_equal
        if not o.condition.startswith("full"):
            _, total = sleep_marks(ep, o.replies, 16, 0.8)
            assert total == o.sleeps  # the transcript's sleep points are the session's
        else:
            assert o.sleeps == 0
    lines = transcripts(block, k=2)
    text = "\n".join(lines)
    assert lines[0] == "### Transcripts" and text.count("```text") == 2
    first = block.episodes[0] if block.episodes[0].id in text else block.episodes[1]
    for turn in first.turns:
        assert f"  user: {tok.decode(list(turn.ids))}" in text
    assert "[sleep 1:" in text and "past the soft threshold" in text and "expected answer:" in text
    assert all(f"agent ({n}):" in text for n in names)
