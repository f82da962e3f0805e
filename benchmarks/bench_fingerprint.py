"""Model fingerprint cost: `fingerprint_of` (chunked: float32 a bounded chunk at a time) ÷ the rules' plain definition
(each whole tensor converted to float32 and copied to bytes, then hashed), in time and in peak memory over the
weights, for float32 and bfloat16 weights. Both give the same digests (asserted). Each measurement runs in its own
subprocess so peak RSS is clean; ratios are from one run on a shared machine.

    python -m benchmarks.bench_fingerprint [--params-m 268] [--tensor-m 33]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

import torch


def _plain(cfg: object, tensors: dict[str, torch.Tensor]) -> str:
    from agentsleep.model import fingerprint as fpm

    v2 = hashlib.sha256(fpm._V2_TAG + fpm._canonical_json(cfg).encode() + b"\0")
    v1_json = fpm._v1_json(cfg)
    v1 = hashlib.sha256(v1_json.encode()) if v1_json is not None else None
    for name in sorted(tensors):
        t = tensors[name].to(torch.float32).contiguous()
        data = t.numpy().tobytes()
        v2.update(json.dumps([name, list(t.shape)]).encode() + b"\0" + data)
        if v1 is not None:
            v1.update(name.encode() + json.dumps(list(t.shape)).encode() + data)
    return f"{fpm.CURRENT_RULE}:{v2.hexdigest()[:32]}"


def _one(way: str, dtype: str, params_m: int, tensor_m: int) -> dict[str, float | str]:
    from agentsleep.model.fingerprint import fingerprint_of
    from agentsleep.model.hybrid import HybridConfig

    g = torch.Generator().manual_seed(0)
    n = max(1, params_m // tensor_m)
    tensors = {f"w{i}": torch.randn(tensor_m * 1_000_000, generator=g).to(getattr(torch, dtype)) for i in range(n)}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    cfg = HybridConfig(vocab_size=64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    digest = str(fingerprint_of(cfg, tensors)) if way == "chunked" else _plain(cfg, tensors)
    seconds = time.perf_counter() - t0
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"digest": digest, "seconds": seconds, "extra_peak": extra / weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params-m", type=int, default=268, help="weights in millions of parameters (default 268)")
    ap.add_argument("--tensor-m", type=int, default=33, help="millions of parameters per tensor (default 33)")
    ap.add_argument("--one", nargs=2, metavar=("WAY", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], args.params_m, args.tensor_m)))
        return
    print(f"{args.params_m}M parameters in tensors of {args.tensor_m}M; chunked ÷ plain (one run)")
    print("| weights | time ratio | extra peak memory ÷ weights: plain → chunked |")
    print("|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        res = {}
        for way in ("plain", "chunked"):
            cmd = [sys.executable, "-m", "benchmarks.bench_fingerprint", "--one", way, dtype,
                   "--params-m", str(args.params_m), "--tensor-m", str(args.tensor_m)]  # fmt: skip
            res[way] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        assert res["plain"]["digest"] == res["chunked"]["digest"], "chunked hashing changed the digest"
        ratio = res["chunked"]["seconds"] / res["plain"]["seconds"]
        print(f"| {dtype} | {ratio:.2f} | {res['plain']['extra_peak']:.2f} → {res['chunked']['extra_peak']:.2f} |")


if __name__ == "__main__":
    main()
