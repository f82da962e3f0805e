"""Run as a script by test_parity.py: an attention-only twin in float32 on vLLM against the reference (prints the max
log-prob error). A separate process: one vLLM engine per process is the tested configuration."""

from __future__ import annotations

import sys
from pathlib import Path

from agentsleep.serving.settings import apply_env_defaults

apply_env_defaults()

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.serving.helpers import BOS, VOCAB, dense_logprobs, gpu_share, make_model, rand_tokens, ref_forced  # noqa: E402


def main(path: str) -> None:
    import torch
    from vllm import LLM, SamplingParams

    gpu: dict = {}
    if torch.cuda.is_available():  # float32 means float32 (no TF32), and a share of a GPU other tests also use
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        gpu = {"gpu_memory_utilization": gpu_share()}
    model = make_model(0, layout="aa")
    model.save_pretrained(path)
    llm = LLM(model=path, skip_tokenizer_init=True, distributed_executor_backend="uni", enforce_eager=True,
              kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False, dtype="float32", max_model_len=34,
              max_logprobs=VOCAB, **gpu)  # fmt: skip
    worst = 0.0
    for seed in range(10, 14):
        W = rand_tokens(3 + 5 * (seed - 10), seed)
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=VOCAB)
        out = llm.generate([{"prompt_token_ids": [BOS, *W]}], sp, use_tqdm=False)[0]
        got = list(out.outputs[0].token_ids)
        worst = max(worst, float((dense_logprobs(out) - ref_forced(model, model.init_state(1), W, got)).abs().max()))
    print(f"MAX_LOGPROB_ERROR {worst}")


if __name__ == "__main__":
    main(sys.argv[1])
