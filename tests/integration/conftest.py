"""tests/integration: one local Ray per module, bound to loopback; every test cleans up its actors."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=16, include_dashboard=False, namespace="moe-serve-tests", _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
