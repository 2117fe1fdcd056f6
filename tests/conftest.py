"""Shared fixtures. `ray_local`: one local Ray per module, bound to loopback (tests/integration,
tests/chaos), which it checks at the end: no process of that Ray (its servers, workers, the actors
the module's deployments ran, their gRPC and collective servers) listened elsewhere; every test
cleans up its actors."""

from __future__ import annotations

import pytest
import ray

from cluster.deploy import start_local_ray
from tests.helpers.sockets import node_pids, only_loopback


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    # NOTE: always a fresh instance (never a cluster another test or process left running), every server
    # of it on 127.0.0.1.
    start_local_ray(num_cpus=16, include_dashboard=False, namespace="moe-serve-tests")
    try:
        with only_loopback(lambda: node_pids(ray._private.worker._global_node)):
            yield
    finally:
        ray.shutdown()
