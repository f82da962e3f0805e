"""The sleep hybrid: ops, layers, model, fast-weight state."""

from agentsleep.model.fingerprint import Fingerprint, accepts
from agentsleep.model.hybrid import HybridConfig, SleepHybrid, WindowCache, fingerprint_of
from agentsleep.model.ops import gated_delta_rule, gated_delta_rule_reference
from agentsleep.model.state import FastWeights

__all__ = [
    "FastWeights",
    "Fingerprint",
    "HybridConfig",
    "SleepHybrid",
    "WindowCache",
    "accepts",
    "fingerprint_of",
    "gated_delta_rule",
    "gated_delta_rule_reference",
]
