"""Expert workers: model spec, weights (checkpoints, seeded random), and expert compute.

The bottom of the import graph: cluster -> router_svc -> expert_workers.
"""

from expert_workers.errors import (
    BackPressureError,
    CheckpointError,
    ConfigError,
    ExpertUnavailableError,
    InvalidRequestError,
    MoEServeError,
)
from expert_workers.spec import MoESpec, RoutingSpec, SharedExpertSpec

__all__ = [
    "BackPressureError", "CheckpointError", "ConfigError", "ExpertUnavailableError",
    "InvalidRequestError", "MoEServeError", "MoESpec", "RoutingSpec", "SharedExpertSpec",
]
