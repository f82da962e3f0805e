"""The training part of scripts/gpu_check.sh: a tiny random Qwen3.5 (made with transformers, nothing downloaded),
fine-tuned on chat data for 50 steps twice from the same seed — once on the GPU in bf16 with fla's Triton kernels, once
on the CPU in float32 with the project's own ops — and the two loss curves compared.

    python scripts/gpu_check.py --out /tmp/gpu_check              # on a CUDA host
    python scripts/gpu_check.py --out /tmp/gpu_check --device cpu # dry run: CPU bf16 autocast against CPU float32

Passes when the GPU run used fla's kernel and its loss at the last step is within ``--tol`` (2%) of the CPU run's.
Prints one JSON line (the summary the shell script reads) and writes it to ``OUT/summary.json``; exit status 0 when
it passes, 1 when it does not, 2 for a host that cannot run it (one line on stderr).

Not done here: serving this fine-tuned checkpoint. The summary lists its ``serving_problems()``; the shell script's
serving stage runs the plugin's parity tests on native and on tiny imported Qwen3.5 / Qwen3-Next / Qwen3 checkpoints
(tests/serving/test_imported.py), which cover the imported layer variants this model uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.model.hf_tiny builds the tiny checkpoint

WORDS = ("the quick brown fox jumps over lazy dog sleep consolidates window into fast weights agent wakes with fresh "
         "tools functions arguments city paris weather celsius").split()  # fmt: skip


def conversations(n: int, seed: int) -> list[dict]:
    """``n`` synthetic multi-turn conversations in the tiny tokenizer's vocabulary (several windows each)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are terse."}]
        for _turn in range(rng.randint(2, 4)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(6, 14)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 10)))})
        out.append({"messages": msgs})
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from agentsleep.model import ops
    from agentsleep.train.trainer import TrainConfig, train
    from tests.model.hf_tiny import make_hf
    from tests.runtime.chat_templates import HERMES

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "qwen35-tiny"
    make_hf("qwen3_5_text-gqa2", ckpt, seed=args.seed, chat_template=HERMES)
    data = out / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(64, args.seed)))
    base = dict(init_from=str(ckpt), data=str(data), model={"window": 64}, passes=2, steps=args.steps,
                batch_size=4, eval_every=0, log_every=1, save_every=0, warmup=5, lr_muon=1e-3, lr_adamw=1e-3,
                seed=args.seed, activation_checkpointing=True)  # fmt: skip

    calls = {"fla": 0}
    real = ops._fla_chunk

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls["fla"] += 1
        return real(*a, **kw)

    ops._fla_chunk = counting
    t0 = time.perf_counter()
    fast = train(TrainConfig(**base, device=args.device, precision="bfloat16"), out / "fast", progress=False)
    t_fast = time.perf_counter() - t0
    ops._fla_chunk = real
    t0 = time.perf_counter()
    ref = train(TrainConfig(**base, device="cpu", precision="float32"), out / "cpu", progress=False)
    t_ref = time.perf_counter() - t0
    a = [r["loss"] for r in fast["history"] if "loss" in r]
    b = [r["loss"] for r in ref["history"] if "loss" in r]
    rel = [abs(x - y) / abs(y) for x, y in zip(a, b)]
    on_gpu = args.device.startswith("cuda")
    from agentsleep.model.hybrid import SleepHybrid

    problems = SleepHybrid.from_pretrained(out / "fast").config.serving_problems()
    ok = len(a) == len(b) == args.steps and rel[-1] <= args.tol and (calls["fla"] > 0 or not on_gpu)
    where = f"{args.device} bf16"
    line = (
        f"loss at step {len(a)}: {a[-1]:.4f} ({where}) vs {b[-1]:.4f} (cpu float32), rel diff {rel[-1]:.2%} "
        f"(tol {args.tol:.0%}); fla kernel calls {calls['fla']}"
    )
    return {
        "ok": bool(ok),
        "line": line,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "fla_kernel_calls": calls["fla"],
        "steps": len(a),
        "loss_first": [a[0], b[0]],
        "loss_last": [a[-1], b[-1]],
        "rel_diff_last": rel[-1],
        "rel_diff_max": max(rel),
        "tolerance": args.tol,
        "seconds": {"bf16": round(t_fast, 1), "cpu_float32": round(t_ref, 1)},
        "serving_problems": problems,
    }


def host_blocker(device: str) -> str | None:
    """Why this host cannot run the check on ``device`` (None when it can): a CUDA run needs a GPU, fla and triton."""
    import importlib.util

    import torch

    if not device.startswith("cuda"):
        return None if device == "cpu" else f"--device must be cpu or cuda[:i], got {device!r}"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (a CPU-only build or no GPU)"
    if importlib.util.find_spec("fla") is None or importlib.util.find_spec("triton") is None:
        return "fla-core / triton are not installed (pip install -e '.[fla]')"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=0.02)
    args = p.parse_args()
    if args.steps < 1 or not 0 < args.tol < 1:
        p.error("--steps must be ≥ 1 and --tol in (0, 1)")
    blocker = host_blocker(args.device)
    if blocker:
        print(f"gpu_check.py: {blocker}; --device cpu runs the CPU-side parts", file=sys.stderr)
        sys.exit(2)
    summary = run(args)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
