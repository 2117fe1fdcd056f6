"""Which collective group a failed RDT batch tears down: the one it was sent through, never one built
after it (the health watch rebuilds a broken group as soon as every expert group answers again)."""

from __future__ import annotations

import asyncio

import pytest

from router_svc.transports.rdt import RdtTransport

pytestmark = pytest.mark.unit


def _built(worker: str) -> RdtTransport:
    t = RdtTransport([], [], "cpu")
    # NOTE: strings stand in for the actor handles: killing one fails, which teardown ignores (a dead peer)
    t.worker, t.routes = worker, ["gloo"]
    return t


def test_a_batch_failing_through_a_replaced_worker_leaves_the_group_built_since() -> None:
    t = _built("rebuilt")
    asyncio.run(t._break_if_current("broken before", "the batch's peer died"))
    assert t.worker == "rebuilt" and t.routes == ["gloo"] and t.available()


def test_a_batch_failing_through_the_current_worker_breaks_its_group() -> None:
    t = _built("current")
    asyncio.run(t._break_if_current("current", "a member died"))
    assert t.worker is None and t.routes is None and not t.ready
