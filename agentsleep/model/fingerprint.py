"""Model fingerprints: which model a fast-weight state belongs to, stable across agentsleep releases.

Every state (`FastWeights.fingerprint`) and every snapshot carries the fingerprint of the model that made it, and
everything that hands a state to a model checks it (store loads and saves, sleep-job claims, engine imports, the vLLM
connector). A fingerprint must therefore change exactly when the computation changes, not when agentsleep's config
class grows a field. Two rules exist (docs/store.md, "Fingerprints", states them precisely):

* **v1** (agentsleep 0.1.0): the first 32 hex digits of sha256 over ``HybridConfig.model_dump_json()`` (all fields,
  in declaration order) followed by every weight. No prefix. Frozen here as `V1_FIELDS` + `_v1_json`, so a later
  release computes the same string for the same model even though its config class has more fields; a model that
  sets a post-0.1.0 field to a non-default value has no v1 fingerprint (0.1.0 could not have made it).
* **v2** (current, ``"v2:" + 32 hex``): sha256 over a domain tag, the canonical JSON of the *computational* config
  values that differ from their field defaults (`canonical_config`), and every weight. A field added later leaves
  every fingerprint unchanged as long as it sits at its default.

A model answers to its current fingerprint and to its legacy ones (`Fingerprint.aliases`): a state or snapshot
tagged with any of them is the same model's. `accepts` is the one comparison every call site uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from agentsleep.errors import SnapshotMismatch

CURRENT_RULE = "v2"
RULES = ("v1", "v2")  # every rule this code can compute, oldest first
_V2_TAG = b"agentsleep.fingerprint/v2\0"

# The HybridConfig fields of agentsleep 0.1.0, in declaration order: the v1 recipe hashes exactly these. Never edit.
V1_FIELDS: tuple[str, ...] = (
    "vocab_size", "d_model", "layout", "attn_heads", "attn_kv_heads", "attn_head_dim", "gdn_heads", "gdn_v_heads",
    "gdn_head_dim", "gdn_v_head_dim", "conv_size", "intermediate_size", "window", "eviction", "passes", "rope_theta",
    "norm_eps", "qk_norm", "bos_token_id", "pad_token_id", "tie_embeddings", "init_std",
)  # fmt: skip

# Config fields that cannot change what a model with given weights computes, so v2 leaves them out. Every other field
# is computational (the safe default for a field nobody classified). See docs/store.md for the argument per field.
NOT_COMPUTATIONAL: frozenset[str] = frozenset(
    {
        "init_std",  # only draws the initial weights; the weights themselves are hashed
        "tie_embeddings",  # tied or not, the forward pass reads embed_tokens.weight and lm_head.weight, both hashed
        # validation only (fields of the pretrained-import work, issue 12): they decide what a config may be, never
        # what it computes
        "check_serving",  # whether construction refuses head sizes vLLM's CPU kernels cannot serve
        "max_attention_span",  # the span the attention layers were trained on: only bounds the window
    }
)

_V1_HEX = re.compile(r"[0-9a-f]{32}")
_RULE_PREFIX = re.compile(r"(v[0-9]+):")


class Fingerprint(str):
    """A model's current fingerprint (an ordinary ``str`` for comparing, hashing, printing and storing) that also
    knows the legacy fingerprints of the same model (``aliases``, e.g. its v1 fingerprint)."""

    aliases: tuple[str, ...]

    def __new__(cls, value: str, aliases: Iterable[str] = ()) -> Fingerprint:
        self = super().__new__(cls, value)
        self.aliases = tuple(a for a in dict.fromkeys(str(a) for a in aliases) if a and a != value)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fingerprint, (str(self), self.aliases))

    @property
    def accepted(self) -> tuple[str, ...]:
        """The current fingerprint, then every legacy alias."""
        return (str(self), *self.aliases)


def rule_of(fingerprint: str) -> str:
    """The rule version a fingerprint was made under: "v1" (32 bare hex digits), "v2", ..., or "unknown"."""
    if _V1_HEX.fullmatch(fingerprint):
        return "v1"
    m = _RULE_PREFIX.match(fingerprint)
    return m.group(1) if m else "unknown"


def accepted(expected: str) -> tuple[str, ...]:
    """Every fingerprint a model whose fingerprint is ``expected`` answers to (a plain str answers to itself only)."""
    return expected.accepted if isinstance(expected, Fingerprint) else (str(expected),)


def accepts(expected: str, actual: str) -> bool:
    """True if something tagged ``actual`` was made by the model whose fingerprint is ``expected`` (or an alias)."""
    return actual in accepted(expected)


def mismatch(expected: str, actual: str, subject: str) -> SnapshotMismatch:
    """The error for ``subject`` (e.g. "snapshot 5599..."), made by model ``actual``, offered to model ``expected``:
    it names both fingerprints with their rule versions and says what to do. (Plain `SnapshotMismatch`, not a
    subclass: job errors and connector reports print the class name, and tools match on it.)"""
    ours = accepted(expected)
    mine = ", also ".join(f"{fp!r} (rule {rule_of(fp)})" for fp in ours)
    theirs = rule_of(actual)
    known = [RULES.index(rule_of(fp)) for fp in ours if rule_of(fp) in RULES]
    if theirs not in RULES and _RULE_PREFIX.match(actual):
        why = (
            f"fingerprint rule {theirs} is newer than this agentsleep knows (up to {CURRENT_RULE}); upgrade agentsleep "
            "to load it"
        )
    elif theirs in RULES and known and max(known) < RULES.index(theirs):
        why = (
            "this side knows its model only by an older rule's fingerprint and cannot tell whether the model is the "
            f"same; compare with the model's own `SleepHybrid.fingerprint` (rule {CURRENT_RULE}, which carries the "
            "model's older fingerprints)"
        )
    elif theirs in RULES and theirs not in {rule_of(fp) for fp in ours}:
        why = (
            f"this model has no {theirs} fingerprint (its config sets a value agentsleep did not have while rule "
            f"{theirs} was current), so it cannot be the model that saved it; revive it with the checkpoint that saved "
            "it, or start a new agent for this model"
        )
    else:
        why = (
            "they compute different things (other weights, or a config value that changes the forward pass); revive "
            "it with the checkpoint that saved it, or start a new agent (or fork) for this model"
        )
    return SnapshotMismatch(f"{subject} was made by model {actual!r} (rule {theirs}), not by this model {mine}: {why}")


# ---------------------------------------------------------------------------------------------------- computing


def fingerprint_of(config: BaseModel, tensors: Mapping[str, Tensor]) -> Fingerprint:
    """The current (v2) fingerprint of a model with ``config`` and weights ``tensors`` (name -> tensor, any shape,
    device or dtype; hashed as float32), carrying its v1 fingerprint as an alias where the model has one."""
    v1_json = _v1_json(config)
    v2 = hashlib.sha256(_V2_TAG + _canonical_json(config).encode() + b"\0")
    v1 = hashlib.sha256(v1_json.encode()) if v1_json is not None else None
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        shape = list(t.shape)
        data = t.numpy().tobytes()
        v2.update(json.dumps([name, shape]).encode() + b"\0")
        v2.update(data)
        if v1 is not None:
            v1.update(name.encode())
            v1.update(json.dumps(shape).encode())
            v1.update(data)
    current = f"{CURRENT_RULE}:{v2.hexdigest()[:32]}"
    return Fingerprint(current, [v1.hexdigest()[:32]] if v1 is not None else [])


def canonical_config(config: BaseModel) -> dict[str, Any]:
    """The config values v2 hashes: computational fields (not in `NOT_COMPUTATIONAL`) whose value differs from the
    field's declared default, as JSON values. A field at its default is left out, so adding a field changes nothing."""
    fields = type(config).model_fields
    dumped = config.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, info in fields.items():
        if name in NOT_COMPUTATIONAL:
            continue
        if info.is_required() or getattr(config, name) != info.get_default(call_default_factory=True):
            out[name] = dumped[name]
    return out


def _canonical_json(config: BaseModel) -> str:
    return json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _v1_json(config: BaseModel) -> str | None:
    """``model_dump_json()`` as agentsleep 0.1.0 produced it for this config, or None if 0.1.0 could not have made
    this model (a later field set to a non-default value, or a 0.1.0 field gone or of another type)."""
    fields = type(config).model_fields
    for name, info in fields.items():
        if name not in V1_FIELDS and getattr(config, name) != info.get_default(call_default_factory=True):
            return None
    parts = []
    for name in V1_FIELDS:
        if name not in fields:
            return None
        value = _v1_value(getattr(config, name))
        if value is None:
            return None
        parts.append(f"{json.dumps(name)}:{value}")
    return "{" + ",".join(parts) + "}"


def _v1_value(v: object) -> str | None:
    """One value as pydantic-core's JSON serializer wrote it in 0.1.0 (None for a type 0.1.0 had no field of)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return json_float(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return None


def json_float(x: float) -> str:
    """A float the way pydantic-core's JSON serializer writes it (the v1 recipe's format; Python's ``repr`` differs).

    The digits are the shortest that round-trip (as ``repr``); the layout follows ryu: plain decimals while the
    decimal exponent ``kk`` (value = 0.d1d2... x 10^kk) is in -5 < kk <= 16, else ``d.ddde±x``; integral values keep
    a ``.0``; NaN and infinities are ``null`` (pydantic's default ``ser_json_inf_nan``). Subnormal floats (never in
    a config) follow ``repr``, which is wrong for them while the FPU flushes denormals (``torch.set_flush_denormal``).
    """
    if math.isnan(x) or math.isinf(x):
        return "null"
    if x == 0.0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits, k = (whole + frac).lstrip("0"), (int(exp) if exp else 0) - len(frac)  # value = int(digits) * 10^k
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    digits = stripped
    n = len(digits)
    kk = n + k
    if 0 <= k and kk <= 16:
        body = digits + "0" * k + ".0"
    elif 0 < kk <= 16:
        body = f"{digits[:kk]}.{digits[kk:]}"
    elif -5 < kk <= 0:
        body = "0." + "0" * -kk + digits
    else:
        body = (digits if n == 1 else f"{digits[0]}.{digits[1:]}") + f"e{kk - 1:+d}"
    return sign + body


# ---------------------------------------------------------------------------------------------------- checkpoints


def recorded_fingerprint(config: Mapping[str, Any] | object) -> Fingerprint | None:
    """The fingerprint a checkpoint's ``config.json`` records (a dict, or an object with attributes, e.g. the
    Hugging Face config vLLM parsed), if it was written under the current rule; None otherwise (a checkpoint saved by
    agentsleep 0.1.0 records a v1 fingerprint: hash its weights instead, `SleepHybrid.fingerprint`)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    fp, aliases = get("fingerprint"), get("fingerprint_aliases") or ()
    if not isinstance(fp, str) or rule_of(fp) != CURRENT_RULE or not isinstance(aliases, list | tuple):
        return None
    return Fingerprint(fp, [a for a in aliases if isinstance(a, str)])


def checkpoint_fingerprint(path: str | Path) -> Fingerprint:
    """The fingerprint of the checkpoint directory at ``path``, computed from its weights (verified against what its
    ``config.json`` records). Raises `CheckpointError` for a broken checkpoint."""
    from agentsleep.model.checkpoint import load_checkpoint  # the model only here: importers stay light

    return load_checkpoint(Path(path)).fingerprint


__all__ = [
    "CURRENT_RULE",
    "NOT_COMPUTATIONAL",
    "RULES",
    "V1_FIELDS",
    "Fingerprint",
    "accepted",
    "accepts",
    "canonical_config",
    "checkpoint_fingerprint",
    "fingerprint_of",
    "json_float",
    "mismatch",
    "recorded_fingerprint",
    "rule_of",
]
