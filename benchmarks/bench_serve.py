"""Claim: ``agentsleep serve`` is fast — 8 concurrent agents get ≥ 0.6× the embedded engine's batched reply tokens/s on
the shipped toy checkpoint and ≥ 1.0× at d = 512, and a warm agent's first token takes ≤ 2× the embedded engine's
warm turn.

Both sides serve the same agents with the same memories (a non-zero S and a window of ``history`` tokens) and the
same turn (``prompt`` new tokens, ``new`` greedy reply tokens):

* server: a real ``agentsleep serve`` process (vLLM's API server + the connector + the agent middleware) on a SQLite
  store; 8 clients send one turn each at once over HTTP (keep-alive), every round, and every turn is saved before it
  is answered (compare-and-set, synchronous=FULL). Each turn names its agent's base snapshot, so every round is the
  same turn of a warm agent (memory and window header resident: one version read and one save per turn).
* embedded: `TorchEngine.generate_batch` for the 8 agents (memories imported before each round, not timed); it keeps
  each agent's window K/V between calls and saves nothing.

Time to first token: one warm agent, streamed (``stream=True``), from sending the request to the first token's
event; embedded: `TorchEngine.generate(..., max_new_tokens=1)` on a warm agent. Medians over ``--repeat`` runs, all
in one run on the same machine (2 shared CPU cores here: the server's two processes, the clients and the embedded
engine share them), reported as ratios.

Two more columns separate what the agent layer costs from what vLLM's server costs on this machine: `VLLMEngine`
(vLLM in-process, the same batched turn) and "plain srv" — the same server answering, interleaved with the agent
rounds, plain vLLM requests of the very windows the agent layer composes (``--allow-stateless``: no memory, no
restore, no save). ``agent/plain`` is the agent layer's share.

Usage: python -m benchmarks.bench_serve [--models toy d512] [--repeat 15]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentsleep.model.hybrid import HybridConfig, SleepHybrid
from agentsleep.model.state import FastWeights
from agentsleep.runtime import AgentMemory, GenerateRequest, SamplingParams, TorchEngine
from agentsleep.serving.engine import VLLMEngine
from agentsleep.serving.settings import apply_env_defaults
from agentsleep.store import SnapshotStore
from benchmarks._common import banner, setup

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "checkpoints" / "depo-micro-n4"
AGENTS = 8


def build_d512(path: Path, window: int = 256) -> Path:
    """The serving toy of bench_vllm_throughput at d = 512: 8 attention heads of 64, 4 GDN heads of 128."""
    cfg = HybridConfig(vocab_size=300, d_model=512, layout="gaga", attn_heads=8, gdn_heads=4, gdn_head_dim=128,
                       window=window, bos_token_id=1, init_std=0.2)  # fmt: skip
    model = SleepHybrid(cfg).eval()
    with torch.no_grad():
        for blk in model.layers:
            if blk.kind == "g":
                blk.linear_attn.A_log.fill_(-8.0)  # S matters (spec/vllm-cpu.md §8.7)
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.refresh_fingerprint()
    model.save_pretrained(path)
    return path


class Served:
    """One ``agentsleep serve`` process."""

    def __init__(self, checkpoint: Path, store_url: str, log: Path, *args: str) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "agentsleep.cli", "serve", str(checkpoint), "--port", str(self.port),
               "--store", store_url, "--max-num-seqs", str(AGENTS), "--served-model-name", "m", *args]  # fmt: skip
        # No background sleeps during the measurement (every round replays the same turn from a base snapshot).
        env = {**os.environ, "AGENTSLEEP_SLEEP_DEBOUNCE_SECONDS": "3600", "AGENTSLEEP_CACHE_DIR": str(log.parent)}
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server not ready:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)

    def pids(self) -> list[int]:
        """The server's processes: the API server and the engine core it started."""
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, kids)]

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (Linux /proc; 0 for a process that is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of proc(5))
    return total


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(agent: str | None, snapshot: str | None, prompt: list[int], new: int, stream: bool = False) -> bytes:
    """A turn of ``agent`` from ``snapshot`` (its input: ``prompt``), or with ``agent=None`` a plain vLLM request of
    the whole window (``prompt`` = [BOS] + window + input): what serving costs without an agent layer."""
    body = {"model": "m", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": stream,
            "return_token_ids": True}  # fmt: skip
    if agent is not None:
        body["kv_transfer_params"] = {"agent_id": agent, "snapshot_id": snapshot}
    return json.dumps(body).encode()


def turn(conn: http.client.HTTPConnection, body: bytes) -> list[int]:
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    if resp.status != 200:
        raise RuntimeError(f"turn failed: {resp.status} {data}")
    return [int(t) for t in data["choices"][0]["token_ids"]]


def first_token_seconds(conn: http.client.HTTPConnection, body: bytes) -> float:
    """Seconds from sending a streamed turn to its first token's event (the rest of the stream is drained)."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    first, buf, done = None, b"", False
    while chunk := resp.read1(65536):
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event.strip().removeprefix(b"data:").strip()
            if data == b"[DONE]":
                done = True
            elif first is None and any(c.get("token_ids") for c in json.loads(data).get("choices") or []):
                first = time.perf_counter() - t0
    if resp.status != 200 or first is None or not done:
        raise RuntimeError(f"stream failed: {resp.status} {buf[-500:]!r}")
    return first


def memories(model: SleepHybrid, history: int, vocab_lo: int) -> list[AgentMemory]:
    out = []
    for i in range(AGENTS):
        g = torch.Generator().manual_seed(i)
        ssm = [torch.randn(s.shape, generator=g) * 0.5 for s in model.init_state(1).ssm]
        window = torch.randint(vocab_lo, model.config.vocab_size, (history,), generator=g).tolist()
        out.append(AgentMemory(state=FastWeights(ssm=ssm, fingerprint=model.fingerprint), window=tuple(window)))
    return out


def run_embedded(
    engine: TorchEngine | VLLMEngine, mems: list[AgentMemory], prompts: list[list[int]], new: int, repeat: int
) -> tuple[float, float, float, list]:
    """(reply tokens/s of one batched turn of every agent, seconds to a warm agent's first token, CPU seconds per reply
    token, the replies)."""
    reqs = [GenerateRequest(f"a{i}", prompts[i], SamplingParams(max_new_tokens=new)) for i in range(AGENTS)]
    batch_times, first_times, cpu, out = [], [], [], []
    for r in range(repeat + 1):  # the first round warms up
        for i, m in enumerate(mems):
            engine.import_state(f"a{i}", m)
        t0, c0 = time.perf_counter(), time.process_time()
        out = engine.generate_batch(reqs)
        if r:
            batch_times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        engine.import_state("a0", mems[0])
        t0 = time.perf_counter()
        engine.generate("a0", prompts[0], SamplingParams(max_new_tokens=1))
        if r:
            first_times.append(time.perf_counter() - t0)
    tokens = AGENTS * new
    return tokens / statistics.median(batch_times), statistics.median(first_times), statistics.median(cpu) / tokens, out


def bench_model(name: str, ckpt: Path, history: int, prompt: int, new: int, repeat: int, tmp: Path) -> dict:
    model = SleepHybrid.from_pretrained(ckpt)
    bos = model.config.bos_token_id
    lo = 2 if bos is None or bos < 2 else 0  # token ids that are not the BOS
    mems = memories(model, history, lo)
    draws = [torch.randint(lo, model.config.vocab_size, (prompt + 4,), generator=torch.Generator().manual_seed(100 + i))
             for i in range(AGENTS)]  # fmt: skip
    prompts = [[t for t in d.tolist() if t != bos][:prompt] for d in draws]
    # ---- embedded: TorchEngine (the claim's baseline), then VLLMEngine (vLLM in-process, no HTTP, no saves)
    embedded = {}
    for kind in ("torch", "vllm"):
        engine = TorchEngine(model) if kind == "torch" else VLLMEngine(ckpt, state_dir=tmp / f"{name}-vllm-state")
        embedded[kind] = run_embedded(engine, mems, prompts, new, repeat)
        if kind == "vllm":
            engine.close()
    torch_tps, torch_first, torch_cpu, torch_out = embedded["torch"]
    vllm_tps, vllm_first, vllm_cpu, _ = embedded["vllm"]
    # ---- server: agent turns, and (interleaved, same load) plain vLLM requests of the same composed windows
    store_url = f"sqlite:///{tmp / f'{name}.db'}"
    store = SnapshotStore(store_url)
    bases = [store.save(f"a{i}", m.state, list(m.window), reason="manual").id for i, m in enumerate(mems)]
    store.close()
    t0 = time.perf_counter()
    server = Served(ckpt, store_url, tmp / f"{name}.log", "--allow-stateless")
    startup = time.perf_counter() - t0
    windows = [[bos, *m.window, *prompts[i]] for i, m in enumerate(mems)]
    try:
        conns = [server.connection() for _ in range(AGENTS)]
        kinds = {
            "agent": [_body(f"a{i}", bases[i], prompts[i], new) for i in range(AGENTS)],
            "plain": [_body(None, None, windows[i], new) for i in range(AGENTS)],
        }
        served_out: list[list[int]] = [[] for _ in range(AGENTS)]
        rounds: dict[str, list[float]] = {"agent": [], "plain": []}
        firsts: dict[str, list[float]] = {"agent": [], "plain": []}
        cpus: dict[str, list[float]] = {"agent": [], "plain": []}
        pids = server.pids()
        for r in range(repeat + 3):  # three rounds warm up (vLLM's first requests take seconds on CPU)
            for kind, bodies in kinds.items():
                results: list = [None] * AGENTS

                def one(i: int, bodies: list[bytes] = bodies, results: list = results) -> None:
                    try:
                        results[i] = turn(conns[i], bodies[i])
                    except Exception as e:  # re-raised below, with the server's answer
                        results[i] = e

                threads = [threading.Thread(target=one, args=(i,)) for i in range(AGENTS)]
                t0, c0 = time.perf_counter(), cpu_seconds(pids)
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed, used = time.perf_counter() - t0, cpu_seconds(pids) - c0
                failed = [x for x in results if isinstance(x, Exception)]
                if failed:
                    raise RuntimeError(f"{len(failed)} of {AGENTS} {kind} turns failed: {failed[0]}")
                stream = (
                    _body("a0", bases[0], prompts[0], new, True)
                    if kind == "agent"
                    else _body(None, None, windows[0], new, True)
                )
                first = first_token_seconds(conns[0], stream)
                if r >= 3:
                    rounds[kind].append(elapsed)
                    firsts[kind].append(first)
                    cpus[kind].append(used)
                if kind == "agent":
                    served_out = results
    finally:
        server.stop()
    served_tps = AGENTS * new / statistics.median(rounds["agent"])
    plain_tps = AGENTS * new / statistics.median(rounds["plain"])
    served_first, plain_first = statistics.median(firsts["agent"]), statistics.median(firsts["plain"])
    same = sum(list(t.tokens) == s for t, s in zip(torch_out, served_out))
    return {
        "model": name, "d_model": model.config.d_model, "window": model.config.window, "history": history,
        "prompt": prompt, "new": new, "server_startup_s": startup,
        "torch_tok_s": torch_tps, "vllm_engine_tok_s": vllm_tps, "plain_server_tok_s": plain_tps,
        "server_tok_s": served_tps, "throughput_ratio": served_tps / torch_tps,
        "agent_vs_plain_server": served_tps / plain_tps,
        "torch_first_ms": torch_first * 1e3, "vllm_engine_first_ms": vllm_first * 1e3,
        "plain_server_first_ms": plain_first * 1e3, "server_first_ms": served_first * 1e3,
        "first_token_ratio": served_first / torch_first, "first_agent_vs_plain": served_first / plain_first,
        "same_reply": same,
        # CPU ms per reply token (the server's two processes; the embedded engines' process), less load-dependent
        "torch_cpu_ms_per_token": torch_cpu * 1e3, "vllm_engine_cpu_ms_per_token": vllm_cpu * 1e3,
        "plain_server_cpu_ms_per_token": statistics.median(cpus["plain"]) / (AGENTS * new) * 1e3,
        "server_cpu_ms_per_token": statistics.median(cpus["agent"]) / (AGENTS * new) * 1e3,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["toy", "d512"], choices=["toy", "d512"])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    apply_env_defaults()
    setup(threads=1)
    banner("agentsleep serve, 8 agents: >= 0.6x (toy) / >= 1.0x (d=512) embedded tok/s; warm first token <= 2x")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    plans = {
        # the shipped checkpoint: L = 16, so history + prompt + reply fill one window
        "toy": (TOY, 4, 4, 8),
        "d512": (build_d512(tmp / "d512"), 64, 16, 32),
    }
    rows = []
    head = ("model", "torch tok/s", "VLLMEngine", "plain srv", "agent srv", "ratio", "goal", "agent/plain",
            "torch 1st ms", "VLLMEngine", "plain srv", "agent srv", "ratio", "goal", "agent/plain", "same")  # fmt: skip
    print(" ".join(f"{h:>{max(5, len(h))}}" for h in head))
    for name in args.models:
        ckpt, history, prompt, new = plans[name]
        row = bench_model(name, ckpt, history, prompt, new, args.repeat, tmp)
        rows.append(row)
        goal = 0.6 if name == "toy" else 1.0
        cells = (name, f"{row['torch_tok_s']:.0f}", f"{row['vllm_engine_tok_s']:.0f}",
                 f"{row['plain_server_tok_s']:.0f}", f"{row['server_tok_s']:.0f}", f"{row['throughput_ratio']:.2f}",
                 f">={goal:.1f}", f"{row['agent_vs_plain_server']:.2f}", f"{row['torch_first_ms']:.1f}",
                 f"{row['vllm_engine_first_ms']:.1f}", f"{row['plain_server_first_ms']:.1f}",
                 f"{row['server_first_ms']:.1f}", f"{row['first_token_ratio']:.2f}", "<=2.0",
                 f"{row['first_agent_vs_plain']:.2f}", f"{row['same_reply']}/{AGENTS}")  # fmt: skip
        print(" ".join(f"{c:>{max(5, len(h))}}" for c, h in zip(cells, head)))
        print(f"{'':>5} CPU ms per reply token: torch {row['torch_cpu_ms_per_token']:.2f}, VLLMEngine "
              f"{row['vllm_engine_cpu_ms_per_token']:.2f}, plain server {row['plain_server_cpu_ms_per_token']:.2f}, "
              f"agent server {row['server_cpu_ms_per_token']:.2f} (agent / torch "
              f"{row['server_cpu_ms_per_token'] / row['torch_cpu_ms_per_token']:.2f}, agent / plain "
              f"{row['server_cpu_ms_per_token'] / row['plain_server_cpu_ms_per_token']:.2f})")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
