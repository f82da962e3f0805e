"""Claims (issue 12, item 7), on a Qwen3.5-style random model of about 1B parameters built from a config (no download):

1. Load time: `SleepHybrid.from_pretrained(dir)` ÷ transformers' `AutoModelForCausalLM.from_pretrained(dir)` ≤ 1.5.
2. Peak RSS while loading ÷ the weights' size ≤ 1.3, in float32 and with ``dtype=torch.bfloat16`` (÷ the bf16 size).
3. Wake decoding tokens/s: ours (`TorchEngine.generate`, one pass per token over the current window + fixed-size S)
   ÷ transformers' `generate` with its cache, after 1k and 16k tokens of history: ≥ 1 at 1k, growing with history.

Every measurement runs in its own subprocess (a clean RSS, one model in memory at a time). The checkpoint is saved
with transformers' own `save_pretrained` into a temporary directory first, and its files are read once so both loaders
find them in the page cache.

History: up to ``--real-history-max`` tokens it is a real prefill. Longer histories are built with the shapes they
would have: transformers gets a cache whose attention layers hold that many random (already rotated) keys and values
and whose GDN layers hold their fixed-size state; ours gets a random S and a window of L−1 real tokens (the most a
window can hold before it sleeps, the worst case for us). Decode cost depends on these shapes, not on their values
(a dense model has no data-dependent branch), and a real 16k prefill of a 1B model takes many minutes per model on 2
shared cores. Ratios are from one run on a shared machine.

    python -m benchmarks.bench_pretrained                     # ~1B parameters
    python -m benchmarks.bench_pretrained --layers 4 --hidden 512 --vocab 8192   # a quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import banner, setup


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def hf_config(args: argparse.Namespace) -> Any:
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 256, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=args.hidden // 128, linear_num_value_heads=args.hidden // 64, linear_key_head_dim=128,
        linear_value_head_dim=128, tie_word_embeddings=True, max_position_embeddings=65536,
    )  # fmt: skip


def force_torch_gdn() -> None:
    """transformers binds Qwen3.5's GDN to fla's Triton kernels when fla imports; they cannot run on a CPU."""
    import inspect

    import transformers.models.qwen3_5.modeling_qwen3_5 as q35

    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                 "causal_conv1d_update"):  # fmt: skip
        setattr(q35, name, inspect.unwrap(getattr(q35, name)))


# ---------------------------------------------------------------------------------------------------- children


def child_make(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Qwen3_5ForCausalLM

    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(hf_config(args))
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight  # to_empty unties; the config ties (Qwen3.5 small models do)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if "linear_attn.norm" in name else 0.0))
            else:
                p.normal_(0.0, 0.02, generator=g)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.dir)
    size = sum(f.stat().st_size for f in Path(args.dir).glob("*.safetensors"))
    return {"parameters": n, "weights_bytes": size}


def child_load(args: argparse.Namespace) -> dict[str, Any]:
    dtype = torch.bfloat16 if args.bf16 else None
    if args.who == "hf":
        from transformers import AutoModelForCausalLM

        force_torch_gdn()
    else:
        from agentsleep.model.hybrid import SleepHybrid
    base = rss_mb()
    t0 = time.perf_counter()
    if args.who == "hf":
        model = AutoModelForCausalLM.from_pretrained(args.dir, **({"dtype": dtype} if dtype else {}))
    else:
        model = SleepHybrid.from_pretrained(args.dir, dtype=dtype, window=args.window)
    seconds = time.perf_counter() - t0
    # Both loaders may leave weights in the file's memory map until first use: run one short forward so that every
    # weight is really in memory before the peak is read.
    x = torch.arange(8)[None]
    with torch.no_grad():
        if args.who == "hf":
            model(input_ids=x)
        else:  # a zero state by hand: `init_state` would first hash every weight (the model fingerprint, below)
            from agentsleep.model.state import FastWeights

            gdn = [b.linear_attn for b in model._gdn_layers()]
            zero = [torch.zeros(1, g.h_v, g.d_k, g.d_v) for g in gdn]
            model.forward_chunk(x, FastWeights(ssm=zero, fingerprint="bench"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"seconds": seconds, "base_mb": base, "peak_mb": peak_mb(), "param_mb": weights / 2**20}
    if args.who == "ours":  # the fingerprint (sha256 of every weight) is computed once, at the first init_state
        t0 = time.perf_counter()
        _ = model.fingerprint
        out |= {"fingerprint_seconds": time.perf_counter() - t0, "fingerprint_peak_mb": peak_mb()}
    return out


@torch.no_grad()
def child_decode(args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.history)
    vocab = args.vocab
    real = args.history <= args.real_history_max
    if args.who == "hf":
        from transformers import AutoModelForCausalLM

        force_torch_gdn()
        model = AutoModelForCausalLM.from_pretrained(args.dir).eval()
        prompt = torch.randint(0, vocab, (1, args.history if real else 8), generator=gen)
        out = model(input_ids=prompt, use_cache=True)
        cache = out.past_key_values
        if not real:  # attention layers: that many (rotated) keys/values; GDN layers keep their fixed-size state
            for layer in cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    B, H, _, D = layer.keys.shape
                    layer.keys = torch.randn(B, H, args.history, D, generator=gen)
                    layer.values = torch.randn(B, H, args.history, D, generator=gen)
        ids = torch.cat([torch.zeros(1, args.history, dtype=torch.long), torch.randint(0, vocab, (1, 1))], 1)
        times = []
        for _ in range(args.repeat):
            c = copy.deepcopy(cache)
            t0 = time.perf_counter()
            res = model.generate(ids, past_key_values=c, max_new_tokens=args.decode, min_new_tokens=args.decode,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
            times.append(time.perf_counter() - t0)
            assert res.shape[1] == ids.shape[1] + args.decode
        return {"seconds_per_token": min(times) / args.decode, "cache_tokens": cache.get_seq_length()}
    from agentsleep.model.hybrid import SleepHybrid
    from agentsleep.model.state import FastWeights
    from agentsleep.runtime import AgentMemory, SamplingParams, TorchEngine

    model = SleepHybrid.from_pretrained(args.dir, window=args.window)
    engine = TorchEngine(model)
    room = args.window - args.decode  # the window must hold the history's tail, the prompt token and the reply
    if real:  # a short history sits in the window
        if args.history > room:
            raise SystemExit(f"a real history of {args.history} tokens needs --window ≥ {args.history + args.decode}")
        window = torch.randint(0, vocab, (args.history,), generator=gen).tolist()
        state = model.init_state(1)
    else:  # after `history` tokens: some S, and at worst a window about to be full
        window = torch.randint(0, vocab, (room,), generator=gen).tolist()
        state = model.init_state(1)
        state = FastWeights(ssm=[torch.randn(s.shape, generator=gen) * 0.1 for s in state.ssm],
                            fingerprint=state.fingerprint)  # fmt: skip
    times = []
    for i in range(args.repeat):
        engine.import_state(f"a{i}", AgentMemory(state=state, window=tuple(window)))
        t0 = time.perf_counter()
        res = engine.generate(f"a{i}", [1], SamplingParams(max_new_tokens=args.decode))
        times.append(time.perf_counter() - t0)
        assert len(res.tokens) == args.decode and res.sleeps == 0
    return {"seconds_per_token": min(times) / args.decode, "window_tokens": len(window)}


# ---------------------------------------------------------------------------------------------------- driver


def run_child(args: argparse.Namespace, kind: str, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_pretrained", "--child", kind, "--dir", str(args.dir)]
    for k in ("layers", "hidden", "vocab", "window", "decode", "repeat", "real_history_max", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"child {kind} {extra} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--window", type=int, default=2048, help="L of our model (the paper's GSM runs: 2000)")
    p.add_argument("--histories", type=int, nargs="*", default=[1024, 16384], help="none: load only")
    p.add_argument("--real-history-max", type=int, default=1024)
    p.add_argument("--decode", type=int, default=4, help="decode tokens per measurement")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", type=Path, default=None, help="reuse a saved checkpoint")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--who", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--history", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    setup(args.threads)
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        result = {"make": child_make, "load": child_load, "decode": child_decode}[args.child](args)
        print(json.dumps(result))
        return
    banner("load ≤ 1.5× transformers; peak RSS ≤ 1.3× weights; wake tokens/s ≥ 1× transformers at 1k, growing")
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_pretrained_")
        args.dir = Path(tmp.name)
        made = run_child(args, "make")
        print(f"# model: {made['parameters'] / 1e9:.2f}B parameters, {made['weights_bytes'] / 2**30:.2f} GiB float32 "
              f"(layers {args.layers}, hidden {args.hidden}, vocab {args.vocab}), saved by transformers")  # fmt: skip
    else:
        size = sum(f.stat().st_size for f in Path(args.dir).glob("*.safetensors"))
        print(f"# model: {args.dir}, {size / 2**30:.2f} GiB of safetensors")
    for f in Path(args.dir).glob("*.safetensors"):  # into the page cache, so neither loader pays for the disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    try:
        rows = []
        for bf16 in (False, True):
            res = {who: run_child(args, "load", who=who, **({"bf16": True} if bf16 else {})) for who in ("ours", "hf")}
            for who, r in res.items():
                grew = r["peak_mb"] - r["base_mb"]
                rows.append((who, bf16, r["seconds"], grew / r["param_mb"], r["peak_mb"] / r["param_mb"]))
            print(f"load {'bf16' if bf16 else 'f32 '}: ours {res['ours']['seconds']:.2f} s, transformers "
                  f"{res['hf']['seconds']:.2f} s -> ratio {res['ours']['seconds'] / res['hf']['seconds']:.2f} "
                  "(goal ≤ 1.5)")  # fmt: skip
            fp = res["ours"]
            print(f"  fingerprint (first init_state, outside the loader): {fp['fingerprint_seconds']:.1f} s, whole "
                  f"process peak then {fp['fingerprint_peak_mb'] / fp['param_mb']:.2f}× the weights")  # fmt: skip
        for who, bf16, _, grew, peak in rows:
            print(f"peak RSS {who:5s} {'bf16' if bf16 else 'f32 '}: load + first forward grew RSS by {grew:.2f}× the "
                  f"weights (whole process peak {peak:.2f}×; goal ≤ 1.3)")  # fmt: skip
        for h in args.histories:
            ours = run_child(args, "decode", who="ours", history=h)
            hf = run_child(args, "decode", who="hf", history=h)
            ratio = hf["seconds_per_token"] / ours["seconds_per_token"]
            kind = "real" if h <= args.real_history_max else "shaped"
            print(f"decode after {h} tokens ({kind}): ours {1 / ours['seconds_per_token']:.2f} tok/s (window "
                  f"{ours['window_tokens']}), transformers {1 / hf['seconds_per_token']:.2f} tok/s (cache "
                  f"{hf['cache_tokens']}) -> ratio {ratio:.2f}")  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
