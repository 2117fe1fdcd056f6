"""The data plane on one GPU: expert groups sharing it (fractional num_gpus), RDT over CUDA IPC.

Not run in CI (skipped where torch sees no CUDA device); `scripts/gpu_check.sh` runs it on a GPU
machine. Every transport must equal LocalMoE computed on the CPU in float32 (relative error < 1e-5:
cuBLAS sums in another order; TF32 is off for float32 matrix products, torch's default).
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from cluster import deploy
from router_svc import LocalMoE
from tests.helpers import hf_models as hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

FAMILIES = {
    "mixtral": (lambda: hf.mixtral(hidden=64, inter=96, layers=2, experts=8, k=2), "router"),
    "qwen2_moe": (lambda: hf.qwen2_moe(hidden=48, inter=32, layers=2, experts=6, k=2, shared=40), "slot"),
    "deepseek_v3": (lambda: hf.deepseek_v3(hidden=32, inter=16, layers=3, experts=12, k=3), "slot"),
}
MODES = ("rdt", "object_store", "grpc", "auto")
GROUPS = 3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gpu_deployment(request, ray_local, tmp_path_factory):
    assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray sees no GPU"
    make, shared = FAMILIES[request.param]
    path = hf.save(hf.randomise_moe(make(), seed=7), tmp_path_factory.mktemp("ckpt") / request.param)
    dep = deploy({"model": {"path": path}, "gateway": {"port": 0},
                  "deployment": {"name": "gpu", "expert_groups": GROUPS, "group_gpus": 0.3, "device": "cuda", "transport": "rdt",
                                 "shared_experts": shared, "batch_max_wait_us": 200}})
    yield request.param, dep, LocalMoE.from_pretrained(path)
    dep.shutdown()


def test_groups_share_the_gpu_and_rdt_reaches_them_by_cuda_ipc(gpu_deployment) -> None:
    family, dep, ref = gpu_deployment
    infos = ray.get([g.info.remote() for g in dep.groups])
    assert all(i["device"].startswith("cuda") for i in infos), infos
    assert len({tuple(i["gpu_ids"]) for i in infos}) == 1, [i["gpu_ids"] for i in infos]
    status = ray.get(dep.routers[0].status.remote())
    assert status["rdt_ready"] and status["rdt_routes"] == ["cuda_ipc"] * GROUPS, status


def test_every_transport_on_the_gpu_equals_local_moe(gpu_deployment) -> None:
    family, dep, ref = gpu_deployment
    gen = torch.Generator().manual_seed(1)
    for mode in MODES:
        status = ray.get(dep.routers[0].set_transport.remote(mode))
        for layer in dep.spec.moe_layers:
            for tokens in (1, 2000):
                x = torch.randn(tokens, dep.spec.hidden_size, generator=gen)
                out = dep.forward_output(x, layer)
                assert out.transport == status["chain"][0], (mode, status, out.transport)
                got = torch.from_numpy(np.array(out.hidden_states))
                assert _rel(got, ref.forward(x, layer)) < 1e-5, (family, mode, layer, tokens)
    print(family, "auto measured (ms):", status["measured_ms"])


def test_concurrent_requests_on_the_gpu_each_get_their_own_answer(gpu_deployment) -> None:
    """64 requests of different sizes and layers in flight at once over RDT (CUDA IPC)."""
    family, dep, ref = gpu_deployment
    ray.get(dep.routers[0].set_transport.remote("rdt"))
    gen = torch.Generator().manual_seed(5)
    layers = list(dep.spec.moe_layers)
    reqs = [(torch.randn(1 + (17 * i) % 150, dep.spec.hidden_size, generator=gen), layers[i % len(layers)]) for i in range(64)]
    outs = ray.get([dep.submit(x, layer) for x, layer in reqs])
    for (x, layer), out in zip(reqs, outs):
        assert out.transport == "rdt"
        got = torch.from_numpy(np.array(out.hidden_states))
        assert got.shape == x.shape and _rel(got, ref.forward(x, layer)) < 1e-5


def test_rdt_is_rebuilt_after_its_peer_dies(gpu_deployment) -> None:
    """The router's RDT peer killed between batches: the object store serves, then RDT is built again."""
    import time

    family, dep, ref = gpu_deployment
    ray.get(dep.routers[0].set_transport.remote("rdt"))
    layer = dep.spec.moe_layers[0]
    x = torch.randn(7, dep.spec.hidden_size)
    assert dep.forward_output(x, layer).transport == "rdt"
    before = ray.get(dep.routers[0].status.remote())["rdt_rebuilds"]
    peer = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"{dep.name}-router-0-rdt-")]
    assert len(peer) == 1, peer
    ray.kill(ray.get_actor(peer[0], namespace="moe-serve"))
    deadline = time.monotonic() + 60
    while True:
        out = dep.forward_output(x, layer)
        assert _rel(torch.from_numpy(np.array(out.hidden_states)), ref.forward(x, layer)) < 1e-5
        if out.transport == "rdt":
            break
        assert time.monotonic() < deadline, "RDT was not rebuilt"
        time.sleep(0.2)
    assert ray.get(dep.routers[0].status.remote())["rdt_rebuilds"] > before
