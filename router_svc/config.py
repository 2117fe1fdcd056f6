"""Data-plane settings a Router runs with (validated where the deployment config enters)."""

from __future__ import annotations

from dataclasses import dataclass

from expert_workers.errors import ConfigError

TRANSPORT_MODES = ("auto", "rdt", "object_store", "grpc")
SHARED_PLACEMENTS = ("router", "slot")
FAILOVER_POLICIES = ("wait", "reroute", "fail", "drop")


@dataclass(frozen=True, kw_only=True)
class DataPlaneConfig:
    transport: str = "auto"
    # a batch closes at this many tokens, at once when no batch of its layer is in flight,
    # `batch_max_wait_us` after its first request while fewer than `batch_max_in_flight` batches
    # of its layer are in flight, else when one of them finishes (batching while busy).
    batch_max_tokens: int = 4096
    batch_max_wait_us: int = 500
    batch_max_in_flight: int = 1
    # resolved device of the expert groups: "cpu" or "cuda".
    device: str = "cpu"
    dtype: str = "float32"
    # where shared experts run: in the router, or as a slot on an expert group.
    shared_experts: str = "router"
    # NOTE: an actor can be in one collective group per backend, and only the group's
    # creator may submit its RDT tasks, so one router per deployment owns the RDT path;
    # the others use the object store and gRPC.
    rdt_owner: bool = True
    # no live replica for an expert: "wait" for the supervisor to restore one, "reroute" to the
    # token's next-best live expert (weight kept, tokens reported as degraded), "fail" the
    # request (UNAVAILABLE), or "drop" those assignments (tokens reported as degraded).
    failover: str = "wait"
    # how long `wait` holds a batch for the supervisor to restore a host.
    failover_wait_s: float = 60.0
    # an expert's rows in one batch go to at most ceil(rows / replica_min_rows) of its copies: each copy
    # reads all of the expert's weights however few rows it gets (see dispatch.split_copies).
    replica_min_rows: int = 16
    # admission limits: one request's tokens, and tokens admitted but not yet answered.
    max_tokens_per_request: int = 65536
    max_queued_tokens: int = 262144
    # requests admitted but not yet answered. NOTE: each costs the router ~12 KiB and per-request
    # work in its batch beside its tokens, so many tiny requests stay bounded (4096 ~ 50 MiB).
    max_queued_requests: int = 4096

    def __post_init__(self) -> None:
        p = "deployment."
        if self.transport not in TRANSPORT_MODES:
            raise ConfigError(field=p + "transport", value=self.transport, expected=f"one of {TRANSPORT_MODES}")
        for name in ("max_tokens_per_request", "max_queued_tokens", "max_queued_requests", "batch_max_in_flight", "replica_min_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field=("gateway." if name.startswith("max_") else "deployment.") + name, value=v, expected="an integer >= 1")
        for name in ("batch_max_tokens", "batch_max_wait_us"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "batch_max_tokens" else 0):
                raise ConfigError(field=p + name, value=v, expected="an integer >= 1" if name == "batch_max_tokens" else "an integer >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(field=p + "device", value=self.device, expected="'cpu' or 'cuda' once resolved")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(field="model.dtype", value=self.dtype, expected="one of ('float32', 'float16', 'bfloat16')")
        if self.failover not in FAILOVER_POLICIES:
            raise ConfigError(field=p + "failover", value=self.failover, expected=f"one of {FAILOVER_POLICIES}")
        if self.shared_experts not in SHARED_PLACEMENTS:
            raise ConfigError(field=p + "shared_experts", value=self.shared_experts, expected=f"one of {SHARED_PLACEMENTS}")
