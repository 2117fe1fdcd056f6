"""RDT on CUDA: which backend reaches each expert group from where Ray placed it (rdt_routes), and the
GPU share a CUDA group leaves free for the router's RDT peer (cluster.deploy.group_gpu_request)."""

from __future__ import annotations

import pytest

from cluster.deploy import group_gpu_request
from router_svc.transports.rdt import PEER_GPUS, Unrouted, rdt_routes

pytestmark = pytest.mark.unit
A, B = "node-a" * 4, "node-b" * 4


def test_groups_on_the_peers_gpu_are_reached_by_cuda_ipc() -> None:
    """One GPU shared by the peer and every group (fractional num_gpus): no collective group at all."""
    assert rdt_routes((A, ("0",)), [(A, ("0",))] * 3) == ["cuda_ipc"] * 3


def test_groups_on_other_gpus_are_reached_by_nccl() -> None:
    """A group per GPU; the peer shares GPU 1 with one of them: IPC to that one, NCCL to the rest,
    GPU 0 of another node included (same id, other node)."""
    members = [(A, ("0",)), (A, ("1",)), (A, ("2",)), (B, ("0",)), (B, ("1",))]
    assert rdt_routes((A, ("1",)), members) == ["nccl", "cuda_ipc", "nccl", "nccl", "nccl"]


def test_a_group_of_several_gpus_is_reached_on_its_first() -> None:
    """A group computes on its first visible GPU; IPC needs the peer on that one."""
    assert rdt_routes((A, ("2",)), [(A, ("2", "3")), (A, ("0", "1"))]) == ["cuda_ipc", "nccl"]
    assert rdt_routes((A, ("3",)), [(A, ("2", "3"))]) == ["nccl"]


def test_two_nccl_ranks_on_one_gpu_admit_no_route() -> None:
    """NCCL takes one rank per GPU: two groups sharing a GPU away from the peer cannot both join."""
    with pytest.raises(Unrouted, match=r"expert groups 0 and 2 share GPU 1 of node .*one rank per GPU"):
        rdt_routes((A, ("0",)), [(A, ("1",)), (B, ("1",)), (A, ("1",))])


@pytest.mark.parametrize("worker, members, problem", [
    ((A, ()), [(A, ("0",))], "the router's RDT peer holds no GPU"),
    ((A, ("0",)), [(A, ("0",)), (A, ())], "expert group 1 holds no GPU"),
])
def test_a_process_without_a_gpu_admits_no_route(worker, members, problem: str) -> None:
    with pytest.raises(Unrouted, match=problem):
        rdt_routes(worker, members)


@pytest.mark.parametrize("asked, requested", [(1.0, 1 - PEER_GPUS), (0.5, 0.5 - PEER_GPUS), (0.25, 0.25 - PEER_GPUS),
                                              (2.0, 2.0), (4, 4), (PEER_GPUS, PEER_GPUS)])
def test_cuda_groups_leave_the_rdt_peer_a_share_of_a_gpu(asked: float, requested: float) -> None:
    """Fractions up to one GPU give up the peer's share; whole GPUs above one stay whole (Ray takes no
    fraction there); a share no larger than the peer's is left as asked (nothing would remain)."""
    got = group_gpu_request(asked)
    assert got == pytest.approx(requested, abs=1e-9)
    assert got <= 1 or got == int(got)
