"""Shared fixtures. `ray_local`: one local Ray per module, bound to loopback (tests/integration,
tests/chaos); every test cleans up its actors."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    # NOTE: address="local": always a fresh instance, never a cluster another test or process left running.
    ray.init(address="local", num_cpus=16, include_dashboard=False, namespace="moe-serve-tests", _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
