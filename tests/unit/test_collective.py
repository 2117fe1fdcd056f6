"""expert_workers.collective: the bound on a process's gloo waits, and the reset."""

from __future__ import annotations

import os
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


def test_the_store_of_a_group_led_here_listens_on_its_address_alone(monkeypatch) -> None:
    """A gloo group this process leads (rank 0, as the router's RDT peer leads every one) keeps its
    store on the address its members are given (here loopback); torch's own listens on every interface."""
    import importlib
    import socket

    from tests.helpers.sockets import is_loopback, listening

    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    monkeypatch.setattr(rendezvous, "_create_c10d_store", rendezvous._create_c10d_store)  # put back after the test

    def new_sockets() -> list[tuple[str, int, int]]:
        """The sockets a one-member group led here listens on, to 127.0.0.1 as its members' address."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        before = {(a, p) for a, p, _ in listening([os.getpid()])}
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
        try:
            dist.barrier()
            return [x for x in listening([os.getpid()]) if x[:2] not in before]
        finally:
            collective.reset()

    torch_own = new_sockets()
    assert any(not is_loopback(a) for a, _, _ in torch_own), torch_own
    collective.store_on_its_address()
    collective.store_on_its_address()  # once is enough; twice changes nothing
    ours = new_sockets()
    assert ours and all(is_loopback(a) for a, _, _ in ours), ours
