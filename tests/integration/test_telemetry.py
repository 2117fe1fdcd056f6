"""Telemetry on a live deployment: the Prometheus endpoint during traffic (names present, counts add
up: tokens routed = tokens sent x k - dropped) and a trace through router and expert groups."""

from __future__ import annotations

import glob
import json
import os
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster import deploy
from router_svc.client import MoEClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=2, moe_layers=[0, 1],
            routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))
# moe_recovery_seconds appears with the first failover the supervisor reports (test_elastic / chaos)
NAMES = ("moe_requests", "moe_tokens", "moe_tokens_dropped", "moe_tokens_rerouted", "moe_stage_seconds", "moe_batch_requests",
         "moe_batch_tokens", "moe_batches", "moe_expert_replicas", "moe_groups", "moe_groups_alive", "moe_routing_table_version",
         "moe_failovers", "moe_scaling_events", "moe_layer_entropy", "moe_layer_balance_loss",
         "moe_layer_max_over_mean")


def _scrape(address: str) -> dict[str, list]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, []).extend(fam.samples)
    return out


def _total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_add_up_and_a_trace_spans_router_and_groups(ray_local, tmp_path) -> None:
    trace_dir = str(tmp_path / "traces")
    dep = deploy({"model": {"random": SPEC, "seed": 13}, "gateway": {"port": 0},
                  "routing": {"capacity_factor": 0.5, "overflow": "drop"},
                  "telemetry": {"prometheus_port": 0, "trace_sample_rate": 1.0, "trace_dir": trace_dir, "window_s": 30.0},
                  "deployment": {"name": "otel", "expert_groups": 3, "transport": "grpc"}})
    try:
        (address,) = dep.metrics_addresses
        client = MoEClient(dep.gateway_addresses)
        gen = torch.Generator().manual_seed(0)
        sent, dropped = 0, 0
        for i in range(24):
            x = torch.randn(4 + 3 * i, 32, generator=gen)
            resp = client.forward_response(x, i % 2)
            sent += x.shape[0]
            dropped += resp.dropped_tokens
        with pytest.raises(Exception):
            client.forward(torch.randn(3, 31), 0)  # wrong hidden size: INVALID_ARGUMENT
        fams = _scrape(address)
        for name in NAMES:
            assert name in fams, f"{name} missing from the endpoint"
        m = {k: v for k, v in fams.items()}
        assert _total(m["moe_requests"], "moe_requests_total", status="OK") == 24
        assert _total(m["moe_requests"], "moe_requests_total", status="INVALID_ARGUMENT") == 1
        routed = _total(m["moe_tokens"], "moe_tokens_total", outcome="routed")
        got_dropped = _total(m["moe_tokens_dropped"], "moe_tokens_dropped_total")
        assert dropped > 0 and got_dropped == dropped
        assert routed == sent * 2 - dropped
        assert _total(m["moe_stage_seconds"], "moe_stage_seconds_count", stage="total") == 25
        assert _total(m["moe_stage_seconds"], "moe_stage_seconds_count", stage="queue") == 24
        # the groups report their compute time on the gRPC path: one `expert` sample per batch
        assert _total(m["moe_stage_seconds"], "moe_stage_seconds_count", stage="expert") == \
            _total(m["moe_batches"], "moe_batches_total") > 0
        assert _total(m["moe_batches"], "moe_batches_total", transport="grpc") == _total(m["moe_batch_requests"], "moe_batch_requests_count") >= 1
        assert _total(m["moe_groups_alive"], "moe_groups_alive") == 3
        assert _total(m["moe_routing_table_version"], "moe_routing_table_version") == 1
        replicas = [s for s in m["moe_expert_replicas"] if s.name == "moe_expert_replicas"]
        assert len(replicas) == 12 and all(s.value == 1 for s in replicas)
        entropy = {s.labels["layer"]: s.value for s in m["moe_layer_entropy"]}
        assert set(entropy) == {"0", "1"} and all(0 < v <= 1 for v in entropy.values())

        # a trace: the client's sampled traceparent is followed through router and expert groups
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        stub_client = MoEClient(dep.gateway_addresses)
        stub_client._metadata = [("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")]
        stub_client.forward(torch.randn(5, 32), 0)
        spans = []
        for path in glob.glob(os.path.join(trace_dir, "*.jsonl")):
            with open(path, encoding="utf-8") as f:
                spans += [json.loads(line) for line in f if line.strip()]
        mine = [s for s in spans if s["context"]["trace_id"] == "0x" + trace_id]
        names = {s["name"] for s in mine}
        assert {"moe.router.request", "moe.router.batch", "moe.router.dispatch", "moe.group.compute"} <= names, names
        by_id = {s["context"]["span_id"]: s for s in mine}
        compute = [s for s in mine if s["name"] == "moe.group.compute"]
        assert all(by_id[s["parent_id"]]["name"] == "moe.router.dispatch" for s in compute)
        client.close()
        stub_client.close()
    finally:
        dep.shutdown()

