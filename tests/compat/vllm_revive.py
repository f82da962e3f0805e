"""Revive agents of a 0.1.0 store in a `VLLMEngine` and answer; run in a subprocess by test_vllm.py (one vLLM engine
per process, apart from the serving suite's own).

    python -m tests.compat.vllm_revive STORE_URL CHECKPOINT CASES_JSON OUT_JSON

CASES_JSON: a list of {"agent", "snapshot_id", "prompt", "max_new_tokens"}. OUT_JSON gets, per case, the reply tokens
and their log-probs, then the id of a snapshot the engine saved for the first case's agent (its next save).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agentsleep.serving.settings import apply_env_defaults


def main(url: str, checkpoint: str, cases_file: str, out_file: str) -> None:
    apply_env_defaults()  # before vLLM is imported
    from agentsleep.runtime import SamplingParams, save_memory
    from agentsleep.serving.engine import VLLMEngine
    from agentsleep.store import SnapshotStore

    cases = json.loads(Path(cases_file).read_text())
    out: dict = {"replies": []}
    with SnapshotStore(url) as store, VLLMEngine(checkpoint, max_num_seqs=2) as engine:
        for case in cases:
            engine.revive(case["agent"], store, case["snapshot_id"])
            sp = SamplingParams(max_new_tokens=case["max_new_tokens"])
            gen = engine.generate(case["agent"], case["prompt"], sp, return_logits=True)
            out["replies"].append({"tokens": list(gen.tokens), "logprobs": gen.logits.tolist()})
            engine.remove_agent(case["agent"])
        agent = cases[0]["agent"]
        engine.revive(agent, store)
        out["saved"] = engine.checkpoint(agent, lambda m: save_memory(store, agent, m, reason="manual", passes=1).id)
    Path(out_file).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:5])
