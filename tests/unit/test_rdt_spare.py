"""spare_actors_of_failed_transfers: Ray's RDT failure monitor keeps its bookkeeping for a failed gloo or
CUDA IPC transfer but kills neither end; an NCCL transfer still goes to Ray's own abort (which kills)."""

from __future__ import annotations

import pytest
import ray
from ray.experimental.rdt.rdt_manager import TransferMetadata

from router_svc.transports.rdt import spare_actors_of_failed_transfers

pytestmark = pytest.mark.unit


class _Ref:
    def __init__(self, name: str) -> None:
        self.name = name

    def hex(self) -> str:
        return self.name


def _failed(backend: str) -> tuple[_Ref, dict]:
    send, recv = _Ref(f"{backend}-send"), _Ref(f"{backend}-recv")
    info = TransferMetadata(src_actor="not an actor", dst_actor="not an actor", send_ref=send, recv_ref=recv,
                            communicator_meta=None, backend=backend, obj_id=f"{backend}-obj", timeout=60.0)
    return recv, {send.hex(): info, recv.hex(): info, "other": "kept"}


@pytest.fixture()
def manager():
    m = ray._private.worker.global_worker.rdt_manager
    saved = m.__dict__.get("_abort_transport")
    yield m
    if saved is None:
        m.__dict__.pop("_abort_transport", None)
    else:
        m._abort_transport = saved


@pytest.mark.parametrize("backend", ["GLOO", "TORCH_GLOO", "CUDA_IPC"])
def test_a_failed_gloo_or_cuda_ipc_transfer_is_forgotten_and_nobody_killed(manager, backend: str) -> None:
    assert spare_actors_of_failed_transfers() and spare_actors_of_failed_transfers()  # installed once, idempotent
    ref, info_map = _failed(backend)
    manager._abort_transport(ref, info_map, TimeoutError("transfer timed out\nmore lines"))  # would ray.kill the strings
    assert info_map == {"other": "kept"}


def test_a_failed_nccl_transfer_goes_to_rays_abort(manager) -> None:
    """Ray's own abort (here a recorder standing in for it: Ray's would kill both ends) gets the NCCL
    transfer, unchanged."""
    calls = []
    manager._abort_transport = lambda ref, info_map, exc: calls.append((ref.hex(), len(info_map), str(exc)))
    assert spare_actors_of_failed_transfers()
    ref, info_map = _failed("NCCL")
    manager._abort_transport(ref, info_map, TimeoutError("transfer timed out"))
    assert calls == [("NCCL-recv", 3, "transfer timed out")]
