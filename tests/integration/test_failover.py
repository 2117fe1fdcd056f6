"""Data-plane failover: a dead expert group's work moves to other replicas at once; with none left,
the failover policy decides (fail: ExpertUnavailableError; drop: tokens reported as degraded)."""

from __future__ import annotations

import concurrent.futures as cf
import time

import numpy as np
import pytest
import ray
import torch

from cluster import deploy
from expert_workers.errors import ExpertUnavailableError
from router_svc import LocalMoE

pytestmark = pytest.mark.integration
SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=2, moe_layers=[0, 1],
            routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _deploy(name: str, **deployment) -> tuple:
    dep = deploy({"model": {"random": SPEC, "seed": 5}, "gateway": {"port": 0},
                  "deployment": {"name": name, "expert_groups": 3, "transport": "object_store", **deployment}})
    return dep, LocalMoE.from_config(SPEC, seed=5)


def test_group_killed_under_traffic_with_replicas_loses_nothing(ray_local) -> None:
    dep, ref = _deploy("fo2", replicas=2, supervisor=False)
    try:
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(1 + i % 50, 32, generator=gen) for i in range(240)]

        def client(k: int) -> int:
            done = 0
            for i in range(k, len(xs), 8):
                out = dep.forward_output(xs[i], i % 2)
                assert out.degraded_tokens == ()
                assert _rel(torch.from_numpy(np.array(out.hidden_states)), ref.forward(xs[i], i % 2)) < 1e-6
                done += 1
            return done

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, k) for k in range(8)]
            time.sleep(0.5)
            ray.kill(dep.groups[1])
            assert sum(f.result() for f in futures) == len(xs)
        status = ray.get(dep.routers[0].status.remote())
        assert status["counters"].get("failovers", 0) >= 1 or 1 in status["dead"]
    finally:
        dep.shutdown()


def test_no_replica_left_fails_with_a_reason(ray_local) -> None:
    dep, ref = _deploy("fofail", replicas=1, failover="fail", supervisor=False)
    try:
        x = torch.randn(64, 32)
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
        ray.kill(dep.groups[0])
        with pytest.raises(ExpertUnavailableError, match="no live replica"):
            dep.forward(x, 0)
    finally:
        dep.shutdown()


def test_no_replica_left_drops_and_reports_degraded_tokens_exactly(ray_local) -> None:
    dep, ref = _deploy("fodrop", replicas=1, failover="drop", supervisor=False)
    try:
        layer = 1
        x = torch.randn(80, 32, generator=torch.Generator().manual_seed(2))
        dead_group = 2
        lost = {e for l, e in dep.table.placement[dead_group] if l == layer}
        ray.kill(dep.groups[dead_group])
        out = dep.forward_output(x, layer)
        got = torch.from_numpy(np.array(out.hidden_states))
        want, report = ref.forward(x, layer, return_routing=True)
        hit = {int(t) for t, e in zip(report.token_index.tolist(), report.expert.tolist()) if e in lost}
        assert set(out.degraded_tokens) == hit and hit, (sorted(hit), out.degraded_tokens)
        # tokens that lost nothing are exact; degraded ones are the LocalMoE sum over their live experts only
        keep = torch.tensor([t not in hit for t in range(80)])
        assert _rel(got[keep], want[keep]) < 1e-6
        live = LocalMoE.from_config(SPEC, seed=5)
        w = torch.zeros(80, 6)
        w[report.token_index, report.expert] = report.weight
        partial = torch.zeros_like(want)
        for e in range(6):
            if e in lost:
                continue
            rows = w[:, e] > 0
            if rows.any():
                ex = live.layer(layer).experts
                y = ex.forward(x[rows], [int(rows.sum()) if i == e else 0 for i in range(6)])
                partial[rows] += y * w[rows, e][:, None]
        assert _rel(got[~keep], partial[~keep]) < 1e-6
    finally:
        dep.shutdown()


@pytest.mark.parametrize("replicas", [1, 2])
def test_supervisor_replaces_a_killed_group_and_wait_loses_nothing(ray_local, replicas: int) -> None:
    """failover=wait with the supervisor: requests hold until the group is back; none fails, all exact."""
    dep, ref = _deploy(f"fosup{replicas}", replicas=replicas, failover="wait")
    try:
        gen = torch.Generator().manual_seed(3)
        xs = [torch.randn(1 + i % 40, 32, generator=gen) for i in range(160)]

        def client(k: int) -> int:
            for i in range(k, len(xs), 8):
                got = dep.forward(xs[i], i % 2)
                assert _rel(got, ref.forward(xs[i], i % 2)) < 1e-6
            return len(range(k, len(xs), 8))

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, k) for k in range(8)]
            time.sleep(0.5)
            victim_name = ray.get(dep.supervisor.status.remote())["groups"][0]
            ray.kill(dep.current_groups()[0])
            assert sum(f.result() for f in futures) == len(xs)
        deadline = time.time() + 60
        while True:
            st = ray.get(dep.supervisor.status.remote())
            if any(e["kind"] == "failover" for e in st["events"]):
                break
            assert time.time() < deadline, "the supervisor never replaced the group"
            time.sleep(0.2)
        event = [e for e in st["events"] if e["kind"] == "failover"][-1]
        assert event["kind"] == "failover" and event["groups"] == [victim_name] and event["recovery_s"] > 0
        assert st["groups"][0].endswith("-r1") and st["version"] >= 2
        assert ray.get(dep.routers[0].status.remote())["routing_table_version"] == st["version"]
        x = torch.randn(33, 32)
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
    finally:
        dep.shutdown()
