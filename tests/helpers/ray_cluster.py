"""A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`), bound to loopback.

A head without CPUs and N worker raylets, every one on 127.0.0.1 (and checked: no process of theirs
listens elsewhere), so any node carrying groups or routers can be removed. The driver is connected for the duration and everything is stopped after.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.deploy import one_machine_ray
from tests.helpers.sockets import node_pids, only_loopback


@contextlib.contextmanager
def local_cluster(workers: int = 3, cpus_per_worker: float = 3, namespace: str = "moe-serve-tests") -> Iterator[tuple[Cluster, list]]:
    if ray.is_initialized():
        ray.shutdown()
    # NOTE: held for the whole cluster's life: nodes started later (add_node) and the driver's connection
    # by address keep 127.0.0.1 only inside it.
    patch = pytest.MonkeyPatch()
    patch.delenv("RAY_ADDRESS", raising=False)
    with one_machine_ray():
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        try:
            nodes = [cluster.add_node(num_cpus=cpus_per_worker, node_ip_address="127.0.0.1") for _ in range(workers)]
            ray.init(address=cluster.address, namespace=namespace)
            cluster.wait_for_nodes()
            # NOTE: the nodes of the moment: a test may add and remove them
            with only_loopback(lambda: node_pids(cluster.head_node, *cluster.worker_nodes)):
                yield cluster, nodes
        finally:
            ray.shutdown()
            cluster.shutdown()
            patch.undo()


def remove_node_by_id(cluster: Cluster, nodes: list, node_id: str) -> None:
    """Remove the worker raylet with this node id (what losing a machine looks like)."""
    node = next(n for n in nodes if n.node_id == node_id)
    cluster.remove_node(node)
