"""Fine-tuning on conversations: ``agentsleep train --init-from HF_DIR --data conversations.jsonl``.

Each line of the file is one conversation in the OpenAI chat format::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...], "tools": [...]}          # "tools" optional

* **Text.** The conversation is rendered with the checkpoint's own chat template (`agentsleep.model.chat_template`,
  equal to transformers' ``apply_chat_template``) and tokenised with its ``tokenizer.json``, no special tokens added —
  exactly the ids a `TorchEngine` with that checkpoint would see.
* **Targets.** Only the assistant messages' tokens are scored, each including the turn's end-of-turn tokens (so the
  model learns to stop). An assistant message's span is where ``render(messages[:i+1])`` extends
  ``render(messages[:i], add_generation_prompt=True)``; a template that renders an earlier turn differently once later
  turns follow (Qwen templates drop the reasoning of turns before the last user message) cannot be cut that way and
  the line is refused with its number.
* **Windows, as at inference.** The ids are cut into windows of L tokens from the first one. Every window is read in
  one pass from the state the previous window left (wake: its logits are pass-1 logits, as an engine decodes), and
  every window but the last is then slept on with N passes before the next one starts (an engine sleeps when its window
  is full): the state a window leaves is S after N passes. The token after a window's last one is predicted from that
  last position's logits, before the sleep, as an engine predicts it. Gradients flow through every window's S and
  every pass (Algorithm 1's full BPTT; ``detach_every`` truncates it).

Bad lines raise `InvalidInput` naming the file and line number. Batches: a step's conversations are drawn without
replacement (a fresh permutation each epoch, a pure function of (data seed, step)); rows of equal length share a pass,
others run one after another.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from agentsleep.errors import InvalidInput
from agentsleep.model.chat_template import ChatFormat
from agentsleep.model.hybrid import SleepHybrid
from agentsleep.model.state import FastWeights

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool", "developer")
CHAT_STREAM = 0xC4A7  # tags the conversation-order stream


@dataclass(frozen=True)
class Conversation:
    """One conversation as ids: ``tokens`` [T] int64 and ``targets`` [T] bool (True = an assistant token to learn)."""

    tokens: np.ndarray
    targets: np.ndarray
    line: int

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------------------------------- reading


def _where(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}"


def _check_message(m: Any, i: int, at: str) -> dict[str, Any]:
    if not isinstance(m, Mapping):
        raise InvalidInput(f"{at}: message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise InvalidInput(f"{at}: message {i} has role {role!r}; expected one of {list(ROLES)}")
    content = m.get("content")
    if content is not None and not isinstance(content, str | list):
        raise InvalidInput(f"{at}: message {i} content must be a string (or a list of text parts), got {content!r}")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, Mapping) else p for p in content]
        if not all(isinstance(p, str) for p in parts):
            raise InvalidInput(f"{at}: message {i} content parts must be text")
        m = {**m, "content": "".join(parts)}  # type: ignore[arg-type]
    if content is None and not (role == "assistant" and m.get("tool_calls")):
        raise InvalidInput(f"{at}: message {i} ({role}) has no content")
    return dict(m)


def parse_line(text: str, at: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """One JSONL line → (messages, tools). Raises `InvalidInput` naming ``at`` (file:line) and what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, Mapping) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise InvalidInput(f'{at}: each line must be an object with a non-empty "messages" list')
    messages = [_check_message(m, i, at) for i, m in enumerate(obj["messages"])]
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidInput(f"{at}: the conversation has no assistant message, so nothing to learn")
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
        raise InvalidInput(f'{at}: "tools" must be a list of JSON-schema objects')
    return messages, tools


def assistant_spans(
    fmt: ChatFormat, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, at: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant messages (see the module docstring)."""
    text = fmt.render(messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = fmt.render(messages[:i], tools=tools, add_generation_prompt=True) if i else ""
        upto = fmt.render(messages[: i + 1], tools=tools)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise InvalidInput(
                f"{at}: the chat template renders assistant message {i} differently once later messages follow (Qwen "
                "templates drop the reasoning of turns before the last user message), so its tokens cannot be found "
                "in the conversation; keep reasoning only in the last assistant message, or split the conversation"
            )
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return text, spans


def tokenize(tokenizer: Tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """ids [T] (no special tokens added, as the engines encode prompts) and targets [T]: a token is a target if it
    starts inside an assistant span."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    starts = np.asarray([a for a, _ in enc.offsets], dtype=np.int64)
    targets = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        targets |= (starts >= a) & (starts < b)
    return ids, targets


def load_conversations(
    path: str | Path, checkpoint: str | Path, *, vocab_size: int | None = None
) -> list[Conversation]:
    """Read, render and tokenise every conversation of a JSONL file with ``checkpoint``'s template and tokenizer."""
    path, checkpoint = Path(path), Path(checkpoint)
    fmt = ChatFormat.from_pretrained(checkpoint)
    if fmt is None:
        raise InvalidInput(f"{checkpoint} ships no chat template (chat_template.jinja or tokenizer_config.json)")
    tok_file = checkpoint / "tokenizer.json"
    if not tok_file.is_file():
        raise InvalidInput(f"{checkpoint} has no tokenizer.json to encode {path} with")
    tokenizer = Tokenizer.from_file(str(tok_file))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read {path}: {e}") from e
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = _where(path, lineno)
        messages, tools = parse_line(line, at)
        try:
            text, spans = assistant_spans(fmt, messages, tools, at)
        except InvalidInput as e:
            msg = str(e)
            raise InvalidInput(msg if msg.startswith(at) else f"{at}: {msg}") from e
        ids, targets = tokenize(tokenizer, text, spans)
        if not targets[1:].any():
            raise InvalidInput(f"{at}: its assistant messages give no token to learn (empty, or only the first token)")
        if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
            raise InvalidInput(f"{at}: token id {int(ids.max())} is outside the model's vocabulary of {vocab_size}")
        out.append(Conversation(tokens=ids, targets=targets, line=lineno))
    if not out:
        raise InvalidInput(f"{path} holds no conversation")
    return out


def rows_for_step(n: int, batch: int, data_seed: int, step: int) -> np.ndarray:
    """Indices of step ``step``'s conversations: positions [step·B, (step+1)·B) of the concatenated per-epoch
    permutations (epoch e shuffled by (data seed, e)), so every conversation is seen once per epoch; pure in
    (n, batch, data_seed, step), so a resumed run, every N and every rank agree."""
    idx = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(pos, n)
        perm = np.random.default_rng([CHAT_STREAM, data_seed, epoch]).permutation(n)
        idx.append(int(perm[k]))
    return np.asarray(idx, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class ChatBatch:
    """A step's conversations."""

    rows: tuple[Conversation, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: Sequence[int] | np.ndarray) -> ChatBatch:
        return ChatBatch(tuple(self.rows[int(i)] for i in idx))

    @property
    def n_targets(self) -> int:
        """Targets that have a prediction (a conversation's first token has none)."""
        return int(sum(c.targets[1:].sum() for c in self.rows))

    @property
    def n_tokens(self) -> int:
        return int(sum(len(c) for c in self.rows))

    def max_windows(self, window: int) -> int:
        return max(-(-len(c) // window) for c in self.rows)

    def groups(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens [b, T], targets [b, T]) for each set of rows of equal length T."""
        by_len: dict[int, list[Conversation]] = {}
        for c in self.rows:
            by_len.setdefault(len(c), []).append(c)
        for T in sorted(by_len):
            rows = by_len[T]
            yield (
                torch.from_numpy(np.stack([c.tokens for c in rows])),
                torch.from_numpy(np.stack([c.targets for c in rows])),
            )


# ---------------------------------------------------------------------------------------------------- the loss


def conversation_loss(
    model: SleepHybrid,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    passes: int | Sequence[int],
    *,
    use_checkpoint: bool = False,
    detach_every: int | None = None,
    predictions: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the assistant targets of equal-length conversations, windowed as at inference.

    Args:
        tokens, targets: [B, T] (targets: bool). passes: N for each window that is slept (one, or one per window).
        predictions: if given, the argmax prediction of every scored target is appended (flat, in order).

    Returns:
        (sum of target losses, number of targets).
    """
    B, T = tokens.shape
    L = model.config.window
    dev = model.device
    tokens, targets = tokens.to(dev), targets.to(dev).bool()
    state = model.init_state(B)
    acc = torch.float64 if model.dtype == torch.float64 else torch.float32  # float64 models: exact tests
    loss = torch.zeros((), device=dev, dtype=acc)
    n = 0
    for w, s in enumerate(range(0, T, L)):
        x = tokens[:, s : s + L]
        last = s + L >= T
        n_w = 1 if last else int(passes if isinstance(passes, int | np.integer) else passes[w])
        h, state, has_bos = model._run_window(x, state, n_w, use_checkpoint, wake_features=True)
        h = h[:, int(has_bos) :]  # [B, len, d]: position j predicts token s + j + 1
        nxt = targets[:, s + 1 : s + x.shape[1] + 1]  # [B, len'] (len' = len, or len − 1 at the end)
        if nxt.any():
            sel = nxt
            logits = model.logits(h[:, : nxt.shape[1]][sel])  # only where a target follows: [n_w, V]
            gold = tokens[:, s + 1 : s + 1 + nxt.shape[1]][sel]
            loss = loss + F.cross_entropy(logits.to(acc), gold, reduction="sum")
            n += int(sel.sum())
            if predictions is not None:
                predictions.append((logits.argmax(-1) == gold).detach().cpu())
        if detach_every is not None and (w + 1) % detach_every == 0:
            state = FastWeights(
                ssm=[t.detach() for t in state.ssm],
                kv=[(k.detach(), v.detach()) for k, v in state.kv],
                kv_valid=state.kv_valid,
                fingerprint=state.fingerprint,
            )
    return loss, n


def batch_loss(
    model: SleepHybrid,
    batch: ChatBatch,
    passes: int | Sequence[int],
    *,
    use_checkpoint: bool = False,
    detach_every: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean assistant-token loss of a batch and the number of targets it averages over."""
    total, n = torch.zeros((), device=model.device), 0
    for tokens, targets in batch.groups():
        s, k = conversation_loss(
            model, tokens, targets, passes, use_checkpoint=use_checkpoint, detach_every=detach_every
        )
        total, n = total + s, n + k
    return total / max(n, 1), n


@torch.no_grad()
def evaluate(model: SleepHybrid, batch: ChatBatch, passes: int) -> dict[str, float]:
    """Mean assistant-token loss and token accuracy (greedy argmax equals the target) of held-out conversations."""
    was = model.training
    model.eval()
    total, n, hits = 0.0, 0, 0
    for tokens, targets in batch.groups():
        preds: list[torch.Tensor] = []
        s, k = conversation_loss(model, tokens, targets, passes, predictions=preds)
        total, n = total + float(s), n + k
        hits += int(sum(int(p.sum()) for p in preds))
    model.train(was)
    return {"loss": total / max(n, 1), "token_acc": hits / max(n, 1), "targets": float(n)}
