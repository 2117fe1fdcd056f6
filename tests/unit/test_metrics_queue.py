"""RouterMetrics' queue of deferred records: a collection (what a Prometheus scrape or an OTLP export
runs) flushes it first, so it counts every record queued before it began; flush works from any thread."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import generate_latest

from router_svc.telemetry import RouterMetrics, TelemetryConfig

pytestmark = pytest.mark.unit


def _state() -> dict:
    return {"replicas": {}, "groups": 1, "groups_alive": 1, "version": 1, "usage": {}, "degraded": {}}


def _value(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.fixture
def metrics():
    m = RouterMetrics(TelemetryConfig(prometheus_port=None), "r0", 0, _state, layers=[0])
    yield m
    m.shutdown()


def test_a_collection_counts_every_record_queued_before_it(metrics: RouterMetrics) -> None:
    for i in range(5):
        n = metrics.defer(metrics.requests.add, 1, {"router": "r0", "status": "OK"})
        assert n == i + 1
    metrics.defer(metrics.stage.record, 0.002, {"router": "r0", "stage": "total"})
    text = generate_latest(metrics.registry).decode()
    assert _value(text, 'moe_requests_total{router="r0",status="OK"}') == 5
    assert _value(text, 'moe_stage_seconds_count{router="r0",stage="total"}') == 1
    assert metrics.defer(metrics.requests.add, 1, {"router": "r0", "status": "OK"}) == 1  # the queue was emptied


def test_a_failing_record_does_not_stop_the_rest(metrics: RouterMetrics) -> None:
    def broken() -> None:
        raise RuntimeError("bad record")

    metrics.defer(broken)
    metrics.defer(metrics.requests.add, 2, {"router": "r0", "status": "OK"})
    metrics.flush()
    assert _value(generate_latest(metrics.registry).decode(), 'moe_requests_total{router="r0",status="OK"}') == 2


def test_flushes_from_two_threads_run_each_record_once(metrics: RouterMetrics) -> None:
    for _ in range(2000):
        metrics.defer(metrics.requests.add, 1, {"router": "r0", "status": "OK"})
    threads = [threading.Thread(target=metrics.flush) for _ in range(2)]
    for t in threads:
        t.start()
    metrics.flush()
    for t in threads:
        t.join()
    assert _value(generate_latest(metrics.registry).decode(), 'moe_requests_total{router="r0",status="OK"}') == 2000


def test_defer_soon_flushes_after_the_delay_or_at_once_when_full(metrics: RouterMetrics) -> None:
    """From the router's loop: records wait FLUSH_S (one timer for all of them), or go at once past FLUSH_EVERY."""
    import asyncio

    from router_svc import telemetry

    async def run() -> None:
        metrics.defer_soon(metrics.count_request, "OK", 0.003)
        metrics.defer_soon(metrics.record_batch, 0, [0.001, 0.002], 12, [(1, 0), (0, 2)], "grpc", 0.0, 0.001, 0.004, 0.005, 0.002)
        assert len(metrics._pending) == 2  # not recorded yet: the answer has left first
        await asyncio.sleep(telemetry.FLUSH_S * 4)
        assert len(metrics._pending) == 0 and metrics._timer is None
        for _ in range(telemetry.FLUSH_EVERY):
            metrics.defer_soon(metrics.count_request, "OK", 0.001)
        assert len(metrics._pending) == 0  # full: flushed at once

    asyncio.run(run())
    text = generate_latest(metrics.registry).decode()
    assert _value(text, 'moe_requests_total{router="r0",status="OK"}') == 1 + telemetry.FLUSH_EVERY
    assert _value(text, 'moe_stage_seconds_count{router="r0",stage="queue"}') == 2
    assert _value(text, 'moe_stage_seconds_count{router="r0",stage="expert"}') == 1
    assert _value(text, 'moe_batches_total{router="r0",transport="grpc"}') == 1
    assert _value(text, 'moe_tokens_dropped_total{layer="0",router="r0"}') == 1
    assert _value(text, 'moe_tokens_rerouted_total{layer="0",router="r0"}') == 2


def test_supervisor_events_are_counted_once_and_not_from_before_the_metrics_began(metrics: RouterMetrics) -> None:
    """A router restarted beside a supervisor with a history does not count that history again."""
    import time

    now = time.time()
    old = [{"kind": "failover", "at": now - 3600, "recovery_s": 1.5}, {"kind": "replica_added", "at": now - 3500}]
    metrics.note_events(old)
    new = old + [{"kind": "failover", "at": now + 1, "recovery_s": 2.0}]
    metrics.note_events(new)
    metrics.note_events(new)  # seen already
    text = generate_latest(metrics.registry).decode()
    assert _value(text, 'moe_scaling_events_total{kind="failover",router="r0"}') == 1
    assert _value(text, 'moe_scaling_events_total{kind="replica_added",router="r0"}') == 0
    assert _value(text, 'moe_recovery_seconds_count{router="r0"}') == 1
