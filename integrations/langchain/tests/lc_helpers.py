"""A tiny chat checkpoint built inside the tests: random SleepHybrid weights and a word-level tokenizer.

Random weights give deterministic gibberish, which is enough for plumbing, sleeps and cross-process equality. The fast
weights are made to matter (slow forgetting, a strong GDN read-out, as tests/runtime does), so a lost or duplicated
sleep shows up in the replies.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from tokenizers import Tokenizer, models, pre_tokenizers

from langchain_agentsleep import ChatTemplate

SPECIALS = ["[UNK]", "<bos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
WORDS = (
    "the a an and or but if then so it is was be to of in on at for with by from up down out over under "
    "cat dog bird fish tree rock river sun moon star red blue green big small old new fast slow hot cold "
    "you i we they he she what where when why how yes no hello bye please thanks number one two three four "
    "five six seven eight nine ten plus minus equals remember note apple pear grape door key box"
).split()
PUNCT = [".", ",", "?", "!", ":", "-"]


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer: role tokens and <|end|> are special tokens, words split on whitespace/punctuation."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + PUNCT)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return tok


def build_checkpoint(
    path: Path,
    *,
    window: int = 96,
    passes: int = 2,
    seed: int = 0,
    chat_template: ChatTemplate | None = None,
) -> Path:
    """Write config.json + model.safetensors + tokenizer.json (d=64, one GDN head of 64) to ``path``."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = HybridConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        d_model=64,
        layout="agag",
        window=window,
        bos_token_id=SPECIALS.index("<bos>"),
        gdn_head_dim=64,
        passes=passes,
        init_std=0.05,
    )
    model = SleepHybrid(cfg).eval()
    with torch.no_grad():
        for block in model.layers:
            if block.kind == "g":
                block.linear_attn.A_log.fill_(-3.0)
                block.linear_attn.out_proj.weight.mul_(8.0)
    model.refresh_fingerprint()
    extra = {"chat_template": (chat_template or ChatTemplate.role_tokens()).model_dump()}
    model.save_pretrained(path, extra_config=extra)
    tok.save(str(path / "tokenizer.json"))
    return path


def user_text(turn: int, seed: int = 0) -> str:
    """Turn ``turn``'s user message: 3-8 words, deterministic."""
    rng = random.Random(seed * 100_003 + turn)
    return " ".join(rng.choice(WORDS) for _ in range(3 + turn % 6))


# ---------------------------------------------------------------------- agents for the tests

import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from agentsleep.memory import SleepPolicy  # noqa: E402
from agentsleep.runtime import TorchEngine  # noqa: E402
from agentsleep.store import SnapshotStore  # noqa: E402
from langchain.agents import create_agent  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402

from langchain_agentsleep import ChatSleepHybrid, SleepMemory  # noqa: E402


class FlakyEngine(TorchEngine):
    """A TorchEngine whose requested sleeps can be made to fail or to take long (fault injection)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_sleeps = 0  # the next n sleeps raise
        self.sleep_delay = 0.0  # seconds each sleep takes first
        self.sleep_calls = 0
        self._lock = threading.Lock()

    def sleep(self, agent_id: str, passes: int | None = None, *, persist: Any = None) -> Any:
        with self._lock:
            self.sleep_calls += 1
            fail = self.fail_sleeps > 0
            if fail:
                self.fail_sleeps -= 1
        if self.sleep_delay:
            time.sleep(self.sleep_delay)
        if fail:
            raise RuntimeError("injected engine failure during sleep")
        return super().sleep(agent_id, passes, persist=persist)


class FlakyStore(SnapshotStore):
    """A SnapshotStore that can be 'down': save/latest raise StoreError while ``down`` is set, or for the next
    ``fail_calls`` calls."""

    down = False
    fail_calls = 0
    failures = 0

    def _check(self) -> None:
        from agentsleep.errors import StoreError

        if self.down or self.fail_calls > 0:
            self.fail_calls = max(0, self.fail_calls - 1)
            self.failures += 1
            raise StoreError("injected: the snapshot store is unavailable")

    def save(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().save(*args, **kwargs)

    def latest(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().latest(*args, **kwargs)


@dataclass
class Rig:
    """A create_agent agent with ChatSleepHybrid + SleepMemory, and its parts."""

    model: ChatSleepHybrid
    memory: SleepMemory
    agent: Any
    checkpointer: Any

    def turn(self, thread: str, text: str, **kwargs: Any) -> Any:
        cfg = {"configurable": {"thread_id": thread}}
        return self.agent.invoke({"messages": [("user", text)]}, cfg, **kwargs)["messages"][-1]

    def state(self, thread: str) -> dict[str, Any]:
        return self.agent.get_state({"configurable": {"thread_id": thread}}).values


def make_rig(
    checkpoint: Path,
    *,
    store: SnapshotStore | None = None,
    checkpointer: Any = None,
    engine_cls: type[TorchEngine] = TorchEngine,
    middleware: tuple[Any, ...] = (),
    max_tokens: int = 8,
    memory_kwargs: dict[str, Any] | None = None,
    **policy: Any,
) -> Rig:
    """A fresh engine on ``checkpoint`` and an agent over it (L=96, N=2, no debounce, fast retries by default)."""
    from agentsleep.model import SleepHybrid

    from langchain_agentsleep import ChatTemplate

    engine = engine_cls(SleepHybrid.from_pretrained(checkpoint), tokenizer=checkpoint / "tokenizer.json")
    model = ChatSleepHybrid(
        engine=engine, chat_template=ChatTemplate.from_pretrained(checkpoint), max_tokens=max_tokens
    )
    settings = {"window": 96, "passes": 2, "debounce_seconds": 0.0, "retry_backoff_seconds": 0.01, **policy}
    memory = SleepMemory(model, store, policy=SleepPolicy(**settings), **(memory_kwargs or {}))
    saver = checkpointer if checkpointer is not None else InMemorySaver()
    agent = create_agent(model, system_prompt="you remember", middleware=[memory, *middleware], checkpointer=saver)
    return Rig(model, memory, agent, saver)
