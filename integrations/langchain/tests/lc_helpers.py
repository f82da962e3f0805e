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


# ---------------------------------------------------------------------- a model with a Hugging Face chat template

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]
QWEN_CORPUS = [
    "The weather in Paris is sunny and warm today. What is the weather like? It is 21 degrees.",
    'user assistant system tool call response name arguments {"city": "Paris", "unit": "celsius"} get_weather',
    "# Tools You may call one or more functions to assist with the user query. <tools> </tools> function",
    "For each call, return a JSON object with function name and arguments within tags parameters type object",
    "0123456789 + - * / = ? ! , . ; : ' \" ( ) [ ] { } < > _ | \n\n description properties string required",
]

# ChatML with tools in the system prompt and Hermes JSON tool calls (Qwen2.5 / Qwen3), reasoning kept only after the
# last user query and consecutive tool results in one user turn: the look-ahead a whole-conversation template has.
HERMES_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each call, return a JSON object in <tool_call></tool_call> tags.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set content = message.content or '' %}
{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query and reasoning %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}
{%- for call in message.tool_calls or [] %}
{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}
{%- if loop.first and content %}{{- '\\n' }}{%- elif not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}
{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

# Qwen3.5's XML tool calls (Qwen3-Coder format)
XML_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nCall a function like this:\\n<tool_call>\\n<function=example>\\n<parameter=key>\\nvalue\\n'
    '</parameter>\\n</function>\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for call in message.tool_calls or [] %}
{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}
{{- '\\n<tool_call>\\n<function=' + call.name + '>\\n' }}
{%- for key, value in call.arguments.items() %}
{{- '<parameter=' + key + '>\\n' }}
{%- if value is string %}{{- value }}{%- else %}{{- value | tojson }}{%- endif %}
{{- '\\n</parameter>\\n' }}
{%- endfor %}
{{- '</function>\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

TEMPLATES = {"hermes": HERMES_TEMPLATE, "xml": XML_TEMPLATE}


def build_qwen_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a few sentences, with Qwen's chat and tool special tokens."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(QWEN_CORPUS * 4, trainer)
    return tok


def build_template_checkpoint(
    path: Path, template: str = HERMES_TEMPLATE, *, window: int = 1024, seed: int = 0
) -> Path:
    """A checkpoint shaped like an imported Qwen model: random SleepHybrid weights, a byte-level BPE tokenizer with
    Qwen's special tokens, and a Hugging Face chat template (chat_template.jinja, tokenizer_config.json's eos)."""
    import json

    tok = build_qwen_tokenizer()
    torch.manual_seed(seed)
    cfg = HybridConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True), d_model=64, layout="agag", window=window,
        bos_token_id=0, gdn_head_dim=64, passes=2, init_std=0.05,
    )  # fmt: skip
    model = SleepHybrid(cfg).eval()
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "chat_template.jinja").write_text(template)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


class ScriptedEngine(TorchEngine):
    """A TorchEngine whose replies are scripted texts (no trained weights exist here): `generate` takes the prompt in
    as usual, then emits the next scripted reply's tokens and the end-of-turn token, as a model would, into the
    window. ``prompts`` records every prompt it was given (token ids), ``window_before`` the window's length then."""

    def __init__(self, *args: Any, replies: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replies = list(replies or [])
        self.prompts: list[list[int]] = []
        self.window_before: list[int] = []

    def generate(self, agent_id: str, prompt: Any, sampling: Any = None, **kwargs: Any) -> Any:
        from agentsleep.runtime import Generation

        assert self.codec is not None and self.replies, "no scripted reply left"
        ids = [int(t) for t in prompt]
        self.prompts.append(ids)
        self.window_before.append(self.session(agent_id).window_tokens if self.has_agent(agent_id) else 0)
        out = self.codec.tokenizer.encode(self.replies.pop(0), add_special_tokens=False).ids
        out.append(self.codec.tokenizer.token_to_id("<|im_end|>"))
        limit = sampling.max_new_tokens if sampling is not None else len(out)
        out = out[:limit]
        stop = "stop" if out and out[-1] in (sampling.stop_tokens if sampling is not None else ()) else "length"
        sleeps = self.observe(agent_id, ids + out).sleeps
        return Generation(agent_id, tuple(out), stop, len(ids), sleeps, self.session(agent_id).window_tokens)


def template_model(path: Path, replies: list[str], **kwargs: Any) -> ChatSleepHybrid:
    """ChatSleepHybrid over a `ScriptedEngine` on a template checkpoint."""
    from agentsleep.model import SleepHybrid

    engine = ScriptedEngine(SleepHybrid.from_pretrained(path), tokenizer=path / "tokenizer.json", replies=replies)
    return ChatSleepHybrid(engine=engine, max_tokens=kwargs.pop("max_tokens", 64), **kwargs)
