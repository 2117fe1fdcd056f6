"""Overload: offered load ~3x capacity for 20 s through the gRPC gateway.

Capacity is measured first (closed loop, a few clients), then a fixed-rate open-loop sender offers
OVERLOAD_FACTOR times that rate for OVERLOAD_S. A small `max_queued_tokens` makes the admission bound bite.
Checked: the excess gets RESOURCE_EXHAUSTED and is refused quickly (a ratio against accepted latency,
never a wall-time bound), every accepted answer equals LocalMoE, no other status occurs, the router's and
the group's RSS stay bounded, and right after the overload a closed loop all succeeds again at a p50
near the one measured before. p50/p99 of accepted requests, the reject fraction and RSS are printed
(run with -s) and not gated: the machine is shared and noisy.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import deploy
from moe.v1 import expert_service_pb2 as pb
from moe.v1 import expert_service_pb2_grpc as pb_grpc
from router_svc import LocalMoE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=3, moe_layers=[0, 2])
D = SPEC["hidden_size"]
LAYER = 0
TOKENS = 16  # tokens per request
CLIENTS = 4  # closed-loop clients measuring capacity and recovery
MAX_QUEUED_TOKENS = CLIENTS * TOKENS  # the closed loop always fits; the open loop does not
OVERLOAD_FACTOR = 3.0
OVERLOAD_S = 20.0  # as the issue says
CAPACITY_S = 3.0
RECOVERY_S = 3.0
POOL = 64  # distinct inputs, with their LocalMoE answers computed once
# generous bounds: nothing here gates on wall time except liveness.
RPC_TIMEOUT = 60.0
READY_TIMEOUT = 300.0
RSS_GROWTH_MIB = 256  # per process, peak during/after the overload minus before it
RECOVERY_P50_FACTOR = 5.0


@dataclass(frozen=True)
class Outcome:
    index: int  # which pool input
    code: grpc.StatusCode
    latency_s: float
    data: bytes = b""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _request(x: torch.Tensor) -> pb.ForwardRequest:
    return pb.ForwardRequest(layer=LAYER, hidden_states=pb.Tensor(dtype="float32", shape=list(x.shape), data=x.numpy().tobytes()))


def _decode(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(TOKENS, D)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class _RssSampler:
    """Samples VmRSS of `pids` every `period_s` on a thread; `peak` is the largest seen per pid."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.5) -> None:
        self.pids, self.period_s = pids, period_s
        self.peak = {name: _rss_mib(pid) for name, pid in pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], _rss_mib(pid))

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _wait_serving(address: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"gateway {address} never reported SERVING"
            time.sleep(0.2)


def _closed_loop(stub, pool: list[pb.ForwardRequest], seconds: float) -> tuple[list[Outcome], float]:
    """CLIENTS threads, each sending its next request when the last is answered, for `seconds`."""
    results: list[list[Outcome]] = [[] for _ in range(CLIENTS)]
    start = time.monotonic()
    end = start + seconds

    def run(k: int) -> None:
        i = k
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                resp = stub.Forward(pool[i % POOL], timeout=RPC_TIMEOUT)
                results[k].append(Outcome(i % POOL, grpc.StatusCode.OK, time.perf_counter() - t0, resp.hidden_states.data))
            except grpc.RpcError as e:
                results[k].append(Outcome(i % POOL, e.code(), time.perf_counter() - t0))
            i += CLIENTS

    threads = [threading.Thread(target=run, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for r in results for o in r], time.monotonic() - start


def _open_loop(stub, pool: list[pb.ForwardRequest], rate: float, seconds: float) -> tuple[list[Outcome], float, float]:
    """Send at a fixed `rate` for `seconds` (futures: a slow answer never slows the sender); wait for
    every answer. Returns the outcomes, the rate actually offered and how long the last answers took
    to arrive after the sender stopped."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    all_done = threading.Event()
    pending = [1]  # the sender holds one count until it stops

    def finish(i: int, t0: float, fut: grpc.Future) -> None:
        latency = time.perf_counter() - t0
        err = fut.exception()
        o = Outcome(i, grpc.StatusCode.OK, latency, fut.result().hidden_states.data) if err is None else Outcome(i, err.code(), latency)
        with lock:
            outcomes.append(o)
            pending[0] -= 1
            if not pending[0]:
                all_done.set()

    start = time.perf_counter()
    n = 0
    while (now := time.perf_counter()) - start < seconds:
        due = start + n / rate
        if due > now:
            time.sleep(due - now)
        with lock:
            pending[0] += 1
        t0 = time.perf_counter()
        fut = stub.Forward.future(pool[n % POOL], timeout=RPC_TIMEOUT)
        fut.add_done_callback(lambda f, i=n % POOL, t0=t0: finish(i, t0, f))
        n += 1
    sent_s = time.perf_counter() - start
    stopped = time.perf_counter()
    with lock:
        pending[0] -= 1
        if not pending[0]:
            all_done.set()
    assert all_done.wait(RPC_TIMEOUT + 30), "answers still missing long after every deadline"
    return outcomes, n / sent_s, time.perf_counter() - stopped


@pytest.fixture(scope="module")
def service(ray_local):
    """One router (its gateway) and one expert group, a small admission queue, no supervisor."""
    dep = deploy({
        "model": {"random": SPEC, "seed": 1},
        "gateway": {"port": 0, "max_tokens_per_request": TOKENS, "max_queued_tokens": MAX_QUEUED_TOKENS},
        "deployment": {"name": "overload", "expert_groups": 1, "routers": 1, "transport": "object_store", "supervisor": False},
    })
    try:
        _wait_serving(dep.gateway_addresses[0])
        yield dep
    finally:
        dep.shutdown()


def test_overload_excess_is_refused_quickly_accepted_stay_exact_and_service_recovers(service) -> None:
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(TOKENS, D, generator=gen) for _ in range(POOL)]
    ref = LocalMoE.from_config(SPEC, seed=1)
    want = [ref.forward(x, LAYER) for x in xs]
    pool = [_request(x) for x in xs]
    pids = {"router": ray.get(service.routers[0].__ray_call__.remote(lambda self: os.getpid())),
            "group": ray.get(service.groups[0].info.remote())["pid"]}
    report: dict[str, object] = {}

    with grpc.insecure_channel(service.gateway_addresses[0]) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        _closed_loop(stub, pool, 0.5)  # warm up
        before, took = _closed_loop(stub, pool, CAPACITY_S)
        assert {o.code for o in before} == {grpc.StatusCode.OK}, "the closed loop alone must fit the queue bound"
        capacity = len(before) / took
        p50_before = statistics.median(o.latency_s for o in before)
        rss_before = {name: _rss_mib(pid) for name, pid in pids.items()}

        with _RssSampler(pids) as rss:
            during, offered, drain_s = _open_loop(stub, pool, OVERLOAD_FACTOR * capacity, OVERLOAD_S)
            after, took_after = _closed_loop(stub, pool, RECOVERY_S)
        rss_after = {name: _rss_mib(pid) for name, pid in pids.items()}

    ok = [o for o in during if o.code == grpc.StatusCode.OK]
    refused = [o for o in during if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    accepted_ms = [1e3 * o.latency_s for o in ok]
    refused_ms = [1e3 * o.latency_s for o in refused]
    report.update(
        capacity_rps=round(capacity, 1), offered_rps=round(offered, 1), requests=len(during),
        reject_fraction=round(len(refused) / max(len(during), 1), 3), accepted_rps=round(len(ok) / OVERLOAD_S, 1),
        p50_before_ms=round(1e3 * p50_before, 2),
        accepted_p50_ms=round(_pct(accepted_ms, 50), 2), accepted_p99_ms=round(_pct(accepted_ms, 99), 2),
        refused_p50_ms=round(_pct(refused_ms, 50), 2), refused_p99_ms=round(_pct(refused_ms, 99), 2),
        drain_s=round(drain_s, 3), recovery_rps=round(len(after) / took_after, 1),
        p50_after_ms=round(1e3 * statistics.median(o.latency_s for o in after), 2) if after else None,
        rss_before_mib={k: round(v, 1) for k, v in rss_before.items()},
        rss_peak_mib={k: round(v, 1) for k, v in rss.peak.items()},
        rss_after_mib={k: round(v, 1) for k, v in rss_after.items()},
    )
    print("\noverload report:", report)

    others = {o.code for o in during} - {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert not others, f"statuses other than OK / RESOURCE_EXHAUSTED: {others}; {report}"
    assert refused, f"nothing refused at {OVERLOAD_FACTOR}x capacity: {report}"
    assert ok, f"nothing accepted under overload: {report}"
    # NOTE: refusals happen at admission, before any queueing, so they take less than an accepted request
    assert _pct(refused_ms, 50) < _pct(accepted_ms, 50), f"refusals are not quick: {report}"
    for o in ok + after:
        assert _rel(_decode(o.data), want[o.index]) < 1e-5, o.index
    for name in pids:
        assert rss.peak[name] - rss_before[name] < RSS_GROWTH_MIB, f"{name} RSS grew: {report}"
    assert after and {o.code for o in after} == {grpc.StatusCode.OK}, f"no clean recovery: {report}"
    assert statistics.median(o.latency_s for o in after) < RECOVERY_P50_FACTOR * p50_before, f"slow recovery: {report}"
