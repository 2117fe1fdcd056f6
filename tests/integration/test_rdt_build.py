"""Building RDT: where the router's RDT peer goes on CUDA, on a Ray that counts GPUs it does not have,
and a build that a new routing table overtakes.

Ray hands out GPU ids as a resource (`ray.init(num_gpus=...)`); expert groups hold their share and
report the ids, while computing on the CPU here. So the placement half of RDT on CUDA runs for real:
the peer finds room only because deploy asks for `group_gpus` less its share, and the routes follow
from where Ray put everyone. Moving tensors over CUDA IPC needs the device (tests/gpu).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from cluster.deploy import group_gpu_request, start_local_ray
from expert_workers.group import CONCURRENCY_GROUPS, ExpertGroup
from expert_workers.source import SourceSpec
from expert_workers.spec import MoESpec
from router_svc.transports.rdt import PEER_GPUS, REBUILD_DELAY_S, UNROUTED_RETRY_S, RdtTransport
from tests.helpers.sockets import node_pids, only_loopback

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SPEC = MoESpec.from_dict(dict(hidden_size=16, intermediate_size=8, num_experts=4, num_layers=1, moe_layers=[0],
                              routing=dict(policy="topk_softmax", top_k=2)))


@pytest.fixture(scope="module")
def ray_one_gpu():
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=8, num_gpus=1, include_dashboard=False, namespace="moe-serve-tests")
    try:
        with only_loopback(lambda: node_pids(ray._private.worker._global_node)):
            yield
    finally:
        ray.shutdown()


def _groups(n: int, num_gpus: float) -> list:
    cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertGroup)
    groups = [cls.options(num_cpus=0.5, num_gpus=num_gpus).remote(f"share-{i}", SourceSpec(random=SPEC), []) for i in range(n)]
    ray.get([g.info.remote() for g in groups], timeout=60)
    return groups


def _until_gone(actor: str, what: str) -> None:
    deadline = time.monotonic() + 20
    while actor in [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]:
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _build(groups: list) -> tuple[bool, list[str] | None, str | None]:
    async def go() -> tuple[bool, list[str] | None, str | None]:
        t = RdtTransport(groups, [""] * len(groups), "cuda", place_s=5.0)
        await t.start()
        out = (t.ready, t.routes, t.unrouted)
        await t.close()
        return out

    return asyncio.run(go())


@pytest.mark.parametrize("n, group_gpus", [(1, 1.0), (3, 0.3)])
def test_the_peer_finds_room_beside_groups_that_asked_for_their_share(ray_one_gpu, n: int, group_gpus: float) -> None:
    """Groups asking group_gpu_request(group_gpus) leave the peer its 0.01 of the GPU they share:
    RDT is built, and reaches every group by CUDA IPC (no collective group, no NCCL)."""
    groups = _groups(n, group_gpu_request(group_gpus))
    try:
        assert {tuple(i["gpu_ids"]) for i in ray.get([g.info.remote() for g in groups])} == {("0",)}
        ready, routes, unrouted = _build(groups)
        assert ready and routes == ["cuda_ipc"] * n and unrouted is None
    finally:
        for g in groups:
            ray.kill(g)


def test_groups_that_take_the_whole_gpu_leave_the_peer_no_room(ray_one_gpu) -> None:
    """The same build beside a group holding the whole GPU (as deploy asked before it left the share):
    the build gives up after place_s with the reason, removes the pending peer and does not try again
    at once; the router's start and set_transport never wait on it for ever."""
    groups = _groups(1, 1.0)

    async def go() -> tuple[RdtTransport, float, bool, bool]:
        t = RdtTransport(groups, [""], "cuda", worker_name="unplaced-rdt", namespace="moe-serve", place_s=3.0)
        t0 = time.monotonic()
        await t.start()
        took = time.monotonic() - t0
        again = t.available()  # not built again at once: the next try waits UNROUTED_RETRY_S
        return t, took, again, t._building is None

    try:
        t, took, again, no_retry = asyncio.run(go())
        assert not t.ready and t.routes is None and not again and no_retry and t._retry_s == UNROUTED_RETRY_S
        assert 3.0 <= took < 20, took
        assert t.unrouted == (f"Ray did not place the router's RDT peer within 3 s (it needs {PEER_GPUS} of a GPU: "
                              "leave that share free beside the expert groups)")
        _until_gone("unplaced-rdt-0", "the pending RDT peer was left waiting for a GPU")
    finally:
        for g in groups:
            ray.kill(g)


def test_a_build_overtaken_by_a_new_table_is_not_used(ray_one_gpu) -> None:
    """A table adopted while RDT is being built (the router hands the transports a new group list) makes
    that build stale: it is torn down (its peer killed) and built again for the new list shortly, never
    used with routes indexed for the old one."""
    groups = _groups(2, 0)

    async def go() -> tuple[bool, float, bool, bool]:
        t = RdtTransport(groups, [""] * 2, "cpu", worker_name="stale-rdt", namespace="moe-serve", place_s=10.0)
        build = asyncio.get_running_loop().create_task(t._build())
        await asyncio.sleep(0)  # the build has taken its group list and is pinging them
        t.groups = list(groups)  # what Router.update_table does
        await build
        ready, retry_s, no_worker = t.ready, t._retry_s, t.worker is None
        await t.start()  # the next build, for the list in use
        fresh = t.ready and t.routes == ["gloo", "gloo"]
        await t.close()
        return ready, retry_s, no_worker, fresh

    try:
        ready, retry_s, no_worker, fresh = asyncio.run(go())
        assert not ready and retry_s == REBUILD_DELAY_S and no_worker and fresh
        _until_gone("stale-rdt-0", "the stale build's RDT peer was left running")
    finally:
        for g in groups:
            ray.kill(g)
