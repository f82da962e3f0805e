"""vLLM general plugin (entry point ``vllm.general_plugins: agentsleep``): makes vLLM understand agentsleep checkpoints.

vLLM calls `register` in every process it starts (API server, engine core, workers), so it must be cheap and
re-entrant: it registers the architecture lazily as a ``"module:Class"`` string (the model module, which imports vLLM
layers, is imported only when a checkpoint asks for it) and the transformers config class for
``model_type="agentsleep_hybrid"`` (vLLM parses ``config.json`` through transformers' ``AutoConfig``).

In the processes of ``agentsleep serve`` (``AGENTSLEEP_SERVE_PID`` is set) it also ties every child process vLLM
starts to its parent with Linux's parent-death signal (``PR_SET_PDEATHSIG`` = SIGKILL): vLLM's engine core runs in a
child process that would otherwise outlive a server killed with SIGKILL, holding its memory (and a GPU) forever.
Forked children get it from an ``os.register_at_fork`` hook registered in the server; spawned ones set it themselves
when they load this plugin.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from agentsleep.model.checkpoint import ARCHITECTURE, MODEL_TYPE
from agentsleep.serving.settings import SERVE_PID_ENV

logger = logging.getLogger(__name__)

MODEL_CLASS = "agentsleep.serving.model:SleepHybridForCausalLM"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_tied = False
_forking_parent = 0  # the pid of the process that is forking (set by the at-fork hook, read by the child)


def register() -> None:
    """Register `SleepHybridForCausalLM` with vLLM's `ModelRegistry` and its config with `AutoConfig` (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from agentsleep.serving.config import SleepHybridHFConfig

    tie_children_to_server()
    AutoConfig.register(MODEL_TYPE, SleepHybridHFConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
        logger.debug("registered %s -> %s with vLLM", ARCHITECTURE, MODEL_CLASS)


def die_with_parent(parent: int | None = None) -> bool:
    """Ask Linux to SIGKILL this process when its parent exits; exit now if ``parent`` is already gone (the signal
    would never come). False where the platform has no parent-death signal."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        return False
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the parent died before the signal was armed
    return True


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_forking_parent)


def tie_children_to_server() -> None:
    """In ``agentsleep serve`` (``AGENTSLEEP_SERVE_PID`` set): make vLLM's child processes die with their parent."""
    global _tied
    server = os.environ.get(SERVE_PID_ENV)
    if _tied or not server or not server.isdigit() or not sys.platform.startswith("linux"):
        return
    _tied = True
    if os.getpid() == int(server):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        return
    die_with_parent()  # a spawned child: armed now; a server that died before this leaves no parent to wait for
    if os.getppid() != int(server) and not _alive(int(server)):
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["MODEL_CLASS", "die_with_parent", "register", "tie_children_to_server"]
