"""The deployment config: one YAML file (or a dict of the same schema), validated once, here.

    model:       {path: DIR}  or  {random: {MoESpec fields}, seed: 0};  dtype: float32
    routing:     overrides of the model's routing spec (policy, capacity_factor, overflow, ...)
    deployment:  name, expert_groups, routers, transport, batch_max_tokens, batch_max_wait_us, batch_max_in_flight,
                 device (auto|cpu|cuda), shared_experts (router|slot), group_cpus, group_gpus,
                 router_cpus, grpc_host, huge_pages, replicas, replica_min_rows, failover, supervisor,
                 supervisor_period_s, max_replicas, hot_threshold, hot_replica_min_rate, replica_down_fraction, load_window_s,
                 rebalance_period_s, replica_down_delay_s,
                 min_groups, max_groups, target_group_tokens_per_s, scale_up_delay_s, scale_down_delay_s,
                 place_timeout_s, drain_timeout_s
    gateway:     enabled, host, port (router i serves port + i; 0 = any free port),
                 max_tokens_per_request, max_queued_tokens, max_queued_requests
    auth:        token (default: the MOE_SERVE_TOKEN environment variable)
    tls:         cert, key, client_ca (client_ca turns on mutual TLS)
    telemetry:   prometheus_port (router i: port + i; 0 any free; null off), prometheus_host,
                 otlp_endpoint, trace_sample_rate, trace_dir, window_s

Errors name the field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

from expert_workers.errors import ConfigError
from expert_workers.source import SourceSpec
from expert_workers.spec import MoESpec, RoutingSpec
from router_svc.config import FAILOVER_POLICIES, SHARED_PLACEMENTS, TRANSPORT_MODES
from router_svc.telemetry import TelemetryConfig

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str | None = None
    random: MoESpec | None = None
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.random is not None and not isinstance(self.random, MoESpec):
            raise ConfigError(field="model.random", value=self.random, expected="a mapping of MoESpec fields")
        if self.path is not None and not isinstance(self.path, str):
            raise ConfigError(field="model.path", value=self.path, expected="a directory path")
        if (self.path is None) == (self.random is None):
            raise ConfigError(field="model", value={"path": self.path, "random": self.random is not None},
                              expected="exactly one of 'path' (a Hugging Face checkpoint directory) or 'random' (MoESpec fields)")
        if self.path is not None and not os.path.isdir(self.path):
            raise ConfigError(field="model.path", value=self.path, expected="an existing checkpoint directory")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(field="model.seed", value=self.seed, expected="an integer")
        if self.dtype not in DTYPES:
            raise ConfigError(field="model.dtype", value=self.dtype, expected=f"one of {DTYPES}")

    def source(self) -> SourceSpec:
        return SourceSpec(path=self.path, random=self.random, seed=self.seed)


@dataclass(frozen=True, kw_only=True)
class DeploymentSettings:
    name: str = "moe"
    expert_groups: int = 2
    routers: int = 1
    transport: str = "auto"
    batch_max_tokens: int = 4096
    batch_max_wait_us: int = 500
    batch_max_in_flight: int = 1
    device: str = "auto"
    shared_experts: str = "router"
    # starting copies of every expert slot, on distinct groups (<= expert_groups).
    replicas: int = 1
    # an expert's rows in one batch go to at most ceil(rows / replica_min_rows) of its copies (a copy
    # reads all of the expert's weights however few rows it gets, so a few rows are not worth a second
    # read). Unset: about where a GEMM on the device stops being bound by that read (16 on CPU, 128 on CUDA).
    replica_min_rows: int | None = None
    # no live replica for one of a request's experts: wait (for the supervisor), fail (UNAVAILABLE) or drop (degraded).
    failover: str = "wait"
    # run the supervisor (replaces dead groups); off only to observe failover policies alone.
    supervisor: bool = True
    supervisor_period_s: float = 0.5
    # Ray resources per actor; a CPU group runs torch with int(group_cpus) threads (at least 1).
    group_cpus: float = 1.0
    group_gpus: float = 1.0
    router_cpus: float = 1.0
    # a group one of whose batches has computed longer than this (and than 4x the longest batch it finished)
    # reports itself unhealthy (a hung kernel or device leaves its process answering pings): routers plan
    # around it, the supervisor replaces it. Keep it above the longest honest batch (batch_max_tokens
    # tokens on the slowest group's device: a 4096-token batch of a Mixtral-8x7B layer on one CPU core
    # takes tens of seconds).
    compute_timeout_s: float | None = 60.0  # None (null): never
    # address the groups' gRPC data plane binds to (loopback, or the node's IP on a real cluster).
    grpc_host: str = "127.0.0.1"
    # CPU groups keep their weights in transparent huge pages (torch's THP allocator, Linux): a group
    # streams every active expert's weights from memory per batch, and 2 MiB pages spare it a TLB miss
    # per 4 KiB read. Takes effect where the kernel's THP mode is `madvise` or `always`.
    huge_pages: bool = True
    # hot experts: copies per expert at most (default: `replicas`, i.e. no replication); an expert
    # whose rate over `load_window_s` exceeds `hot_threshold` x its layer's mean gets more; an extra
    # copy goes after its expert stayed cool for `replica_down_delay_s`. Evaluated every `rebalance_period_s`.
    max_replicas: int | None = None
    hot_threshold: float = 2.0
    # an expert below `hot_replica_min_rate` tokens/s never counts as hot; an extra copy goes only once its
    # expert's rate is below `replica_down_fraction` x the hot line (hysteresis: no add/remove flapping).
    hot_replica_min_rate: float = 1.0
    replica_down_fraction: float = 0.75
    load_window_s: float = 10.0
    rebalance_period_s: float = 2.0
    replica_down_delay_s: float = 30.0
    # autoscaling: groups between min_groups and max_groups (default: expert_groups, i.e. fixed), aiming at
    # `target_group_tokens_per_s` (token-expert assignments per group per second; 0: off), with delays.
    min_groups: int | None = None
    max_groups: int | None = None
    target_group_tokens_per_s: float = 0.0
    scale_up_delay_s: float = 5.0
    scale_down_delay_s: float = 30.0
    # a new group not placed after this long asks Ray's autoscaler for room (request_resources).
    place_timeout_s: float = 10.0
    # a removed copy or group is unloaded once routers finished batches planned before, or after this.
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        p = "deployment."
        for name in ("hot_threshold", "replica_down_delay_s", "target_group_tokens_per_s", "scale_up_delay_s", "scale_down_delay_s",
                     "place_timeout_s", "drain_timeout_s", "hot_replica_min_rate", "replica_down_fraction"):
            _number(p + name, getattr(self, name), minimum=0.0)
        # NOTE: a period of 0 spins the supervisor's loop (or, for the load window, leaves no span to
        # measure a rate over); every period, delay and timeout is finite, since they end up as
        # `Event.wait`/`ray.get` timeouts, which overflow on inf.
        for name in ("supervisor_period_s", "rebalance_period_s", "load_window_s"):
            _number(p + name, getattr(self, name), minimum=0.0, strict=True)
        if self.replica_down_fraction > 1:
            raise ConfigError(field=p + "replica_down_fraction", value=self.replica_down_fraction, expected="a number in [0, 1]")
        for name in ("max_replicas", "min_groups", "max_groups", "replica_min_rows"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(field=p + name, value=v, expected="an integer >= 1 (or unset)")
        if not isinstance(self.name, str) or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(field=p + "name", value=self.name, expected="letters, digits, '-' or '_'")
        for name in ("expert_groups", "routers", "batch_max_tokens", "batch_max_in_flight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field=p + name, value=v, expected="an integer >= 1")
        v = self.batch_max_wait_us
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(field=p + "batch_max_wait_us", value=v, expected="an integer >= 0")
        if self.transport not in TRANSPORT_MODES:
            raise ConfigError(field=p + "transport", value=self.transport, expected=f"one of {TRANSPORT_MODES}")
        if self.device not in DEVICES:
            raise ConfigError(field=p + "device", value=self.device, expected=f"one of {DEVICES}")
        if self.shared_experts not in SHARED_PLACEMENTS:
            raise ConfigError(field=p + "shared_experts", value=self.shared_experts, expected=f"one of {SHARED_PLACEMENTS}")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or not 1 <= self.replicas <= self.expert_groups:
            raise ConfigError(field=p + "replicas", value=self.replicas, expected=f"an integer in [1, expert_groups={self.expert_groups}]")
        if self.failover not in FAILOVER_POLICIES:
            raise ConfigError(field=p + "failover", value=self.failover, expected=f"one of {FAILOVER_POLICIES}")
        for name in ("group_cpus", "group_gpus", "router_cpus"):
            _number(p + name, getattr(self, name), minimum=0.0)
        v = self.compute_timeout_s
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ConfigError(field=p + "compute_timeout_s", value=v, expected="a finite number of seconds > 0, or null (never)")
        if not isinstance(self.huge_pages, bool):
            raise ConfigError(field=p + "huge_pages", value=self.huge_pages, expected="a bool")
        if self.max_replicas is not None and not self.replicas <= self.max_replicas:
            raise ConfigError(field=p + "max_replicas", value=self.max_replicas, expected=f"at least replicas={self.replicas}")
        lo, hi = self.group_range
        if lo < self.replicas:
            raise ConfigError(field=p + "min_groups", value=lo, expected=f"at least replicas={self.replicas} (copies sit on distinct groups)")
        if not lo <= self.expert_groups <= hi:
            raise ConfigError(field=p + "min_groups" if lo > self.expert_groups else p + "max_groups", value=lo if lo > self.expert_groups else hi,
                              expected=f"min_groups <= expert_groups={self.expert_groups} <= max_groups")

    @property
    def group_range(self) -> tuple[int, int]:
        """(min_groups, max_groups) with unset ends at expert_groups."""
        return (self.expert_groups if self.min_groups is None else self.min_groups,
                self.expert_groups if self.max_groups is None else self.max_groups)

    def elastic(self) -> "ElasticPolicy":
        """The supervisor's policy: every knob of the same name, with unset ends resolved."""
        lo, hi = self.group_range
        same = {f.name: getattr(self, f.name) for f in fields(ElasticPolicy) if hasattr(self, f.name)}
        return ElasticPolicy(**{**same, "max_replicas": self.replicas if self.max_replicas is None else self.max_replicas,
                                "min_groups": lo, "max_groups": hi})


@dataclass(frozen=True, kw_only=True)
class ElasticPolicy:
    """The supervisor's knobs for replicas and groups (see DeploymentSettings for their meaning)."""

    max_replicas: int = 1
    hot_threshold: float = 2.0
    hot_replica_min_rate: float = 1.0
    replica_down_fraction: float = 0.75
    load_window_s: float = 10.0
    rebalance_period_s: float = 2.0
    replica_down_delay_s: float = 30.0
    min_groups: int = 1
    max_groups: int = 1
    target_group_tokens_per_s: float = 0.0
    scale_up_delay_s: float = 5.0
    scale_down_delay_s: float = 30.0
    place_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0


def _number(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    """A finite int or float >= `minimum` (> `minimum` when `strict`); NaN and inf are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < minimum or (strict and value == minimum):
        raise ConfigError(field=name, value=value, expected=f"a finite number {'>' if strict else '>='} {minimum:g}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 50051
    max_tokens_per_request: int = 65536
    max_queued_tokens: int = 262144
    # requests admitted but not answered (bounds memory and per-request work when requests are tiny)
    max_queued_requests: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(field="gateway.enabled", value=self.enabled, expected="a bool")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(field="gateway.host", value=self.host, expected="a host name or IP address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(field="gateway.port", value=self.port, expected="an integer in [0, 65535] (0: any free port)")
        for name in ("max_tokens_per_request", "max_queued_tokens", "max_queued_requests"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(field=f"gateway.{name}", value=v, expected="an integer >= 1")
        # NOTE: a request above the queue bound is refused as back-pressure however empty the queue is,
        # so requests between the two limits could never be admitted.
        if self.max_queued_tokens < self.max_tokens_per_request:
            raise ConfigError(field="gateway.max_queued_tokens", value=self.max_queued_tokens,
                              expected=f"at least max_tokens_per_request={self.max_tokens_per_request} "
                                       "(a request of max_tokens_per_request tokens must fit in an empty queue)")


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    token: str | None = None

    def __post_init__(self) -> None:
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 8):
            raise ConfigError(field="auth.token", value="<hidden>", expected="a string of at least 8 characters")


@dataclass(frozen=True, kw_only=True)
class TLSSettings:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(field="tls.cert" if self.cert is None else "tls.key", value=None,
                              expected="both tls.cert and tls.key, or neither")
        if self.client_ca is not None and self.cert is None:
            raise ConfigError(field="tls.client_ca", value=self.client_ca, expected="tls.cert and tls.key as well (mutual TLS)")
        for name in ("cert", "key", "client_ca"):
            v = getattr(self, name)
            if v is not None and not os.path.isfile(v):
                raise ConfigError(field=f"tls.{name}", value=v, expected="an existing PEM file")


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    model: ModelConfig
    routing: Mapping[str, Any] = field(default_factory=dict)
    deployment: DeploymentSettings = field(default_factory=DeploymentSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        # NOTE: secure by default: a gateway reachable beyond this machine must demand a token.
        if self.gateway.enabled and self.gateway.host not in LOOPBACK and self.auth.token is None:
            raise ConfigError(field="auth.token", value=None,
                              expected=f"a token when gateway.host ({self.gateway.host}) is not loopback")
        # NOTE: router i serves port + i; grpc and the metrics server bind a port past 65535 as any free port, silently.
        routers = self.deployment.routers
        ports = (("gateway.port", self.gateway.port if self.gateway.enabled else None),
                 ("telemetry.prometheus_port", self.telemetry.prometheus_port))
        for name, port in ports:
            if port and port + routers - 1 > 65535:
                raise ConfigError(field=name, value=port, expected=f"at most {65536 - routers} with deployment.routers={routers} "
                                                                   "(router i serves port + i), or 0 (any free port)")

    def routing_spec(self, base: RoutingSpec) -> RoutingSpec | None:
        """The model's routing spec with this config's overrides; None when there are none."""
        return dataclasses.replace(base, **self.routing) if self.routing else None


def _section(cls: type, data: Any, name: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(field=name, value=data, expected="a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(field=f"{name}.{key}", value=data[key], expected=f"no such field; known fields: {sorted(known)}")
    return data


def load_config(config: str | os.PathLike[str] | Mapping[str, Any] | ServiceConfig) -> ServiceConfig:
    """A YAML path or a dict -> ServiceConfig, or a ConfigError naming the first bad field."""
    if isinstance(config, ServiceConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config, encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(field="config", value=os.fspath(config), expected="an existing YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(field="config", value=os.fspath(config), expected=f"valid YAML ({e})") from None
        except OSError as e:
            raise ConfigError(field="config", value=os.fspath(config), expected=f"a readable YAML file ({e.strerror})") from None
    if not isinstance(config, Mapping):
        raise ConfigError(field="config", value=config, expected="a mapping with 'model', 'routing', 'deployment'")
    sections = ("model", "routing", "deployment", "gateway", "auth", "tls", "telemetry")
    for key in config:
        if key not in sections:
            raise ConfigError(field=str(key), value=config[key], expected=f"one of the sections {sections}")
    m = dict(_section(ModelConfig, config.get("model"), "model"))
    if isinstance(m.get("random"), Mapping):
        m["random"] = MoESpec.from_dict(m["random"])
    model = ModelConfig(**m)
    routing = dict(_section(RoutingSpec, config.get("routing"), "routing"))
    deployment = DeploymentSettings(**_section(DeploymentSettings, config.get("deployment"), "deployment"))
    gateway = GatewaySettings(**_section(GatewaySettings, config.get("gateway"), "gateway"))
    auth = dict(_section(AuthSettings, config.get("auth"), "auth"))
    auth.setdefault("token", os.environ.get("MOE_SERVE_TOKEN") or None)
    tls = TLSSettings(**_section(TLSSettings, config.get("tls"), "tls"))
    telemetry = TelemetryConfig(**_section(TelemetryConfig, config.get("telemetry"), "telemetry"))
    cfg = ServiceConfig(model=model, routing=routing, deployment=deployment, gateway=gateway,
                        auth=AuthSettings(**auth), tls=tls, telemetry=telemetry)
    if model.random is not None and routing:
        dataclasses.replace(model.random, routing=cfg.routing_spec(model.random.routing))  # validates now
    return cfg
