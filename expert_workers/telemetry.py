"""Telemetry settings and tracing, shared by routers and expert groups (metrics: router_svc.telemetry).

Spans: a compute span in each expert group, parented on the router's dispatch span through a W3C
traceparent carried in the call; exported as JSON lines to `trace_dir` and/or OTLP (flushed when the actor shuts down).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from expert_workers.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    # Prometheus endpoint of router i at prometheus_port + i (0, the default: any free port, shown by
    # status and `moe-serve up`; None: no endpoint)
    prometheus_port: int | None = 0
    prometheus_host: str = "127.0.0.1"
    otlp_endpoint: str | None = None
    # fraction of requests traced (a sampled parent from gRPC metadata is always followed)
    trace_sample_rate: float = 0.0
    # spans as JSON lines, one file per process (debugging, tests)
    trace_dir: str | None = None
    # window of the per-layer balance gauges
    window_s: float = 60.0

    def __post_init__(self) -> None:
        p = self.prometheus_port
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < 65536):
            raise ConfigError(field="telemetry.prometheus_port", value=p, expected="an integer in [0, 65535] (0: any free port) or null")
        if not isinstance(self.prometheus_host, str) or not self.prometheus_host:
            raise ConfigError(field="telemetry.prometheus_host", value=self.prometheus_host, expected="a host name or IP address")
        r = self.trace_sample_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ConfigError(field="telemetry.trace_sample_rate", value=r, expected="a number in [0, 1]")
        if self.otlp_endpoint is not None and not isinstance(self.otlp_endpoint, str):
            raise ConfigError(field="telemetry.otlp_endpoint", value=self.otlp_endpoint, expected="a URL (host:port for gRPC OTLP)")
        if self.trace_dir is not None and not isinstance(self.trace_dir, str):
            raise ConfigError(field="telemetry.trace_dir", value=self.trace_dir, expected="a directory path")
        w = self.window_s
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
            raise ConfigError(field="telemetry.window_s", value=w, expected="a number > 0")

    @property
    def tracing(self) -> bool:
        return self.trace_sample_rate > 0 or self.trace_dir is not None


class _JsonLinesExporter:
    """A span exporter writing one JSON object per line (a file per process)."""

    def __init__(self, directory: str, name: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._f = open(os.path.join(directory, f"{name}-{os.getpid()}.jsonl"), "a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            for s in spans:
                self._f.write(json.dumps(json.loads(s.to_json(indent=None))) + "\n")
            self._f.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._f.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def otlp_missing(cfg: TelemetryConfig) -> ConfigError:
    """The error for an `otlp_endpoint` without the OTLP exporter package."""
    return ConfigError(field="telemetry.otlp_endpoint", value=cfg.otlp_endpoint,
                       expected="the OTLP exporter installed (pip install -e '.[otlp]', or opentelemetry-exporter-otlp-proto-grpc)")


def make_tracer(cfg: TelemetryConfig | None, service: str) -> tuple[Any, Any]:
    """This process's tracer and the provider behind it ((None, None) when tracing is off). End the
    provider with `close_tracing` when the process's actor shuts down."""
    if cfg is None or not cfg.tracing:
        return None, None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(resource=Resource.create({"service.name": "moe-serve", "moe.process": service}),
                              sampler=ParentBased(TraceIdRatioBased(cfg.trace_sample_rate)))
    if cfg.trace_dir is not None:
        provider.add_span_processor(SimpleSpanProcessor(_JsonLinesExporter(cfg.trace_dir, service)))  # type: ignore[arg-type]
    if cfg.otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise otlp_missing(cfg) from e
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=True)))
    return provider.get_tracer("moe_serve"), provider


def close_tracing(provider: Any) -> None:
    """Export the spans still buffered and end the provider (a no-op for None).

    NOTE: OTLP spans leave in batches (every few seconds, or 512 at a time); the ones of the last
    batch would end with the process unless the actor's shutdown comes here first."""
    if provider is not None:
        provider.shutdown()


def inject(span: Any) -> str:
    """A span's W3C traceparent ('' for no span)."""
    if span is None:
        return ""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def extract(traceparent: str) -> Any:
    """A parent context from a W3C traceparent (None when absent or malformed)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    return ctx or None


class Span:
    """`with Span(tracer, name, parent=traceparent) as s:` — a no-op without a tracer."""

    def __init__(self, tracer: Any, name: str, parent: str = "", attributes: dict[str, Any] | None = None,
                 links: list[str] | None = None) -> None:
        self.tracer, self.name, self.parent, self.attributes, self.links = tracer, name, parent, attributes or {}, links or []
        self.span: Any = None
        self._cm: Any = None

    def __enter__(self) -> "Span":
        if self.tracer is not None:
            from opentelemetry import trace

            links = []
            for tp in self.links:
                ctx = extract(tp)
                if ctx is not None:
                    links.append(trace.Link(trace.get_current_span(ctx).get_span_context()))
            self._cm = self.tracer.start_as_current_span(self.name, context=extract(self.parent), attributes=self.attributes, links=links)
            self.span = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)

    @property
    def traceparent(self) -> str:
        return inject(self.span) if self.span is not None and self.span.is_recording() else ""
