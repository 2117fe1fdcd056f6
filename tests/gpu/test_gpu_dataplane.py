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
# each group's share of the one GPU: two deployments of 3 fit at once (a module fixture's lives until
# the module ends, beside the SIGSTOP test's own)
GROUP_GPUS = 0.15


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gpu_deployment(request, ray_local, tmp_path_factory):
    assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray sees no GPU"
    make, shared = FAMILIES[request.param]
    path = hf.save(hf.randomise_moe(make(), seed=7), tmp_path_factory.mktemp("ckpt") / request.param)
    dep = deploy({"model": {"path": path}, "gateway": {"port": 0},
                  "deployment": {"name": "gpu", "expert_groups": GROUPS, "group_gpus": GROUP_GPUS, "device": "cuda", "transport": "rdt",
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


def test_a_group_that_stops_answering_under_rdt_traffic_takes_no_other_with_it(ray_local) -> None:
    """SIGSTOP one of 3 groups sharing the GPU while RDT (CUDA IPC) batches flow, 2 copies of every expert,
    no supervisor: its batches are given up once it misses its pings and planned again on the other
    copies; every request answers, exact, and the other groups stay alive (Ray would kill both ends of a
    failed CUDA IPC transfer). Continued, it serves again, and RDT is built again with it."""
    import concurrent.futures as cf
    import os
    import signal
    import time

    spec = dict(hidden_size=64, intermediate_size=96, num_experts=8, num_layers=2, moe_layers=[0, 1],
                routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))
    dep = deploy({"model": {"random": spec, "seed": 5}, "gateway": {"port": 0},
                  "deployment": {"name": "gpustop", "expert_groups": GROUPS, "group_gpus": GROUP_GPUS, "device": "cuda",
                                 "transport": "rdt", "replicas": 2, "supervisor": False}})
    ref = LocalMoE.from_config(spec, seed=5)
    pid = int(ray.get(dep.groups[1].info.remote(), timeout=30)["pid"])
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(1 + i % 30, 64, generator=gen) for i in range(160)]

    def client(k: int) -> int:
        for i in range(k, len(xs), 8):
            got = dep.result(dep.submit(xs[i], i % 2), xs[i], timeout=120)
            assert _rel(got, ref.forward(xs[i], i % 2)) < 1e-5
        return len(range(k, len(xs), 8))

    def status() -> dict:
        return ray.get(dep.routers[0].status.remote(), timeout=30)

    def until(predicate, what: str, bound_s: float = 60) -> None:
        deadline = time.monotonic() + bound_s
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    try:
        assert status()["rdt_routes"] == ["cuda_ipc"] * GROUPS
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, k) for k in range(8)]
            until(lambda: status()["counters"]["requests"] >= 20, "no traffic flowed")
            os.kill(pid, signal.SIGSTOP)
            assert sum(f.result() for f in futures) == len(xs)
        assert 1 in status()["dead"], status()
        assert all(ray.get([g.ping.remote() for i, g in enumerate(dep.groups) if i != 1], timeout=30))
        os.kill(pid, signal.SIGCONT)
        until(lambda: status()["dead"] == [] and status()["rdt_ready"], "the continued group never served RDT again")
        for i in range(20):
            x = torch.randn(1 + i, 64, generator=gen)
            out = dep.forward_output(x, i % 2)
            assert out.transport == "rdt" and _rel(torch.from_numpy(np.array(out.hidden_states)), ref.forward(x, i % 2)) < 1e-5
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        dep.shutdown()
