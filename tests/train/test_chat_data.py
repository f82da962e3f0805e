"""Chat fine-tuning data (agentsleep.train.chat_data) on a tiny random Qwen3.5 made with transformers: the
checkpoint's template, loss on assistant tokens only, windows slept exactly as an engine sleeps them, and bad lines
named by their number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from tokenizers import Tokenizer

from agentsleep.cli import main
from agentsleep.errors import InvalidInput
from agentsleep.model.chat_template import ChatFormat
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.train import chat_data
from agentsleep.train.trainer import TrainConfig, train
from tests.model.hf_tiny import make_hf
from tests.runtime.chat_templates import HERMES

pytest.importorskip("transformers")

CONVS = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox?"},
                  {"role": "assistant", "content": "jumps over the lazy dog."},
                  {"role": "user", "content": "Sleep consolidates the window?"},
                  {"role": "assistant", "content": "into fast weights; the agent wakes with a fresh window."}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                      "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "celsius 21"},
                  {"role": "assistant", "content": "21 degrees celsius in Paris."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "qwen35"
    make_hf("qwen3_5_text-gqa2", path, chat_template=HERMES)
    return path


def write_jsonl(path: Path, rows: list, raw: list[str] | None = None) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw or []))
    return path


def test_targets_are_the_assistant_turns_and_nothing_else(qwen: Path, tmp_path: Path) -> None:
    convs = chat_data.load_conversations(write_jsonl(tmp_path / "c.jsonl", CONVS), qwen)
    tok = Tokenizer.from_file(str(qwen / "tokenizer.json"))
    fmt = ChatFormat.from_pretrained(qwen)
    assert fmt is not None
    for conv, row in zip(convs, CONVS):
        text = fmt.render(row["messages"], tools=row.get("tools"))
        assert tok.decode(conv.tokens.tolist(), skip_special_tokens=False) == text  # the engine's ids, unchanged
        learned = tok.decode(conv.tokens[conv.targets].tolist(), skip_special_tokens=False)
        replies = [m for m in row["messages"] if m["role"] == "assistant"]
        for m in replies:
            assert (m["content"] or "get_weather") in learned
        for m in row["messages"]:
            if m["role"] != "assistant":
                assert m["content"] not in learned
        assert learned.count("<|im_end|>") == len(replies)  # every turn ends with its end-of-turn token
        assert not conv.targets[0]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        ('{"msgs": []}', 'non-empty "messages" list'),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "content must"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r</think>b"}, '
            '{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}',
            "renders assistant message 1",
        ),
    ],
    ids=["json", "no-messages", "role", "no-assistant", "content-type", "template-rewrites-history"],
)
def test_bad_lines_are_refused_with_their_line_number(qwen: Path, tmp_path: Path, line: str, why: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", CONVS, ["\n", line + "\n"])  # lines 1-2 fine, 3 blank, 4 bad
    with pytest.raises(InvalidInput, match=f"bad.jsonl:4: .*{why}"):
        chat_data.load_conversations(path, qwen)


def streamed_target_losses(model: SleepHybrid, conv: chat_data.Conversation, passes: int) -> torch.Tensor:
    """What an engine computes: one token at a time through pass 1 (`extend`), sleeping on a full window before the
    next token goes in (`sleep_window`, N passes), the next token scored from the logits before it."""
    L = model.config.window
    cache = model.start_window(model.init_state(1))
    losses = []
    ids = torch.from_numpy(conv.tokens)
    with torch.no_grad():
        for t in range(len(ids) - 1):
            if cache.n_fresh == L:
                cache = model.start_window(model.sleep_window(cache, passes))
            logits = model.extend(cache, ids[None, t : t + 1])[0, -1]
            if conv.targets[t + 1]:
                losses.append(F.cross_entropy(logits[None], ids[None, t + 1]))
    return torch.stack(losses)


@pytest.mark.parametrize("passes", [1, 3])
def test_windows_are_slept_exactly_as_an_engine_sleeps_them(qwen: Path, tmp_path: Path, passes: int) -> None:
    model = SleepHybrid.from_pretrained(qwen, dtype=torch.float64, window=16).eval()
    conv = chat_data.load_conversations(write_jsonl(tmp_path / "c.jsonl", CONVS), qwen)[0]
    assert len(conv) > 4 * 16 and conv.targets[16::16].any()  # several windows; a target opens one of them
    with torch.no_grad():
        total, n = chat_data.conversation_loss(
            model, torch.from_numpy(conv.tokens)[None], torch.from_numpy(conv.targets)[None], passes
        )
    ref = streamed_target_losses(model, conv, passes)
    assert n == len(ref) == int(conv.targets[1:].sum())
    assert abs(float(total) - float(ref.sum())) <= 1e-8 * max(1.0, float(ref.sum()))
    if passes > 1:  # and sleeping changes what later windows predict (the test can tell N apart)
        with torch.no_grad():
            one, _ = chat_data.conversation_loss(
                model, torch.from_numpy(conv.tokens)[None], torch.from_numpy(conv.targets)[None], 1
            )
        assert abs(float(one) - float(total)) > 1e-6


def test_epochs_visit_every_conversation_once() -> None:
    rows = np.concatenate([chat_data.rows_for_step(10, 4, 7, s) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert not np.array_equal(rows[:10], rows[10:])
    assert np.array_equal(chat_data.rows_for_step(10, 4, 7, 3), chat_data.rows_for_step(10, 4, 7, 3))


def test_fine_tuning_learns_saves_a_loadable_checkpoint_and_resumes(qwen: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", CONVS)
    base = dict(init_from=str(qwen), data=str(data), eval_data=str(data), model={"window": 32}, passes=2,
                batch_size=2, eval_every=10, eval_size=2, final_eval_size=2, save_every=10, lr_adamw=3e-3,
                lr_muon=3e-3, warmup=2, device="cpu")  # fmt: skip
    res = train(TrainConfig(**base, steps=20), tmp_path / "out", progress=False)
    start, end = res["history"][0]["eval"]["loss"], res["eval"]["loss"]
    assert end < start - 0.5, (start, end)
    tuned = SleepHybrid.from_pretrained(tmp_path / "out")
    assert tuned.config.window == 32 and tuned.config.passes == 2
    for name in ("tokenizer.json", "chat_template.jinja", "eval.json"):
        assert (tmp_path / "out" / name).is_file(), name  # the checkpoint keeps the model's text interface
    # stopped at 10 and resumed to 20: the same weights
    train(TrainConfig(**base, steps=10), tmp_path / "split", progress=False)
    train(TrainConfig(**base, steps=20), tmp_path / "split", progress=False)
    a, b = tuned.state_dict(), SleepHybrid.from_pretrained(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_chat_data_and_one_line_errors(qwen: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", CONVS)
    base = ["train", "--init-from", str(qwen), "--model", "window=32", "--steps", "2", "--batch-size", "2",
            "--eval-every", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(main, [*base, "--data", str(data), "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    bad = write_jsonl(tmp_path / "bad.jsonl", CONVS, ['{"messages": [{"role": "user"}]}\n'])
    res = CliRunner().invoke(main, [*base, "--data", str(bad), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "bad.jsonl:3" in res.output
    res = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--no-progress"])
    assert res.exit_code == 2 and "init_from" in res.output
