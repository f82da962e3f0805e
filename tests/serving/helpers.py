"""Test models for the vLLM suite: built in seconds, no downloads (spec/vllm-cpu.md §11)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from agentsleep.model.hybrid import HybridConfig, SleepHybrid

VOCAB = 300
BOS = 1
WINDOW = 32
WORDS = [f"w{i}" for i in range(2, VOCAB)]  # id i <-> "w{i}"


def make_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<bos>": BOS, **{w: i for i, w in enumerate(WORDS, start=2)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_model(seed: int = 0, lm_scale: float = 1.0, **overrides: object) -> SleepHybrid:
    """A small hybrid whose output depends strongly on S (spec §8.7 lesson): A_log = −8 (almost no forgetting) and a
    4× GDN read-out; GDN head dim 128 (the fast CPU kernel), attention head dim 64. Weights are rounded to bf16 so
    that vLLM (bf16) and the float32 reference run the same weights and differ only by activation rounding."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB, d_model=128, layout="gaga", attn_heads=2, gdn_heads=1, gdn_head_dim=128, window=WINDOW,
        bos_token_id=BOS, init_std=0.2,
    )  # fmt: skip
    cfg.update(overrides)
    model = SleepHybrid(HybridConfig(**cfg)).eval()
    with torch.no_grad():
        for blk in model.layers:
            if blk.kind == "g":
                blk.linear_attn.A_log.fill_(-8.0)
                blk.linear_attn.out_proj.weight.mul_(4.0)
        model.lm_head.weight.mul_(lm_scale)
        for p in model.parameters():  # bf16-exact weights: vLLM's bf16 copy then holds the very same numbers
            p.copy_(p.bfloat16().float())
    model.refresh_fingerprint()
    return model


def build_checkpoint(path: Path, seed: int = 0, **overrides: object) -> Path:
    model = make_model(seed, **overrides)
    model.save_pretrained(path)
    make_tokenizer().save(str(path / "tokenizer.json"))
    return path


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def ref_greedy(model: SleepHybrid, state: object, tokens: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Reference wake decoding from ``state``: window [BOS] + tokens, then n greedy tokens.
    Returns (tokens, log-probs [n, V] of the distributions they were drawn from)."""
    with torch.no_grad():
        cache = model.start_window(state)
        logits = model.extend(cache, torch.tensor([tokens]))[0, -1]
        out, rows = [], []
        for i in range(n):
            rows.append(torch.log_softmax(logits.float(), -1))
            out.append(int(logits.argmax()))
            if i < n - 1:  # the last token is never fed (as in every engine)
                logits = model.extend(cache, torch.tensor([[out[-1]]]))[0, -1]
    return out, torch.stack(rows)


def ref_forced(model: SleepHybrid, state: object, tokens: list[int], forced: list[int]) -> torch.Tensor:
    """Reference log-probs [len(forced), V] of the distributions after tokens, tokens+forced[:1], ... (teacher-forced
    on another engine's choices, so distributions can be compared even where greedy choices would part)."""
    with torch.no_grad():
        cache = model.start_window(state)
        logits = model.extend(cache, torch.tensor([tokens + forced[:-1]]))[0]
    return torch.log_softmax(logits[len(tokens) - 1 :].float(), -1)


def raw_generate(engine: object, prompt: list[int], kv: dict | None, n: int, *, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> object:  # fmt: skip
    """One request straight to the engine's vLLM (the connector acts on ``kv``); returns vLLM's RequestOutput."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": kv} if kv is not None else None
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs, extra_args=extra)  # fmt: skip
    with engine._vllm:  # type: ignore[attr-defined]
        return engine.llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]  # type: ignore[attr-defined]


def dense_logprobs(out: object, vocab: int = VOCAB) -> torch.Tensor:
    rows = []
    for lp in out.outputs[0].logprobs:  # type: ignore[attr-defined]
        row = torch.full((vocab,), float("-inf"))
        for tok, v in lp.items():
            row[int(tok)] = v.logprob
        rows.append(row)
    return torch.stack(rows)


def noise_state(model: SleepHybrid, scale: float = 0.5, seed: int = 7) -> object:
    from agentsleep.model.state import FastWeights

    g = torch.Generator().manual_seed(seed)
    ssm = [torch.randn(s.shape, generator=g) * scale for s in model.init_state(1).ssm]
    return FastWeights(ssm=ssm, fingerprint=model.fingerprint)


def rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_divergence(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def explained_by_rounding(got: list[int], want: list[int], ours: torch.Tensor, ref_rows: torch.Tensor) -> bool:
    """Greedy decoding from two numerically different engines can only part at a near-tie: at the first step where
    they differ, the reference's top-2 margin must be within twice the measured log-prob error at that step."""
    d = first_divergence(got, want)
    if d >= min(len(got), len(want)):
        return True
    top = ref_rows[d].topk(2).values
    margin = float(top[0] - top[1])
    err = float((ours[d] - ref_rows[d]).abs().max())
    return margin <= 2 * err


# ---------------------------------------------------------------------------------------------------- servers

STARTUP_TIMEOUT = 300  # seconds; ~20–45 s on 2 shared cores, more when several start at once


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `agentsleep serve` process (its PID is the API server's: the command execs it)."""

    def __init__(self, checkpoint: Path, store_url: str, log: Path, *args: str, env: dict | None = None) -> None:
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "agentsleep.cli", "serve", str(checkpoint), "--port", str(self.port),
               "--store", store_url, "--kv-cache-bytes", str(64 << 20), "--max-num-seqs", "4", *args]  # fmt: skip
        full_env = {**os.environ, **(env or {})}
        if gpu_share() is not None:  # several vLLM instances share one GPU in the acceptance run
            cmd += ["--", "--gpu-memory-utilization", str(gpu_share())]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> Server:
        import time
        import urllib.request

        import pytest

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")
            time.sleep(1)

    def children(self) -> set[int]:
        """PIDs of the server's child processes (vLLM's engine core)."""
        out: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                out |= {int(p) for p in (task / "children").read_text().split()}
            except OSError:
                continue
        return out

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
        """POST JSON; (status, JSON answer) also for 4xx/5xx."""
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def gpu_share() -> float | None:
    """On a GPU, the fraction of its memory each vLLM instance of the test run takes (None on CPU)."""
    return 0.12 if torch.cuda.is_available() else None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone: it holds no memory)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "X")
    return state not in ("Z", "X")
