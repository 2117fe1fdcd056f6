"""OTLP export on a live deployment: an OTLP/gRPC collector on loopback receives every request's spans
(router and expert groups, one trace per request) and the final counts by the time shutdown returns."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import grpc
import pytest
import torch

pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc", reason="the OTLP exporter (extra 'otlp', part of 'test') is not installed")
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from cluster import deploy  # noqa: E402
from router_svc.client import MoEClient  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=2, moe_layers=[0, 1],
            routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))

class _Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP/gRPC receiver on loopback keeping every export request it is sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.traces: list = []
        self.metrics: list = []
        self.server = grpc.server(cf.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):  # noqa: N802 (both services name their one method Export)
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    def spans(self) -> list[tuple[str, object]]:
        """(the exporting process's moe.process attribute, span) of every span received."""
        out = []
        for req in self.traces:
            for rs in req.resource_spans:
                process = next((a.value.string_value for a in rs.resource.attributes if a.key == "moe.process"), "")
                out += [(process, sp) for ss in rs.scope_spans for sp in ss.spans]
        return out

    def last_sum(self, name: str, **labels: str) -> float:
        """The last exported value of counter `name` (cumulative), summed over points with these labels."""
        total = None
        for req in self.metrics:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != name:
                            continue
                        points = [p for p in m.sum.data_points
                                  if all(any(a.key == k and a.value.string_value == v for a in p.attributes) for k, v in labels.items())]
                        total = sum(p.as_int or p.as_double for p in points)
        return 0.0 if total is None else total


def test_otlp_export_reaches_a_collector_and_shutdown_sends_what_is_left(ray_local) -> None:
    """Spans and metrics over OTLP/gRPC: every request's spans (router and groups, one trace each) and
    the final request count are at the collector when `Deployment.shutdown` returns, with no wait for
    the exporters' own schedule (spans every 5 s, metrics every 60 s)."""
    collector = _Collector()
    try:
        dep = deploy({"model": {"random": SPEC, "seed": 13}, "gateway": {"port": 0},
                      "telemetry": {"prometheus_port": None, "otlp_endpoint": f"127.0.0.1:{collector.port}", "trace_sample_rate": 1.0},
                      "deployment": {"name": "otlp", "expert_groups": 2, "transport": "grpc"}})
        try:
            client = MoEClient(dep.gateway_addresses)
            gen = torch.Generator().manual_seed(1)
            for i in range(6):
                client.forward(torch.randn(3 + i, 32, generator=gen), i % 2)
            client.close()
        finally:
            dep.shutdown()
        spans = collector.spans()
        requests = [sp for _, sp in spans if sp.name == "moe.router.request"]
        assert len(requests) == 6, [sp.name for _, sp in spans]
        by_id = {sp.span_id: sp for _, sp in spans}
        compute = [(process, sp) for process, sp in spans if sp.name == "moe.group.compute"]
        assert {process.rsplit("-", 1)[-1] for process, _ in compute} == {"0", "1"}  # both groups: <deployment>-group-<i>
        assert all(by_id[sp.parent_span_id].name == "moe.router.dispatch" for _, sp in compute)
        # each request's trace holds its batch's dispatch and the groups' compute
        traces = {sp.trace_id for sp in requests}
        assert len(traces) == 6 and {sp.trace_id for _, sp in compute} <= traces
        assert collector.last_sum("moe_requests", status="OK") == 6
    finally:
        collector.server.stop(grace=0)
