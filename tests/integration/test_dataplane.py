"""The distributed data plane equals LocalMoE on the same checkpoint, over every CPU transport.

One deployment per family (3 expert groups); the router's transport mode is switched at
run time, so each of rdt (gloo), object_store, grpc and auto serves the same requests.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import numpy as np
import pytest
import ray
import torch

from cluster import deploy
from expert_workers.errors import InvalidRequestError
from router_svc import LocalMoE
from tests.helpers import hf_models as hf

pytestmark = pytest.mark.integration

FAMILIES = {
    "mixtral": (lambda: hf.mixtral(hidden=32, inter=24, layers=2, experts=6, k=2), "router"),
    "qwen2_moe": (lambda: hf.qwen2_moe(hidden=24, inter=16, layers=2, experts=5, k=2, shared=20), "slot"),
    "qwen3_moe": (lambda: hf.qwen3_moe(hidden=16, inter=10, layers=3, experts=7, k=3, dense=(1,)), "router"),
    "olmoe": (lambda: hf.olmoe(hidden=18, inter=14, layers=2, experts=9, k=3), "router"),
    "deepseek_v3": (lambda: hf.deepseek_v3(hidden=16, inter=6, layers=3, experts=12, k=3), "slot"),
}
MODES = ("rdt", "object_store", "grpc", "auto")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _alive_actor_names(prefix: str) -> list[str]:
    """Live named actors of this deployment (every actor a deployment makes is named)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _again_once_rebuilt(dep, x: torch.Tensor, layer: int, used: str):
    """A request RDT did not serve: only acceptable when its collective group broke under it (Ray's gloo
    transfers time out, rarely, with no fault injected) and the router answered on the fallback. The
    router then rebuilds the group; the same request, sent again, must be served by RDT."""
    status = ray.get(dep.routers[0].status.remote(), timeout=30)
    assert status["counters"]["fallbacks_by_from"].get("rdt", 0) >= 1, (used, status["counters"])
    deadline = time.monotonic() + 120
    while not ray.get(dep.routers[0].status.remote(), timeout=30)["rdt_ready"]:
        assert time.monotonic() < deadline, "the broken collective group was never rebuilt"
        dep.forward_output(x, layer)  # traffic drives the rebuild
        time.sleep(0.2)
    return dep.forward_output(x, layer)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_deployment(request, ray_local, tmp_path_factory):
    make, shared = FAMILIES[request.param]
    path = hf.save(hf.randomise_moe(make(), seed=7), tmp_path_factory.mktemp("ckpt") / request.param)
    dep = deploy({"model": {"path": path}, "gateway": {"port": 0}, "deployment": {"name": "dp", "expert_groups": 3, "transport": "rdt",
                                                          "shared_experts": shared, "batch_max_wait_us": 200}})
    yield request.param, dep, LocalMoE.from_pretrained(path)
    dep.shutdown()


def test_every_transport_equals_local_moe(family_deployment) -> None:
    family, dep, ref = family_deployment
    assert len(dep.groups) == 3
    gen = torch.Generator().manual_seed(1)
    for mode in MODES:
        status = ray.get(dep.routers[0].set_transport.remote(mode))
        assert status["chain"][0] in ("rdt", "object_store", "grpc")
        for layer in dep.spec.moe_layers:
            for tokens in (1, 2000):
                x = torch.randn(tokens, dep.spec.hidden_size, generator=gen)
                out = dep.forward_output(x, layer)
                expected_transport = status["chain"][0]
                if expected_transport == "rdt" and out.transport != "rdt":
                    out = _again_once_rebuilt(dep, x, layer, out.transport)
                assert out.transport == expected_transport, (mode, out.transport)
                got = torch.from_numpy(np.array(out.hidden_states))
                assert _rel(got, ref.forward(x, layer)) < 1e-6, (family, mode, layer, tokens)


def test_routing_report_matches_local(family_deployment) -> None:
    family, dep, ref = family_deployment
    layer = dep.spec.moe_layers[-1]
    x = torch.randn(3, 5, dep.spec.hidden_size)
    out, report = dep.forward(x, layer, return_routing=True)
    ref_out, ref_report = ref.forward(x, layer, return_routing=True)
    assert out.shape == x.shape
    assert _rel(out, ref_out) < 1e-6
    torch.testing.assert_close(report.token_index, ref_report.token_index)
    torch.testing.assert_close(report.expert, ref_report.expert)
    torch.testing.assert_close(report.weight, ref_report.weight)
    assert report.stats.tokens_per_expert == ref_report.stats.tokens_per_expert


def test_status_rpc_reports_the_rdt_route_to_every_group(family_deployment) -> None:
    from router_svc.client import MoEClient

    family, dep, ref = family_deployment
    ray.get(dep.routers[0].set_transport.remote("rdt"))
    x = torch.randn(5, dep.spec.hidden_size)
    deadline = time.monotonic() + 60
    with MoEClient(dep.gateway_addresses) as client:
        # NOTE: a rare no-fault gloo transfer timeout (see _again_once_rebuilt) leaves it "not built"
        # until traffic has it rebuilt
        while not (router := client.status().routers[0]).rdt.startswith("ready") and time.monotonic() < deadline:
            dep.forward_output(x, dep.spec.moe_layers[0])
            time.sleep(0.2)
    assert router.transports[0] == "rdt" and router.rdt == "ready: gloo, gloo, gloo", router


def test_bad_requests_fail_clearly_and_the_router_keeps_serving(family_deployment) -> None:
    family, dep, ref = family_deployment
    d = dep.spec.hidden_size
    with pytest.raises(InvalidRequestError, match=f"hidden size {d + 1} != model hidden size {d}"):
        dep.forward(torch.randn(4, d + 1), dep.spec.moe_layers[0])
    with pytest.raises(InvalidRequestError, match="not an MoE layer|out of range"):
        dep.forward(torch.randn(4, d), 99)
    # malformed and over the token limit (65536): its form is what is wrong, not the load
    with pytest.raises(InvalidRequestError, match=f"hidden size {d + 1} != model hidden size {d}"):
        dep.forward(torch.zeros(65537, d + 1), dep.spec.moe_layers[0])
    bad = torch.randn(4, d)
    bad[1, 2] = float("nan")
    with pytest.raises(InvalidRequestError, match="NaN or Inf"):
        dep.forward(bad, dep.spec.moe_layers[0])
    x = torch.randn(6, d)
    assert _rel(dep.forward(x, dep.spec.moe_layers[0]), ref.forward(x, dep.spec.moe_layers[0])) < 1e-6


def test_concurrent_requests_each_get_their_own_answer(family_deployment) -> None:
    """64 requests of different sizes and layers in flight at once; batching must never mix them up."""
    family, dep, ref = family_deployment
    ray.get(dep.routers[0].set_transport.remote("object_store"))
    gen = torch.Generator().manual_seed(5)
    layers = list(dep.spec.moe_layers)
    reqs = [(torch.randn(1 + (17 * i) % 150, dep.spec.hidden_size, generator=gen), layers[i % len(layers)]) for i in range(64)]
    refs = [dep.submit(x, layer) for x, layer in reqs]
    outs = ray.get(refs)
    batched = 0
    for (x, layer), out in zip(reqs, outs):
        got = torch.from_numpy(np.array(out.hidden_states))
        assert got.shape == x.shape
        assert _rel(got, ref.forward(x, layer)) < 1e-6
        batched += out.batch_requests > 1
    assert batched > 0, "no request was batched with another: dynamic batching did not engage"


@pytest.fixture(scope="module")
def random_spec() -> dict:
    return dict(hidden_size=48, intermediate_size=64, num_experts=8, num_layers=2, moe_layers=[0, 1],
                routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))


def _traffic(dep, ref, xs, clients: int = 8) -> tuple[list, list[str]]:
    """`clients` threads send every x once; each answer is checked against LocalMoE as it arrives."""

    def client(k: int) -> list[str]:
        used = []
        for i in range(k, len(xs), clients):
            out = dep.forward_output(xs[i], i % 2)
            got = torch.from_numpy(np.array(out.hidden_states))
            assert _rel(got, ref.forward(xs[i], i % 2)) < 1e-6
            used.append(out.transport)
        return used

    pool = cf.ThreadPoolExecutor(clients)
    return pool, [pool.submit(client, k) for k in range(clients)]


def test_auto_survives_its_collective_group_torn_down_mid_traffic(ray_local, random_spec) -> None:
    """auto (measured order) while the router's RDT peer is killed under 8 clients: all succeed, all exact."""
    dep = deploy({"model": {"random": random_spec, "seed": 2}, "gateway": {"port": 0}, "deployment": {"name": "tearauto", "expert_groups": 3, "transport": "auto"}})
    ref = LocalMoE.from_config(random_spec, seed=2)
    try:
        status = ray.get(dep.routers[0].status.remote())
        assert status["rdt_ready"] and set(status["measured_ms"]) == {"rdt", "object_store", "grpc"}
        gen = torch.Generator().manual_seed(9)
        xs = [torch.randn(5 + i % 40, 48, generator=gen) for i in range(160)]
        pool, futures = _traffic(dep, ref, xs)
        time.sleep(0.3)
        ray.kill(ray.get_actor(f"{dep.name}-router-0-rdt-0", namespace="moe-serve"))
        used = [t for f in futures for t in f.result()]
        pool.shutdown()
        assert len(used) == len(xs)
    finally:
        dep.shutdown()


def test_rdt_falls_back_then_rebuilds_its_collective_group(ray_local, random_spec) -> None:
    """transport=rdt: with the group's peer dead, batches fall back to the object store, then RDT is rebuilt.

    NOTE: the peer is killed between transfers. Ray kills both ends of an RDT transfer
    that fails in flight (rdt_manager: a two-sided collective would hang otherwise), so
    a peer dying mid-transfer takes expert groups with it; bringing those back is the
    supervisor's failover, not the transport's.
    """
    dep = deploy({"model": {"random": random_spec, "seed": 2}, "gateway": {"port": 0}, "deployment": {"name": "tearrdt", "expert_groups": 3, "transport": "rdt"}})
    ref = LocalMoE.from_config(random_spec, seed=2)
    try:
        gen = torch.Generator().manual_seed(9)
        xs = [torch.randn(5 + i % 40, 48, generator=gen) for i in range(120)]
        assert dep.forward_output(xs[0], 0).transport == "rdt"
        ray.kill(ray.get_actor(f"{dep.name}-router-0-rdt-0", namespace="moe-serve"))
        pool, futures = _traffic(dep, ref, xs)
        used = [t for f in futures for t in f.result()]
        pool.shutdown()
        assert len(used) == len(xs) and "object_store" in used, used
        deadline = time.time() + 30
        while dep.forward_output(xs[1], 1).transport != "rdt":  # traffic drives the rebuild
            assert time.time() < deadline, "RDT was not rebuilt"
            time.sleep(0.2)
        status = ray.get(dep.routers[0].status.remote())
        assert status["rdt_ready"] and status["rdt_rebuilds"] >= 2
        # every batch not carried by RDT (first in the chain) is a fallback: failed over, or skipped while broken
        c = status["counters"]
        assert c["fallbacks"] == c["batches"] - c["by_transport"].get("rdt", 0) > 0, c
        assert c["fallbacks_by_from"] == {"rdt": c["fallbacks"]}, c
        # the dead peer failed each group's forward and take of the batches it met; the router read them all
        pid = ray.get(dep.routers[0].__ray_call__.remote(lambda self: os.getpid()))
        assert _unhandled_errors(pid) == 0
    finally:
        dep.shutdown()


@ray.remote(num_cpus=0)
def _after(seconds: float, fail: bool = False) -> int:
    time.sleep(seconds)
    if fail:
        raise RuntimeError("failed on purpose")
    return 1


def test_rdt_refs_ready_waits_for_values_and_errors_and_its_thread_ends_when_given_up(ray_local) -> None:
    """`refs_ready` (the RDT dispatch's wait between stages) returns once every ref has a value or an error,
    not before; given up (cancelled), its waiting thread ends within READY_SLICE_S."""
    import asyncio
    import threading

    from router_svc.transports.rdt import READY_SLICE_S, refs_ready

    def waiting() -> int:
        return sum(t.name == "rdt-ready" for t in threading.enumerate())

    async def scenario() -> float:
        t0 = time.monotonic()
        # the error last: a wait that took an error for not ready, or went on past it, fails here
        await asyncio.wait_for(refs_ready([_after.remote(0.2), _after.remote(0.5, fail=True)]), timeout=20)
        took = time.monotonic() - t0
        slow = _after.remote(30.0)
        waiter = asyncio.ensure_future(refs_ready([slow]))
        await asyncio.sleep(0.3)
        assert not waiter.done() and waiting() == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        ray.cancel(slow, force=True)
        return took

    took = asyncio.run(scenario())
    assert took >= 0.5
    deadline = time.monotonic() + READY_SLICE_S + 5.0
    while waiting() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting() == 0


def _unhandled_errors(pid: int) -> int:
    """How often Ray logged an "Unhandled error" (a ref that ended in an error and was dropped unread) in
    the log files of the worker process `pid`."""
    logs = ray._private.worker._global_node.get_logs_dir_path()
    return sum(open(os.path.join(logs, f), errors="replace").read().count("Unhandled error")
               for f in os.listdir(logs) if f.startswith("worker-") and f.endswith(f"-{pid}.err"))


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    out.append(address)
    return out


def test_the_tests_ray_serves_on_loopback_only(ray_local) -> None:
    """Every node says 127.0.0.1 and the GCS listens on loopback alone (Ray would otherwise swap the
    address for the machine's routable one and listen on every interface; cluster.deploy.start_local_ray)."""
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    assert host == "127.0.0.1"
    listening = _listening(int(port))
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert listening and set(listening) <= loopback, listening


def test_shutdown_leaves_no_actors(ray_local, random_spec) -> None:
    dep = deploy({"model": {"random": random_spec}, "gateway": {"port": 0}, "deployment": {"name": "bye", "expert_groups": 3, "routers": 2, "transport": "rdt"}})
    assert dep.forward(torch.randn(3, 48), 0).shape == (3, 48)
    names = _alive_actor_names(dep.name)
    assert len(names) == 3 + 2 + 1 + 1, names  # groups, routers, the owning router's RDT peer, the supervisor
    assert [ray.get(r.status.remote())["rdt_owner"] for r in dep.routers] == [True, False]
    dep.shutdown()
    deadline = time.time() + 30
    while _alive_actor_names(dep.name):
        assert time.time() < deadline, _alive_actor_names(dep.name)
        time.sleep(0.2)


def test_a_gateway_port_in_use_fails_the_deploy_with_a_reason_and_leaves_no_actors(ray_local, random_spec) -> None:
    import socket

    from expert_workers.errors import ConfigError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"gateway.port.*127.0.0.1:{port} is in use"):
            deploy({"model": {"random": random_spec}, "gateway": {"host": "127.0.0.1", "port": port},
                    "deployment": {"name": "portheld", "expert_groups": 2}})
    deadline = time.time() + 30
    while _alive_actor_names("portheld"):
        assert time.time() < deadline, _alive_actor_names("portheld")
        time.sleep(0.2)


_DRIVER_LEAVES = """
import sys, time
import ray
from cluster import deploy
ray.init(address=sys.argv[1], namespace="moe-serve-tests")
spec = dict(hidden_size=16, intermediate_size=8, num_experts=4, num_layers=1, moe_layers=[0], routing=dict(policy="topk_softmax", top_k=2))
dep = deploy({"model": {"random": spec}, "gateway": {"port": 0},
              "deployment": {"name": "orphans", "expert_groups": 2, "routers": 1, "supervisor_period_s": 0.2}})
first = ray.get(dep.supervisor.status.remote())["groups"][0]
ray.kill(dep.groups[0])
ray.kill(dep.routers[0])
deadline = time.time() + 120
while True:
    st = ray.get(dep.supervisor.status.remote())
    if st["groups"][0] != first and any(e["kind"] == "router_restart" for e in st["events"]):
        break
    assert time.time() < deadline, st
    time.sleep(0.1)
print("NAME", dep.name, flush=True)
"""  # ...and the driver exits without shutdown()


def test_a_driver_that_exits_without_shutdown_leaves_no_actors(ray_local, tmp_path) -> None:
    """A deployment that is not detached ends with its driver, replacements the supervisor made (detached,
    to outlive a supervisor restart) included: they are tied to the supervisor and end when it is gone."""
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(_DRIVER_LEAVES)
    address = ray.get_runtime_context().gcs_address
    # NOTE: the test's Ray is on 127.0.0.1 only; a driver joins it by address only as a one-machine
    # cluster (cluster.deploy.start_local_ray)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    run = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert run.returncode == 0, run.stderr[-3000:]
    name = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("NAME ")][0]
    deadline = time.time() + 60
    while _alive_actor_names(name):
        assert time.time() < deadline, _alive_actor_names(name)
        time.sleep(0.5)


def test_tied_replacements_outlive_a_supervisor_restart(ray_local, random_spec) -> None:
    """A supervisor Ray restarts keeps its name throughout, so the actors tied to it carry on serving."""
    from expert_workers import tie

    dep = deploy({"model": {"random": random_spec}, "gateway": {"port": 0},
                  "deployment": {"name": "tied", "expert_groups": 2, "supervisor_period_s": 0.2}})
    try:
        first = ray.get(dep.supervisor.status.remote())["groups"][0]
        ray.kill(dep.groups[0])
        deadline = time.time() + 120
        while (st := ray.get(dep.supervisor.status.remote()))["groups"][0] == first:
            assert time.time() < deadline, st
            time.sleep(0.1)
        replacement = st["groups"][0]
        looks = []
        for restarts in (1, 2):
            ray.kill(dep.supervisor, no_restart=False)
            deadline = time.time() + 120
            while True:
                # what a tied actor sees while Ray restarts the supervisor: never gone
                looks.append(tie.gone(f"{dep.name}-supervisor", "moe-serve"))
                try:
                    if ray.get(dep.supervisor.status.remote(), timeout=5)["restarts"] >= restarts:
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
                assert time.time() < deadline
                time.sleep(0.1)
        assert looks and True not in looks, looks
        time.sleep(tie.TIE_PERIOD_S * (tie.TIE_MISSES + 1))  # long enough for a tie to have ended it
        assert replacement in _alive_actor_names(dep.name)
        x = torch.randn(5, 48)
        assert dep.forward(x, 0).shape == (5, 48)
    finally:
        dep.shutdown()


def test_cpu_groups_ask_for_huge_pages_unless_told_not_to(ray_local, random_spec) -> None:
    """`huge_pages` reaches every CPU group's process (a replacement made by the supervisor too), and off means off."""
    on = deploy({"model": {"random": random_spec}, "gateway": {"enabled": False}, "deployment": {"name": "thp", "expert_groups": 2}})
    try:
        infos = ray.get([g.info.remote() for g in on.groups])
        assert [i["huge_pages"] for i in infos] == [True, True], infos
        mems = ray.get([g.memory.remote() for g in on.groups])
        assert all(isinstance(m["huge_page_bytes"], int) and 0 <= m["huge_page_bytes"] <= m["rss_bytes"] for m in mems), mems
        assert all(m["rss_bytes"] > 0 for m in mems), mems
        ray.kill(on.groups[0])
        deadline = time.time() + 60
        while True:  # the supervisor's replacement is made with the same options
            names = [n for n in _alive_actor_names(on.name) if "-group-" in n]
            fresh = [n for n in names if n not in (infos[0]["name"], infos[1]["name"])]
            if fresh:
                info = ray.get(ray.get_actor(fresh[0], namespace="moe-serve").info.remote())
                assert info["huge_pages"] is True, info
                break
            assert time.time() < deadline, names
            time.sleep(0.2)
    finally:
        on.shutdown()
    off = deploy({"model": {"random": random_spec}, "gateway": {"enabled": False},
                  "deployment": {"name": "nothp", "expert_groups": 1, "huge_pages": False, "supervisor": False}})
    try:
        assert ray.get(off.groups[0].info.remote())["huge_pages"] is False
        assert off.forward(torch.ones(2, 48), 0).shape == (2, 48)
    finally:
        off.shutdown()


@pytest.mark.parametrize("routing", [
    {"policy": "expert_choice", "capacity_factor": 1.0},
    {"policy": "topk_softmax", "capacity_factor": 0.75, "overflow": "reroute"},
    {"policy": "topk_softmax", "capacity_factor": 0.5, "overflow": "drop"},
], ids=["expert_choice", "reroute", "drop"])
def test_batched_requests_keep_their_own_capacity(ray_local, random_spec, routing: dict) -> None:
    """Capacity and expert choice are per request: batched answers equal each request run alone."""
    dep = deploy({"model": {"random": random_spec, "seed": 4}, "routing": routing,
                  "gateway": {"port": 0}, "deployment": {"name": "iso", "expert_groups": 3, "transport": "object_store", "batch_max_wait_us": 20_000}})
    ref = LocalMoE.from_config(random_spec, seed=4, routing=dep.spec.routing)
    try:
        gen = torch.Generator().manual_seed(3)
        # NOTE: a shared offset skews the gate so that capacity limits actually bite.
        skew = 2.0 * torch.randn(48, generator=gen)
        xs = [torch.randn(3 + (13 * i) % 60, 48, generator=gen) + skew for i in range(40)]
        outs = ray.get([dep.submit(x, 1, return_routing=True) for x in xs])
        assert max(o.batch_requests for o in outs) > 1
        limited = 0
        for x, out in zip(xs, outs):
            want, report = ref.forward(x, 1, return_routing=True)
            assert _rel(torch.from_numpy(np.array(out.hidden_states)), want) < 1e-6
            assert (out.dropped, out.rerouted) == (report.stats.dropped, report.stats.rerouted)
            limited += out.dropped + out.rerouted
        if routing["policy"] != "expert_choice":
            assert limited > 0, "capacity never bit: the test would not notice a per-batch capacity"
    finally:
        dep.shutdown()


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_batches_in_flight_per_layer_stay_within_the_limit(ray_local, random_spec, max_in_flight: int) -> None:
    """Under 48 concurrent requests a layer never has more than `batch_max_in_flight` batches out;
    what queues behind them leaves together (fewer batches than requests), every answer exact."""
    dep = deploy({"model": {"random": random_spec, "seed": 6}, "gateway": {"port": 0},
                  "deployment": {"name": "inflight", "expert_groups": 2, "transport": "object_store",
                                 "batch_max_wait_us": 1_000, "batch_max_in_flight": max_in_flight}})
    ref = LocalMoE.from_config(random_spec, seed=6)
    try:
        gen = torch.Generator().manual_seed(5)
        xs = [torch.randn(1 + i % 17, 48, generator=gen) for i in range(48)]
        outs = ray.get([dep.submit(x, 1) for x in xs])
        for x, out in zip(xs, outs):
            assert _rel(torch.from_numpy(np.array(out.hidden_states)), ref.forward(x, 1)) < 1e-6
        counters = ray.get(dep.routers[0].status.remote())["counters"]
        assert 1 <= counters["peak_in_flight"] <= max_in_flight
        assert counters["batches"] < counters["requests"] == 48
        if max_in_flight == 1:
            assert counters["peak_in_flight"] == 1
    finally:
        dep.shutdown()


def test_an_experts_few_rows_go_to_one_copy_copies_take_turns_and_many_rows_split(ray_local) -> None:
    """Every expert on both groups (replicas 2). A batch with a few rows of an expert sends them all to
    one copy (each copy it used would read all the expert's weights), the copies taking turns batch by
    batch; past 2 x replica_min_rows rows both copies share them. Every answer exact."""
    spec = dict(hidden_size=32, intermediate_size=48, num_experts=4, num_layers=1, moe_layers=[0], routing=dict(policy="hash", top_k=1))
    dep = deploy({"model": {"random": spec, "seed": 3}, "gateway": {"enabled": False},
                  "deployment": {"name": "copies", "expert_groups": 2, "replicas": 2, "replica_min_rows": 8,
                                 "supervisor": False, "transport": "object_store"}})
    ref = LocalMoE.from_config(spec, seed=3)
    gen = torch.Generator().manual_seed(0)

    def rows_per_group() -> list[int]:
        return [sum(n for _, _, n in ray.get(g.stats.remote())["tokens"]) for g in dep.groups]

    def send(n: int) -> list[int]:
        """n tokens of one token id (hash routing: one expert); the rows each group computed for them."""
        x, ids = torch.randn(n, 32, generator=gen), torch.full((n,), 7)
        before = rows_per_group()
        assert _rel(dep.forward(x, 0, token_ids=ids), ref.forward(x, 0, token_ids=ids)) < 1e-6
        return [a - b for a, b in zip(rows_per_group(), before)]

    try:
        turns = [send(6) for _ in range(6)]
        assert all(sorted(t) == [0, 6] for t in turns), turns  # one copy per batch
        assert [t.index(6) for t in turns] in ([0, 1] * 3, [1, 0] * 3), turns  # in turn
        assert send(16) == [8, 8]  # both copies, half each (even shares)
    finally:
        dep.shutdown()


def test_a_router_shutting_down_refuses_new_requests_with_a_reason(ray_local, random_spec) -> None:
    dep = deploy({"model": {"random": random_spec}, "gateway": {"enabled": False},
                  "deployment": {"name": "closing", "expert_groups": 1, "supervisor": False}})
    try:
        x = torch.ones(2, random_spec["hidden_size"])
        assert dep.forward(x, 0).shape == x.shape
        ray.get(dep.routers[0].shutdown.remote())
        with pytest.raises(ray.exceptions.RayTaskError, match="the router is shutting down"):
            ray.get(dep.routers[0].forward.remote(x.numpy(), "float32", 0))
    finally:
        dep.shutdown()
