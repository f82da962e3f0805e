"""Run as a script by test_imported.py (one vLLM engine per process, the tested configuration): the greedy parity
checks of test_parity.py and test_engine.py on a tiny imported checkpoint, against the float32 reference and
`TorchEngine`. Prints one line ``RESULT {json}``.

    python tests/serving/imported_parity.py CASE WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agentsleep.serving.settings import apply_env_defaults

apply_env_defaults()

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(case: str, root: Path) -> None:
    import torch

    from agentsleep.model.hybrid import SleepHybrid
    from agentsleep.runtime import SamplingParams, TorchEngine
    from agentsleep.serving.engine import VLLMEngine
    from tests.serving.helpers import (
        dense_logprobs,
        explained_by_rounding,
        first_divergence,
        noise_state,
        rand_tokens,
        raw_generate,
        ref_forced,
        ref_greedy,
    )
    from tests.serving.imported import WINDOW, build_imported

    path = build_imported(case, root)
    reference = SleepHybrid.from_pretrained(path)
    cfg = reference.config
    V, bos = cfg.vocab_size, int(cfg.bos_token_id)  # type: ignore[arg-type]
    has_gdn = "g" in cfg.layout
    fp32 = not has_gdn  # vLLM runs attention-only models in float32 on CPU too
    result: dict = {"case": case, "layout": cfg.layout, "mlp": cfg.mlp_kinds, "dtype": "float32" if fp32 else "bf16"}
    if has_gdn:  # precondition of every restore check (spec §8.7): S decides what comes out
        W = rand_tokens(12, 1)
        zero, _ = ref_greedy(reference, reference.init_state(1), W, 8)
        noisy, _ = ref_greedy(reference, noise_state(reference), W, 8)
        result["state_matters"] = zero != noisy
    engine = VLLMEngine(path, state_dir=root / "vllm-state", max_num_seqs=4, dtype="float32" if fp32 else "bfloat16")
    try:
        # 1. restored states: teacher-forced log-probs and greedy tokens against the float32 reference
        kinds = ("zero", "slept", "noise") if has_gdn else ("zero",)
        worst, cases, agree, unexplained = 0.0, 0, 0, []
        for kind in kinds:
            if kind == "zero":
                S = reference.init_state(1)
            elif kind == "slept":
                S = reference.sleep(torch.tensor([rand_tokens(WINDOW, 3)]), reference.init_state(1), 2)
            else:
                S = noise_state(reference)
            sid = engine.states.save(f"parity-{kind}", S, [], reason="manual").id
            for seed in range(10, 15):
                W = rand_tokens(3 + 4 * (seed - 10), seed)
                out = raw_generate(engine, [bos, *W], {"agent_id": f"parity-{kind}", "snapshot_id": sid}, 10,
                                   logprobs=V)  # fmt: skip
                assert out.num_cached_tokens == 1, "the header was not restored"
                assert "error" not in (out.kv_transfer_params or {}), out.kv_transfer_params
                got = list(out.outputs[0].token_ids)
                want, _ = ref_greedy(reference, S, W, 10)
                ours, theirs = dense_logprobs(out, V), ref_forced(reference, S, W, got)
                worst = max(worst, float((ours - theirs).abs().max()))
                if not explained_by_rounding(got, want, ours, theirs):
                    unexplained.append({"kind": kind, "seed": seed, "got": got, "want": want})
                cases += 1
                agree += first_divergence(got, want) >= 8
        result.update(worst_logprob_error=worst, cases=cases, agree_first_8=agree, unexplained=unexplained)

        # 2. VLLMEngine against TorchEngine: turns across window-full sleeps, each from the same (vLLM's) memory
        torch_engine = TorchEngine(reference)
        engine.create_agent("turns")
        plan = [(7, 10), (12, 9), (20, 12), (3, 40), (45, 6), (1, 1)]
        equal, turn_failures = 0, []
        for i, (n_prompt, n_new) in enumerate(plan):
            torch_engine.import_state(f"turns-{i}", engine.export_state("turns"))
            prompt = rand_tokens(n_prompt, 100 + i)
            sp = SamplingParams(max_new_tokens=n_new)
            ours_gen = engine.generate("turns", prompt, sp, return_logits=True)
            ref_gen = torch_engine.generate(f"turns-{i}", prompt, sp, return_logits=True)
            same = explained_by_rounding(list(ours_gen.tokens), list(ref_gen.tokens), ours_gen.logits,
                                         torch.log_softmax(ref_gen.logits, -1))  # fmt: skip
            if not same:
                turn_failures.append({"turn": i, "got": list(ours_gen.tokens), "want": list(ref_gen.tokens)})
            if ours_gen.tokens == ref_gen.tokens:
                a, b = engine.export_state("turns"), torch_engine.export_state(f"turns-{i}")
                if (ours_gen.sleeps, a.window, a.sleep_count) != (ref_gen.sleeps, b.window, b.sleep_count) or not (
                    a.state.allclose(b.state, rtol=1e-4, atol=1e-4)
                ):
                    turn_failures.append({"turn": i, "error": "same tokens, different memory"})
                equal += 1
        result.update(turns=len(plan), equal_turns=equal, turn_failures=turn_failures,
                      sleeps=engine.session("turns").sleep_count)  # fmt: skip
    finally:
        engine.close()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
