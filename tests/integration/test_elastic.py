"""The supervisor under load: hot experts get copies and group loads even out, cooled copies go
again; groups scale with load; a killed router is re-created; a killed supervisor resumes its
state while the data plane keeps serving. Every answer is checked against LocalMoE.

Timings are liveness bounds only (a stuck reconciler fails instead of hanging); nothing is
asserted against wall time.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest
import ray
import torch

from cluster import deploy
from router_svc import LocalMoE
from tests.helpers.waiting import wait_until as _wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=1, moe_layers=[0],
            routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))
FAST = dict(supervisor_period_s=0.2, rebalance_period_s=0.5, load_window_s=2.0, drain_timeout_s=10.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())



class Traffic:
    """Closed-loop clients in threads until stopped; every answer is checked against LocalMoE."""

    def __init__(self, dep: Any, ref: LocalMoE, make: Callable[[torch.Generator], torch.Tensor], clients: int = 4) -> None:
        self.dep, self.ref, self.make = dep, ref, make
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        gen = torch.Generator().manual_seed(100 + k)
        deadline = time.monotonic() + 300  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            x = self.make(gen)
            try:
                got = self.dep.forward(x, 0)
            except Exception as e:  # counted, reported by stop()
                self.errors.append(repr(e))
                continue
            err = _rel(got, self.ref.forward(x, 0))
            if err < 1e-6:
                self.ok += 1
            else:
                self.errors.append(f"wrong answer: rel. error {err:.2e}")

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def check(self) -> None:
        assert not self.errors, self.errors[:5]
        assert self.ok > 0


def _group_tokens(dep: Any) -> dict[str, int]:
    """Rows each live group computed since it started (the groups' own counters)."""
    out = {}
    for name in ray.get(dep.supervisor.status.remote())["groups"]:
        stats = ray.get(ray.get_actor(name, namespace="moe-serve").stats.remote())
        out[name] = sum(n for _, _, n in stats["tokens"])
    return out


def _max_over_mean(before: dict[str, int], after: dict[str, int]) -> float:
    delta = [after[n] - before.get(n, 0) for n in after]
    return max(delta) / (sum(delta) / len(delta))


def _skewed(ref: LocalMoE, hot: tuple[int, ...]) -> Callable[[torch.Generator], torch.Tensor]:
    """Inputs whose gate prefers the `hot` experts (most tokens go there)."""
    w = ref.layer(0).router.weight.float()
    direction = sum(w[e] for e in hot)
    direction = direction / direction.norm()

    def make(gen: torch.Generator) -> torch.Tensor:
        return torch.randn(24, 32, generator=gen) * 0.3 + 4.0 * direction
    return make


def test_hot_experts_get_copies_group_load_evens_out_and_copies_go_when_traffic_stops(ray_local) -> None:
    dep = deploy({"model": {"random": SPEC, "seed": 7}, "gateway": {"port": 0},
                  "deployment": {"name": "hot", "expert_groups": 3, "transport": "object_store", "max_replicas": 3,
                                 "hot_threshold": 1.5, "replica_down_delay_s": 1.5, **FAST}})
    ref = LocalMoE.from_config(SPEC, seed=7)
    try:
        # experts 0 and 1 sit on groups 0 and 1 (slot i -> group i mod 3): group 2 idles before replication
        make = _skewed(ref, (0, 1))
        probe = ref.forward(make(torch.Generator().manual_seed(0)), 0, return_routing=True)[1]
        assert float(torch.isin(probe.expert, torch.tensor([0, 1])).float().mean()) > 0.8, "traffic is not skewed"
        start = _group_tokens(dep)
        with Traffic(dep, ref, make) as traffic:
            added = _wait("a hot expert's copy", lambda: [e for e in ray.get(dep.supervisor.status.remote())["events"]
                                                        if e["kind"] == "replica_added"])
            before = _group_tokens(dep)
            # copies settle: no new replica event for 2 s
            _wait("replicas to settle", lambda: time.time() - max(e["at"] for e in ray.get(dep.supervisor.status.remote())["events"]
                                                               if e["kind"] == "replica_added") > 2.0, period=0.5)
            mid = _group_tokens(dep)
            time.sleep(3.0)
            after = _group_tokens(dep)
        traffic.check()
        assert {(e["layer"], e["expert"]) for e in added} <= {(0, 0), (0, 1)}
        st = ray.get(dep.supervisor.status.remote())
        copies = {(x["layer"], x["expert"]): x["replicas"] for x in st["experts"]}
        assert copies[(0, 0)] >= 2 and copies[(0, 1)] >= 2 and all(copies[(0, e)] == 1 for e in range(2, 6))
        skew_before, skew_after = _max_over_mean(start, before), _max_over_mean(mid, after)
        assert skew_after < skew_before - 0.2, (skew_before, skew_after)
        # the new copies compute: every group did work after replication
        assert all(after[n] > mid[n] for n in after)
        # traffic stopped: the extra copies go (after the down delay), and the groups unload them
        _wait("copies to go", lambda: all(x["replicas"] == 1 for x in ray.get(dep.supervisor.status.remote())["experts"]))
        st = _wait("drains to finish", lambda: (lambda s: s if not s["draining"] else None)(ray.get(dep.supervisor.status.remote())))
        assert any(e["kind"] == "replica_removed" for e in st["events"])
        for name, slots in zip(st["groups"], st["placement"]):
            hosted = ray.get(ray.get_actor(name, namespace="moe-serve").info.remote())["slots"]
            assert sorted(map(tuple, hosted)) == sorted(map(tuple, slots))
        version = ray.get(dep.routers[0].status.remote())["routing_table_version"]
        assert version == st["version"] >= 3
        x = make(torch.Generator().manual_seed(9))
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
    finally:
        dep.shutdown()


def test_load_above_target_adds_a_group_and_idle_removes_it(ray_local) -> None:
    dep = deploy({"model": {"random": SPEC, "seed": 8}, "gateway": {"port": 0},
                  "deployment": {"name": "grow", "expert_groups": 2, "max_groups": 3, "transport": "object_store",
                                 "target_group_tokens_per_s": 20.0, "scale_up_delay_s": 0.5, "scale_down_delay_s": 1.5, **FAST}})
    ref = LocalMoE.from_config(SPEC, seed=8)
    try:
        with Traffic(dep, ref, lambda gen: torch.randn(16, 32, generator=gen)) as traffic:
            st = _wait("a third group", lambda: (lambda s: s if len(s["groups"]) == 3 else None)(ray.get(dep.supervisor.status.remote())))
            new = st["groups"][2]
            assert st["group_info"][2]["scaled"] and st["group_info"][2]["slots"]
            before = _group_tokens(dep)
            time.sleep(1.5)
            after = _group_tokens(dep)
        traffic.check()
        assert after[new] > before.get(new, 0), "the added group never computed"
        kinds = [e["kind"] for e in st["events"]]
        assert "group_requested" in kinds and "group_added" in kinds
        assert ray.get(dep.routers[0].status.remote())["routing_table_version"] >= st["version"]
        # idle: back to min_groups, the added group drained and killed
        st = _wait("scale down", lambda: (lambda s: s if len(s["groups"]) == 2 and not s["retiring"] else None)(
            ray.get(dep.supervisor.status.remote())))
        assert any(e["kind"] == "group_removed" and e["group"] == new for e in st["events"])
        _wait("the removed group to die", lambda: new not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)})
        x = torch.randn(40, 32)
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
    finally:
        dep.shutdown()


def test_killed_router_is_recreated_and_requests_go_on(ray_local) -> None:
    dep = deploy({"model": {"random": SPEC, "seed": 9}, "gateway": {"port": 0},
                  "deployment": {"name": "rtr", "expert_groups": 2, "routers": 2, "transport": "object_store", **FAST}})
    ref = LocalMoE.from_config(SPEC, seed=9)
    try:
        with Traffic(dep, ref, lambda gen: torch.randn(8, 32, generator=gen)) as traffic:
            time.sleep(0.5)
            ray.kill(dep.routers[0])
            st = _wait("the router restart", lambda: (lambda s: s if any(e["kind"] == "router_restart" for e in s["events"]) else None)(
                ray.get(dep.supervisor.status.remote())))
            time.sleep(1.0)
        traffic.check()
        event = [e for e in st["events"] if e["kind"] == "router_restart"][-1]
        assert event["router"] == f"{dep.name}-router-0" and event["recovery_s"] > 0
        fresh = ray.get_actor(f"{dep.name}-router-0", namespace="moe-serve")
        assert ray.get(fresh.status.remote())["routing_table_version"] == st["version"]
    finally:
        dep.shutdown()


def test_killed_supervisor_twice_data_plane_serves_and_state_is_restored(ray_local) -> None:
    dep = deploy({"model": {"random": SPEC, "seed": 10}, "gateway": {"port": 0},
                  "deployment": {"name": "supk", "expert_groups": 3, "replicas": 2, "transport": "object_store", **FAST}})
    ref = LocalMoE.from_config(SPEC, seed=10)
    try:
        first = ray.get(dep.supervisor.status.remote())
        with Traffic(dep, ref, lambda gen: torch.randn(12, 32, generator=gen)) as traffic:
            for n in (1, 2):
                before = ray.get(dep.supervisor.status.remote())
                ray.kill(dep.supervisor, no_restart=False)
                after = _wait(f"restart {n}", lambda: (lambda s: s if s and s["restarts"] == n else None)(_try_status(dep)))
                for key in ("groups", "placement", "routers"):
                    assert after[key] == before[key] == first[key], key
                # the version carries on from the saved one (load shares may have moved it on since)
                assert after["version"] >= before["version"]
                time.sleep(0.5)
        traffic.check()
        assert [e["kind"] for e in after["events"]].count("supervisor_restart") == 2
        # still reconciling: a killed group is replaced by the restarted supervisor
        victim = after["groups"][1]
        ray.kill(ray.get_actor(victim, namespace="moe-serve"))
        st = _wait("failover after restarts", lambda: (lambda s: s if s and victim not in s["groups"] else None)(_try_status(dep)))
        assert st["version"] > after["version"]
        x = torch.randn(30, 32)
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
    finally:
        dep.shutdown()


def _try_status(dep: Any) -> dict | None:
    try:
        return ray.get(dep.supervisor.status.remote(), timeout=5)
    except Exception:
        return None


def _requested_bundles() -> list[dict]:
    """What Ray's autoscaler was last asked for through `request_resources` (autoscaler v1 keeps
    the request in the GCS KV; v2 in its cluster-resource state)."""
    import json

    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
        out: list[dict] = []
        for c in get_cluster_resource_state(gcs).cluster_resource_constraints:
            for rb in c.resource_requests:
                out += [dict(rb.request.resources_bundle)] * rb.count
        return out
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_no_room_for_another_group_asks_rays_autoscaler(ray_local) -> None:
    """Two 6-CPU groups and a router fill 13 of the 16 CPUs: a third group cannot be placed, so the
    supervisor asks Ray's autoscaler for room for all three (and keeps serving meanwhile)."""
    from ray.autoscaler.sdk import request_resources

    dep = deploy({"model": {"random": SPEC, "seed": 11}, "gateway": {"port": 0},
                  "deployment": {"name": "room", "expert_groups": 2, "max_groups": 3, "group_cpus": 6, "transport": "object_store",
                                 "target_group_tokens_per_s": 20.0, "scale_up_delay_s": 0.5, "place_timeout_s": 1.0, **FAST}})
    ref = LocalMoE.from_config(SPEC, seed=11)
    try:
        with Traffic(dep, ref, lambda gen: torch.randn(16, 32, generator=gen)) as traffic:
            st = _wait("a resource request", lambda: (lambda s: s if any(e["kind"] == "resources_requested" for e in s["events"]) else None)(
                ray.get(dep.supervisor.status.remote())))
        traffic.check()
        event = [e for e in st["events"] if e["kind"] == "resources_requested"][-1]
        assert event["bundles"] == [{"CPU": 6.0}] * 3
        assert [{k: float(v) for k, v in b.items()} for b in _requested_bundles()] == [{"CPU": 6.0}] * 3
        assert len(st["groups"]) == 2 and len(st["pending"]) == 1 and st["pending"][0]["requested"]
    finally:
        request_resources(bundles=[])
        dep.shutdown()
    # the group that never found room is gone too (shutdown removes pending actors as well)
    _wait("no actor of the deployment", lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True)
                                                      if a["name"].startswith(dep.name + "-")])
