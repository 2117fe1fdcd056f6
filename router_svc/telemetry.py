"""OpenTelemetry metrics and traces of a router (and the spans of expert groups).

Metrics go through the OpenTelemetry SDK to a Prometheus endpoint per router (`prometheus_port`
+ router index; 0: any free port) and, when `otlp_endpoint` is set and the OTLP exporter is
installed, to OTLP as well. Names as Prometheus shows them (counters get `_total`):

  moe_requests_total{status}                  moe_batches_total{transport}
  moe_tokens_total{layer,expert,outcome}      outcome: routed (the gate's demand) | degraded (tokens, expert *)
  moe_tokens_dropped_total{layer}             moe_tokens_rerouted_total{layer}
  moe_stage_seconds{stage}                    histogram; stage: queue | gate | dispatch | expert | combine | total
                                              (expert: the slowest group's compute, object store and gRPC paths)
  moe_batch_requests, moe_batch_tokens        histograms
  moe_expert_replicas{layer,expert}           moe_groups, moe_groups_alive, moe_routing_table_version
  moe_failovers_total                         dispatches retried around a dead group
  moe_recovery_seconds                        histogram, from the supervisor's failover events
  moe_scaling_events_total{kind}              the supervisor's events, by kind
  moe_layer_entropy{layer}                    utilisation entropy / log(E) over the last window (1: even)
  moe_layer_balance_loss{layer}               E * sum_e f_e * P_e (Switch), over the window
  moe_layer_max_over_mean{layer}              busiest expert / mean, over the window

Every series also carries `router`. Traces: a request span per sampled request (W3C trace context
from gRPC metadata when present), batch and dispatch spans in the router, a compute span in each
expert group (context carried in the call); exported as JSON lines to `trace_dir` and/or OTLP.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from expert_workers.telemetry import Span, TelemetryConfig, close_tracing, extract, inject, make_tracer, otlp_missing

log = logging.getLogger(__name__)

__all__ = ["RouterMetrics", "Span", "TelemetryConfig", "close_tracing", "extract", "inject", "make_tracer"]

STAGES = ("queue", "gate", "dispatch", "expert", "combine", "total")
SUPERVISOR_EVENTS = ("failover", "router_restart", "supervisor_restart", "replica_added", "replica_removed",
                     "group_requested", "group_added", "group_removed", "resources_requested")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
# deferred records go to the instruments this long after the first, or at once past this many
FLUSH_S = 0.05
FLUSH_EVERY = 256


class RouterMetrics:
    """The router's instruments; `observe` callbacks read the router's state at scrape time."""

    def __init__(self, cfg: TelemetryConfig, router: str, index: int, state: Callable[[], dict[str, Any]],
                 layers: Sequence[int] = ()) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.metrics import Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import CollectorRegistry, start_http_server

        self.cfg = cfg
        self.router = router
        self._state = state
        self.registry = CollectorRegistry()
        readers: list[Any] = [PrometheusMetricReader(registry=self.registry, disable_target_info=True, scope_info_enabled=False)]
        if cfg.otlp_endpoint:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
                from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            except ImportError as e:
                raise otlp_missing(cfg) from e
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=cfg.otlp_endpoint, insecure=True)))
        views = [View(instrument_name="moe_stage_seconds", aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS)),
                 View(instrument_name="moe_recovery_seconds", aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS)),
                 View(instrument_name="moe_batch_requests", aggregation=ExplicitBucketHistogramAggregation(SIZE_BUCKETS)),
                 View(instrument_name="moe_batch_tokens", aggregation=ExplicitBucketHistogramAggregation(SIZE_BUCKETS))]
        self.provider = MeterProvider(resource=Resource.create({"service.name": "moe-serve"}), metric_readers=readers, views=views)
        m = self.provider.get_meter("moe_serve")
        self.requests = m.create_counter("moe_requests", description="requests answered, by gRPC-style status")
        self.dropped = m.create_counter("moe_tokens_dropped", description="assignments dropped by capacity")
        self.rerouted = m.create_counter("moe_tokens_rerouted", description="assignments rerouted by capacity")
        self.stage = m.create_histogram("moe_stage_seconds", description="time per stage (queue, gate, dispatch, expert, combine, total)")
        self.batch_requests = m.create_histogram("moe_batch_requests", description="requests per dispatched batch")
        self.batch_tokens = m.create_histogram("moe_batch_tokens", description="tokens per dispatched batch")
        self.batches = m.create_counter("moe_batches", description="batches by the transport that carried them")
        self.failovers = m.create_counter("moe_failovers", description="dispatches retried around a dead expert group")
        self.recovery = m.create_histogram("moe_recovery_seconds", description="supervisor failover recovery time")
        self.scaling = m.create_counter("moe_scaling_events", description="supervisor events by kind")
        base = {"router": router}
        # NOTE: series that exist from the start (at 0), so dashboards and alerts see them before the first event
        self.failovers.add(0, base)
        for layer in layers:
            self.dropped.add(0, {**base, "layer": str(layer)})
            self.rerouted.add(0, {**base, "layer": str(layer)})
        for kind in SUPERVISOR_EVENTS:
            self.scaling.add(0, {**base, "kind": kind})

        # records the router queued (defer) wait here for `flush`; every collection flushes first (the SDK
        # runs all observable callbacks before it reads the synchronous instruments), so a scrape or
        # an export never misses a request answered before it began.
        self._pending: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None  # a flush due (defer_soon)

        def gauge(name: str, description: str, read: Callable[[dict[str, Any]], Iterator[tuple[float, dict[str, Any]]]],
                  create: Callable[..., Any] = m.create_observable_gauge) -> None:
            def callback(_options: Any) -> list[Any]:
                self.flush()
                try:
                    st = self._state()
                    return [Observation(v, {**base, **labels}) for v, labels in read(st)]
                except Exception:  # a scrape never fails on a state read
                    return []
            create(name, callbacks=[callback], description=description)

        # NOTE: read from the router's own usage counters at scrape time, not added per batch: one
        # counter call per expert hit was the larger part of the metrics' cost on the request path.
        gauge("moe_tokens", "routed: the gate's token-expert assignments per expert (demand, before failover); "
                            "degraded (expert *): tokens answered without one of their experts",
              lambda st: [*((n, {"layer": l, "expert": str(e), "outcome": "routed"}) for l, (tokens, _p, _n) in st["usage"].items()
                            for e, n in enumerate(tokens)),
                          *((n, {"layer": l, "expert": "*", "outcome": "degraded"}) for l, n in st["degraded"].items())],
              create=m.create_observable_counter)

        gauge("moe_expert_replicas", "live copies per expert",
              lambda st: ((n, {"layer": l, "expert": e}) for l, row in st["replicas"].items() for e, n in enumerate(row)))
        gauge("moe_groups", "expert groups in the routing table", lambda st: [(st["groups"], {})])
        gauge("moe_groups_alive", "expert groups answering pings", lambda st: [(st["groups_alive"], {})])
        gauge("moe_routing_table_version", "routing-table version in use", lambda st: [(st["version"], {})])
        gauge("moe_layer_entropy", "utilisation entropy / log(E) over the window (1: even)",
              lambda st: ((v["entropy"], {"layer": l}) for l, v in self.layer_window(st).items()))
        gauge("moe_layer_balance_loss", "E * sum f_e * P_e over the window (1: balanced)",
              lambda st: ((v["balance_loss"], {"layer": l}) for l, v in self.layer_window(st).items()))
        gauge("moe_layer_max_over_mean", "busiest expert's tokens / mean over the window",
              lambda st: ((v["max_over_mean"], {"layer": l}) for l, v in self.layer_window(st).items()))
        self._window: collections.deque[tuple[float, dict[int, tuple[list[int], list[float], int]]]] = collections.deque()
        self._window_lock = threading.Lock()
        self._cached: tuple[float, dict[int, dict[str, float]]] = (float("-inf"), {})
        self._seen_events: set[tuple[str, float]] = set()
        self._began_at = time.time()  # wall clock, as the supervisor stamps its events
        self.address = ""
        self._server: Any = None
        if cfg.prometheus_port is not None:
            port = cfg.prometheus_port + index if cfg.prometheus_port else 0
            self._server, _thread = start_http_server(port, addr=cfg.prometheus_host, registry=self.registry)
            host = cfg.prometheus_host if ":" not in cfg.prometheus_host else f"[{cfg.prometheus_host}]"
            self.address = f"{host}:{self._server.server_port}"

    def layer_window(self, st: dict[str, Any]) -> dict[int, dict[str, float]]:
        """Per layer, over the last `window_s`: entropy, balance loss and max/mean of the counters' deltas."""
        now = time.monotonic()
        usage = st["usage"]  # {layer: (tokens per expert, prob sums per expert, tokens seen)}
        with self._window_lock:
            # one computation serves the three gauges of a scrape
            if now - self._cached[0] < 1.0:
                return self._cached[1]
            self._window.append((now, usage))
            while len(self._window) > 2 and now - self._window[1][0] >= self.cfg.window_s:
                self._window.popleft()
            old = self._window[0][1] if len(self._window) > 1 else {}
        out = {}
        for layer, (tokens, probs, n) in usage.items():
            t0, p0, n0 = old.get(layer, ([0] * len(tokens), [0.0] * len(probs), 0))
            dt = [a - b for a, b in zip(tokens, t0)]
            dp = [a - b for a, b in zip(probs, p0)]
            dn = n - n0
            total = sum(dt)
            e = len(dt)
            if total <= 0 or dn <= 0:
                continue
            f = [x / total for x in dt]
            entropy = -sum(x * math.log(x) for x in f if x > 0) / math.log(e) if e > 1 else 1.0
            mean = total / e
            out[layer] = {"entropy": entropy, "balance_loss": e * sum(fi * pi / dn for fi, pi in zip(f, dp)),
                          "max_over_mean": max(dt) / mean}
        with self._window_lock:
            self._cached = (now, out)
        return out

    def note_events(self, events: list[dict[str, Any]]) -> None:
        """Count supervisor events not seen before (each once) and their recovery times.

        NOTE: events from before these metrics began are not counted: a router (re)started beside a
        supervisor with a history would count it again (the same series, after a counter reset)."""
        keyed = {(ev.get("kind", ""), float(ev.get("at", 0.0))): ev for ev in events}
        fresh = [(key, ev) for key, ev in keyed.items() if key not in self._seen_events and key[1] >= self._began_at]
        self._seen_events = set(keyed)  # the supervisor keeps its last 100: what left its list never comes back
        for key, ev in fresh:
            self.scaling.add(1, {"router": self.router, "kind": key[0]})
            if key[0] == "failover" and ev.get("recovery_s") is not None:
                self.recovery.record(float(ev["recovery_s"]), {"router": self.router})

    def defer_soon(self, record: Callable[..., None], *args: Any) -> None:
        """Queue a record from the router's event loop; the queue goes to the instruments `FLUSH_S` later in
        bulk (or at once past `FLUSH_EVERY` records, or when a scrape collects: see `flush`).

        NOTE: ten-odd OpenTelemetry records per request, each on a cold cache right after the answer,
        were about a sixth of a 2-core router's CPU per small request and delayed the next one.
        """
        if self.defer(record, *args) >= FLUSH_EVERY:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None
        self.flush()

    def count_request(self, status: str, seconds: float) -> None:
        """An answered (or failed) request and its time in the router."""
        self.requests.add(1, {"router": self.router, "status": status})
        self.stage.record(seconds, {"router": self.router, "stage": "total"})

    def record_batch(self, layer: int, queued_s: list[float], tokens: int, dropped_rerouted: list[tuple[int, int]], used: str,
                     t_start: float, t_gate: float, t_dispatched: float, t_answered: float, expert_s: float | None = None) -> None:
        """An answered batch: its requests' queueing, its stages, size, transport and dropped/rerouted tokens."""
        r_ = {"router": self.router}
        for q in queued_s:
            self.stage.record(q, {**r_, "stage": "queue"})
        self.stage.record(t_gate - t_start, {**r_, "stage": "gate"})
        self.stage.record(t_dispatched - t_gate, {**r_, "stage": "dispatch"})
        self.stage.record(t_answered - t_dispatched, {**r_, "stage": "combine"})
        if expert_s is not None:  # object store and gRPC report it; RDT does not
            self.stage.record(expert_s, {**r_, "stage": "expert"})
        self.batch_requests.record(len(queued_s), r_)
        self.batch_tokens.record(tokens, r_)
        self.batches.add(1, {**r_, "transport": used})
        for dropped, rerouted in dropped_rerouted:
            if dropped:
                self.dropped.add(dropped, {**r_, "layer": str(layer)})
            if rerouted:
                self.rerouted.add(rerouted, {**r_, "layer": str(layer)})

    def defer(self, record: Callable[..., None], *args: Any) -> int:
        """Queue `record(*args)` for the next flush; returns how many are queued."""
        self._pending.append((record, args))
        return len(self._pending)

    def flush(self) -> None:
        """Run the queued records, oldest first. Safe from any thread: each record is taken by one."""
        while True:
            try:
                record, args = self._pending.popleft()
            except IndexError:
                return
            try:
                record(*args)
            except Exception:  # one bad record never stops the rest, nor a scrape
                log.exception("metrics record failed")

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.provider.shutdown()
