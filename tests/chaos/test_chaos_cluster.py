"""Chaos on a 3-node `ray.cluster_utils.Cluster` (a CPU-less head and three worker raylets on
127.0.0.1): expert groups, a router, the supervisor and a whole node killed under gRPC traffic.
Nothing may be lost and every answer must equal LocalMoE's; groups come back on live nodes."""

from __future__ import annotations

import pytest
import ray

from cluster import deploy
from cluster.chaos import SMALL_MODEL, ChaosPlan, Target, embedded_config, run_chaos
from router_svc import LocalMoE
from tests.helpers.ray_cluster import local_cluster, remove_node_by_id

pytestmark = [pytest.mark.chaos, pytest.mark.cluster, pytest.mark.slow]


def test_groups_router_supervisor_and_a_node_killed_lose_nothing() -> None:
    with local_cluster(workers=3, cpus_per_worker=3) as (cluster, nodes):
        cfg = embedded_config(replicas=2, routers=2, groups=3, seed=5)
        dep = deploy(cfg)
        try:
            plan = ChaosPlan(clients=8, duration_s=30.0, group_kill_every_s=7.0, router_kill_at_s=(4.0,),
                             supervisor_kill_at_s=(10.0,), node_kill_at_s=(16.0,), quiet_s=8.0, seed=5)
            target = Target(dep.name, dep.gateway_addresses, LocalMoE.from_config(SMALL_MODEL, seed=5),
                            node_killer=lambda node_id: remove_node_by_id(cluster, nodes, node_id))
            report = run_chaos(target, plan, progress=print)
            print(report.table())
            assert report.failed == {} and report.wrong == 0 and report.succeeded == report.sent > 0, report.table()
            assert {f.kind for f in report.faults} == {"group", "router", "supervisor", "node"}
            assert not [f for f in report.faults if f.error], report.table()
            node_fault = next(f for f in report.faults if f.kind == "node")
            st = ray.get(dep.supervisor.status.remote(), timeout=60)
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert node_fault.victim not in alive
            infos = [ray.get(ray.get_actor(n, namespace="moe-serve").info.remote(), timeout=60) for n in st["groups"]]
            assert all(i["node_id"] in alive for i in infos), "a group is still counted on the removed node"
        finally:
            dep.shutdown()
