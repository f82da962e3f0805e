"""An imported checkpoint behind `agentsleep serve`, used the way a LangChain user would (issue 12 item 6): tiny random
Qwen3.5 (GDN + gated attention) and Qwen3 (attention only, memory layers inserted) models made with transformers' own
classes, imported, served on vLLM, and called with LangChain's ``ChatOpenAI`` on ``/v1/chat/completions`` with an
agent id. Every turn is checked against the embedded engine (`TorchEngine`, revived from the snapshot the turn started
from): the agent's input is the checkpoint's chat template rendering of the new messages (head again after a sleep),
the greedy reply is the same (up to a bf16 near-tie), and the sleeps between turns equal `TorchEngine.sleep`. One
server start per checkpoint (slow on 2 cores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from agentsleep.model.hybrid import SleepHybrid
from agentsleep.runtime import SamplingParams, TorchEngine
from agentsleep.runtime.chat import as_chat_messages
from agentsleep.runtime.text import TextCodec
from agentsleep.store import SnapshotStore

from .helpers import Server
from .imported import WINDOW, build_imported

pytestmark = pytest.mark.vllm
langchain_openai = pytest.importorskip("langchain_openai")

NEAR_TIE = 0.7  # as test_server.py: a greedy divergence below this top-2 margin is bf16 rounding
MAX_TOKENS = 3
# short turns (2-4 tokens of text with this tokenizer): L = 48 holds a turn that opens a window and one that continues
# it, so the agent alternates between continuing its window and reopening it after a sleep
SYSTEM = "ok"
USERS = ["Hi.", "Paris", "Bye.", "ok", "Hi.", "Paris", "Bye.", "ok"]


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_memory"])
def served(request: pytest.FixtureRequest, vllm_available, tmp_path_factory) -> Iterator[tuple[Path, Server, str]]:
    root = tmp_path_factory.mktemp(str(request.param))
    ckpt = build_imported(str(request.param), root)
    url = f"sqlite:///{root / 'agents.db'}"
    # no background sleeps: the sleeps the test sees are the ones a turn waits for, so turns do not depend on timing
    env = {"AGENTSLEEP_SLEEP_DEBOUNCE_SECONDS": "600", "AGENTSLEEP_CACHE_DIR": str(root / "cache")}
    srv = Server(ckpt, url, root / "server.log", env=env).wait_ready()
    yield ckpt, srv, url
    srv.stop()


def test_chat_openai_talks_to_an_agent_that_sleeps(served) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    ckpt, srv, url = served
    store = SnapshotStore(url)
    codec = TextCodec.from_file(ckpt)
    assert codec.chat is not None
    reference = SleepHybrid.from_pretrained(ckpt).eval()
    im_end = codec.tokenizer.token_to_id("<|im_end|>")
    llm = langchain_openai.ChatOpenAI(
        base_url=f"{srv.url}/v1", api_key="unused", model=ckpt.name, temperature=0, max_tokens=MAX_TOKENS,
        max_retries=0, extra_body={"kv_transfer_params": {"agent_id": "chat-a", "create": True}},
    )  # fmt: skip

    def render(messages: list, generation: bool) -> list[int]:
        return codec.chat_prompt(as_chat_messages(messages), add_generation_prompt=generation)

    history: list = [SystemMessage(SYSTEM)]
    last: str | None = None
    sleeps = continued = equal = 0
    for i, text in enumerate(USERS):
        history.append(HumanMessage(text))
        reply = llm.invoke(history)
        saved = store.load(store.current_id("chat-a"))
        start = saved.record.parent_id  # the snapshot the turn started from (None: a new agent)
        assert saved.record.reason == "turn" and (start is None) == (i == 0)
        before: list[int] = list(store.load(start).window) if start is not None else []
        if start is not None and start != last:  # the turn waited for a sleep of the previous turn's window
            slept = store.get(start)
            assert slept.reason == "sleep" and slept.parent_id == last
            te = TorchEngine(reference)
            te.revive("pre", store, last)
            te.sleep("pre")
            assert te.export_state("pre").state.allclose(store.load(start).state, 1e-4, 1e-5)
            assert tuple(before) == te.session("pre").window
            sleeps += 1
        window = list(saved.window)
        assert window[: len(before)] == before
        # the input: the chat template's own rendering of what is new to the agent
        if start is None:
            want = render(history, True)  # the whole conversation
        elif not before:
            want = render([history[0], history[-1]], True)  # after a sleep: the system prompt again, the new message
        else:
            prev, full = render(history[:-1], False), render(history, True)
            assert full[: len(prev)] == prev
            end = codec.encode("<|im_end|>\n")
            want = (end[1:] if before[-1] == im_end else end) + full[len(prev) :]
            continued += 1
        added = window[len(before) :]
        assert added[: len(want)] == want, (i, codec.decode(added), codec.decode(want))
        got = added[len(want) :]
        assert 1 <= len(got) <= MAX_TOKENS and (len(got) == MAX_TOKENS or got[-1] == im_end)
        # the reply: what the embedded engine says from the same memory
        te = TorchEngine(reference)
        if start is None:
            te.create_agent("ref")
        else:
            te.revive("ref", store, start)
        ref = te.generate("ref", want, SamplingParams(max_new_tokens=MAX_TOKENS, stop_tokens=(im_end,)),
                          return_logits=True)  # fmt: skip
        if got == list(ref.tokens):
            equal += 1
        else:
            d = next(j for j, (a, b) in enumerate(zip(got, ref.tokens, strict=False)) if a != b)
            top = torch.log_softmax(ref.logits[d], -1).topk(2).values
            assert float(top[0] - top[1]) <= NEAR_TIE, (i, got, ref.tokens)
        body = codec.decode(got[:-1] if got[-1] == im_end else got)
        if not any(tag in body for tag in ("<think>", "</think>", "<tool_call>")):
            assert reply.content == body.strip()
        history.append(reply)
        last = saved.record.id
    assert sleeps >= 2 and continued >= 2, (sleeps, continued)
    assert equal >= len(USERS) - 2
    assert store.get(last).meta.get("sleep_count") == sleeps  # the agent's books count the sleeps it had
    assert WINDOW == reference.config.window
