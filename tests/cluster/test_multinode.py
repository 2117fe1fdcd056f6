"""Several nodes on one machine (`ray.cluster_utils.Cluster`: a head and three worker raylets, all on
127.0.0.1): groups spread over nodes, copies of an expert on different nodes, and a node removed
under traffic loses no request (its groups, and a router it carried, come back on the others).

The head has no CPUs, so every group and router runs on a worker node and any of them can be removed.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from cluster import deploy
from router_svc import LocalMoE
from tests.helpers.ray_cluster import local_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=2, moe_layers=[0, 1],
            routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def three_nodes():
    with local_cluster(workers=3, cpus_per_worker=3) as (cluster, workers):
        yield cluster, workers


def _live_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_groups_and_copies_spread_and_a_removed_node_loses_no_request(three_nodes) -> None:
    cluster, workers = three_nodes
    dep = deploy({"model": {"random": SPEC, "seed": 12}, "gateway": {"port": 0},
                  "deployment": {"name": "nodes", "expert_groups": 3, "replicas": 2, "transport": "object_store",
                                 "supervisor_period_s": 0.3}})
    ref = LocalMoE.from_config(SPEC, seed=12)
    try:
        nodes = [g.node_id for g in dep.table.groups]
        assert len(set(nodes)) == 3, "groups share a node while three have room"
        for layer in SPEC["moe_layers"]:
            for e in range(SPEC["num_experts"]):
                hosts = {nodes[g] for g, _ in dep.table.replicas(layer, e)}
                assert len(hosts) == 2, f"copies of ({layer}, {e}) share a node"

        victim_node = nodes[0]
        victim = next(w for w in workers if w.node_id == victim_node)
        gen = torch.Generator().manual_seed(4)
        xs = [torch.randn(1 + i % 30, 32, generator=gen) for i in range(400)]
        errors: list[str] = []
        done = [0]
        stop = threading.Event()

        def client(k: int) -> None:
            deadline = time.monotonic() + 240
            for i in range(k, len(xs), 6):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    got = dep.forward(xs[i], i % 2)
                except Exception as e:
                    errors.append(repr(e))
                    continue
                if _rel(got, ref.forward(xs[i], i % 2)) >= 1e-6:
                    errors.append(f"wrong answer for request {i}")
                done[0] += 1

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        cluster.remove_node(victim)
        for t in threads:
            t.join(timeout=300)
        stop.set()
        assert not errors, errors[:5]
        assert done[0] == len(xs)

        deadline = time.monotonic() + 120
        while True:
            st = ray.get(dep.supervisor.status.remote(), timeout=30)
            infos = [ray.get(ray.get_actor(n, namespace="moe-serve").info.remote(), timeout=30) for n in st["groups"]]
            if all(i["node_id"] in _live_nodes() for i in infos):
                break
            assert time.monotonic() < deadline, "groups were not re-placed on the remaining nodes"
            time.sleep(0.5)
        assert victim_node not in {i["node_id"] for i in infos}
        assert any(e["kind"] == "failover" for e in st["events"])
        x = torch.randn(50, 32)
        for layer in SPEC["moe_layers"]:
            assert _rel(dep.forward(x, layer), ref.forward(x, layer)) < 1e-6
    finally:
        dep.shutdown()
