"""expert_workers.collective: the bound on a process's gloo waits, and the reset."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from expert_workers import collective


@pytest.fixture()
def default_timeout():
    saved = c10d.default_pg_timeout
    yield
    c10d.default_pg_timeout = saved


def test_bound_waits_is_the_timeout_torch_gives_a_gloo_group_made_without_one(default_timeout) -> None:
    """Ray makes its gloo groups with no timeout; torch then reads its module default at call time."""
    assert c10d._get_default_timeout(dist.Backend.GLOO) == timedelta(minutes=30)
    collective.bound_waits(7)
    assert c10d._get_default_timeout(dist.Backend.GLOO) == timedelta(seconds=7)
    collective.bound_waits()
    assert c10d._get_default_timeout(dist.Backend.GLOO) == timedelta(seconds=collective.COLLECTIVE_TIMEOUT_S)


def test_a_group_joined_under_the_bound_waits_no_longer_than_it(default_timeout, tmp_path) -> None:
    """A one-member wait: joining a two-member group whose other member never comes gives up at the bound."""
    collective.bound_waits(1.5)
    t0 = time.monotonic()
    with pytest.raises(Exception):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=2)
    assert time.monotonic() - t0 < 60  # liveness only: unbounded, this waits 30 minutes
    assert not dist.is_initialized()
    assert collective.reset() is False
