"""`moe-serve up | status | down` against a real two-node Ray cluster started with `ray start`.

Two `ray start --block` processes (a head and a worker) run on this machine, each in its own
session, so the test stops exactly the cluster it started (never a bare `ray stop`, which
would take every Ray instance on the machine with it). The CLI runs as a subprocess, as an
operator would run it; the deployment it leaves behind is called over gRPC with MoEClient
and checked against LocalMoE on the same seeded weights.

Notes on what Ray does here:
- `ray start` would not keep `--node-ip-address=127.0.0.1`: it swaps a loopback address for
  the machine's routable one (`services.resolve_ip_for_localhost`), and every server of the
  node then listens on all interfaces. The nodes start through tests/helpers/ray_start.py,
  `ray start` with that one function keeping the address, so every server of the cluster (and
  of the deployment on it) is on loopback, which the tests check; drivers and the CLI join with
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's one-machine switch, which keeps 127.0.0.1 too).
- Ray's token auth is on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) for the nodes and every driver.
- Every port a node would otherwise take at its fixed default (ray client 10001, the
  dashboard agent 52365, ...) is given a free one, and the nodes write their sessions under
  a private temp dir, so this cluster neither collides with nor is found by (`address=auto`)
  other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from expert_workers.errors import MoEServeError
from router_svc.client import MoEClient
from router_svc.local import LocalMoE
from tests.helpers.sockets import not_on_loopback

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BIN = Path(sys.executable).parent
MOE_SERVE = str(BIN / "moe-serve")
REPO = Path(__file__).resolve().parents[2]
RAY_START = [sys.executable, str(REPO / "tests" / "helpers" / "ray_start.py"), "start"]

SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=2, moe_layers=[0, 1])
SEED = 3
TOKEN = "real-cluster-test-token-0123456789"
NAME = "realtest"

# Liveness limits only (a hung step fails instead of hanging the suite); nothing is timed against them.
NODE_START_S = 420.0
CLI_UP_S = 600.0
CLI_S = 300.0
STOP_GRACE_S = 90.0

_NODES = r"""
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(1.0)
print("NODES " + json.dumps([{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"],
                              "cpus": n["Resources"].get("CPU", 0)} for n in alive]))
"""

_ACTORS = r"""
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
prefix, deadline = sys.argv[2], time.monotonic() + float(sys.argv[3])
while True:
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "moe-serve" and a["name"].startswith(prefix))
    if not names or time.monotonic() > deadline:
        break
    time.sleep(1.0)
print("ACTORS " + json.dumps(names))
from ray.experimental import internal_kv
keys = [k.decode() if isinstance(k, bytes) else k for k in internal_kv._internal_kv_list("", namespace="moe-serve")]
print("KV " + json.dumps(sorted(k for k in keys if prefix.rstrip("-") in k)))
"""


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (all held open together so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in session `sid` (zombies excluded)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            # fields after the ")" that closes the command name: state ppid pgrp session ...
            rest = stat[stat.rindex(")") + 2:].split()
            if int(rest[3]) != sid or rest[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(entry), cmd[:160]))
    return out


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains `text` (our private temp dir: anything of ours that left the session)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            if stat[stat.rindex(")") + 2:].split()[0] == "Z":
                continue
        except (OSError, ValueError, IndexError):
            continue
        if text in cmd:
            out.append((int(entry), cmd[:160]))
    return out


@dataclass
class RayNode:
    role: str
    proc: subprocess.Popen
    log: Path

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


@dataclass
class RealCluster:
    address: str
    temp_dir: str
    env: dict[str, str]
    nodes: list[RayNode] = field(default_factory=list)
    node_info: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def check_nodes_running(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is not None:
                pytest.fail(f"`ray start --block` ({node.role}) exited with {node.proc.returncode}:\n{node.tail()}")


def _start_node(role: str, args: list[str], log: Path, env: dict[str, str]) -> RayNode:
    f = open(log, "wb")
    try:
        proc = subprocess.Popen([*RAY_START, "--block", *args], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
    finally:
        f.close()
    print(f"[real-cluster] started {role}: pid {proc.pid}")
    return RayNode(role, proc, log)


def _stop_node(node: RayNode) -> None:
    """SIGTERM the node's own process group (its session), wait, then SIGKILL the group."""
    pgid = node.proc.pid  # start_new_session=True: the `ray start` process leads its own session and group
    if node.proc.poll() is None or _session_members(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and (node.proc.poll() is None or _session_members(pgid)):
            time.sleep(0.5)
    if node.proc.poll() is None or _session_members(pgid):
        print(f"[real-cluster] {node.role} did not stop on SIGTERM; SIGKILL to group {pgid}: {_session_members(pgid)}")
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _session_members(pgid):
            time.sleep(0.5)


def _python(cluster: RealCluster, script: str, *args: str, timeout: float = CLI_S) -> str:
    r = subprocess.run([sys.executable, "-c", script, cluster.address, *args], capture_output=True, text=True,
                       env=cluster.env, cwd=REPO, timeout=timeout)
    assert r.returncode == 0, f"helper driver failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def real_cluster():
    """A head and a worker node, 4 CPUs each, started with `ray start --block` in their own sessions."""
    temp_dir = tempfile.mkdtemp(prefix="mrc", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    drop = ("RAY_ADDRESS", "MOE_SERVE_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    base_env = {k: v for k, v in os.environ.items() if k not in drop}
    # Ray's own token auth, on for every node and every driver, with a token of this cluster's own: an explicit
    # address never turns it on in a driver by itself (Ray 2.60: only address=auto reads ~/.ray/auth_token for that).
    base_env.update(PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    (gcs, client, dash, h_agent_http, h_agent_grpc, h_metrics, h_rtenv,
     w_agent_http, w_agent_grpc, w_metrics, w_rtenv) = _free_ports(11)
    address = f"127.0.0.1:{gcs}"
    # NOTE: the nodes get base_env: a worker node refuses to join with the one-machine switch on.
    cluster = RealCluster(address=address, temp_dir=temp_dir, env={**base_env, "RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    t0 = time.monotonic()
    try:
        cluster.nodes.append(_start_node("head", [
            "--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={client}",
            f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={h_agent_http}",
            f"--dashboard-agent-grpc-port={h_agent_grpc}", f"--metrics-export-port={h_metrics}",
            f"--runtime-env-agent-port={h_rtenv}", *common,
        ], Path(temp_dir) / "head.out", base_env))
        _wait_for_nodes(cluster, 1)
        cluster.nodes.append(_start_node("worker", [
            f"--address={address}", f"--dashboard-agent-listen-port={w_agent_http}",
            f"--dashboard-agent-grpc-port={w_agent_grpc}", f"--metrics-export-port={w_metrics}",
            f"--runtime-env-agent-port={w_rtenv}", *common,
        ], Path(temp_dir) / "worker.out", base_env))
        cluster.node_info = _wait_for_nodes(cluster, 2)
        assert [n["ip"] for n in cluster.node_info] == ["127.0.0.1", "127.0.0.1"], cluster.node_info
        _assert_on_loopback(cluster)
        cluster.timings["cluster_start_s"] = time.monotonic() - t0
        print(f"[real-cluster] 2 nodes alive after {cluster.timings['cluster_start_s']:.1f} s: {cluster.node_info}")
        yield cluster
    finally:
        t1 = time.monotonic()
        for node in reversed(cluster.nodes):
            _stop_node(node)
        print(f"[real-cluster] nodes stopped in {time.monotonic() - t1:.1f} s")
        left = {node.role: _session_members(node.proc.pid) for node in cluster.nodes}
        escaped = _processes_mentioning(temp_dir)
        logs = {node.role: node.tail(15) for node in cluster.nodes}
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert all(node.proc.poll() is not None for node in cluster.nodes), "a `ray start --block` process is still running"
        assert not any(left.values()), f"processes left in the nodes' sessions: {left}"
        assert not escaped, f"processes of this cluster outside its sessions: {escaped}\n{logs}"


def _assert_on_loopback(cluster: RealCluster) -> None:
    """Every process of the nodes' sessions (GCS, raylets, agents, workers and the actors in them)
    listens on loopback only."""
    members = {pid: cmd for node in cluster.nodes for pid, cmd in _session_members(node.proc.pid)}
    elsewhere = [(address, port, members.get(pid, pid)) for address, port, pid in not_on_loopback(members)]
    assert members and not elsewhere, f"servers of the cluster listening beyond loopback (address, port, process): {elsewhere}"


def _wait_for_nodes(cluster: RealCluster, want: int) -> list[dict]:
    deadline = time.monotonic() + NODE_START_S
    last = ""
    while time.monotonic() < deadline:
        cluster.check_nodes_running()
        r = subprocess.run([sys.executable, "-c", _NODES, cluster.address, str(want), "120"], capture_output=True,
                           text=True, env=cluster.env, cwd=REPO, timeout=NODE_START_S)
        m = re.search(r"^NODES (.*)$", r.stdout, re.M)
        if r.returncode == 0 and m:
            nodes = json.loads(m.group(1))
            if len(nodes) >= want:
                return nodes
            last = f"only {len(nodes)} alive: {nodes}"
        else:
            last = f"rc {r.returncode}: {r.stderr[-2000:]}"
            if "AuthenticationError" in r.stderr:
                break  # a misconfiguration, not a slow start
        time.sleep(2.0)
    pytest.fail(f"cluster did not reach {want} alive nodes: {last}\n" + "\n".join(n.tail() for n in cluster.nodes))


def _cli(cluster: RealCluster, *args: str, timeout: float = CLI_S) -> subprocess.CompletedProcess:
    cluster.check_nodes_running()
    t0 = time.monotonic()
    r = subprocess.run([MOE_SERVE, *args], capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=timeout)
    print(f"[real-cluster] moe-serve {' '.join(args)} -> rc {r.returncode} in {time.monotonic() - t0:.1f} s")
    return r


def _show(r: subprocess.CompletedProcess) -> str:
    return f"rc {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr[-6000:]}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_up_status_down_on_a_real_two_node_cluster(real_cluster: RealCluster, tmp_path: Path) -> None:
    cluster = real_cluster
    (gateway_port,) = _free_ports(1)
    config = {
        "model": {"random": SPEC, "seed": SEED},
        "deployment": {"name": NAME, "expert_groups": 2, "routers": 1, "transport": "auto"},
        "gateway": {"port": gateway_port},
        "auth": {"token": TOKEN},
    }
    cfg_path = tmp_path / "deploy.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))

    # -- up ------------------------------------------------------------------------------------
    t0 = time.monotonic()
    r = _cli(cluster, "up", "--config", str(cfg_path), "--address", cluster.address, timeout=CLI_UP_S)
    cluster.timings["up_s"] = time.monotonic() - t0
    assert r.returncode == 0, _show(r)
    print(r.stdout)
    gateways = re.findall(r"^gateway (\S+)$", r.stdout, re.M)
    assert gateways == [f"127.0.0.1:{gateway_port}"], _show(r)
    m = re.search(r"^deployment (\S+) is SERVING$", r.stdout, re.M)
    assert m and m.group(1).startswith(f"{NAME}-"), _show(r)
    dep_name = m.group(1)
    _assert_on_loopback(cluster)  # the deployment's too: gateway, data-plane servers, metrics

    # -- the gateway, against LocalMoE ---------------------------------------------------------
    ref = LocalMoE.from_config(SPEC, seed=SEED)
    client = MoEClient(gateways, token=TOKEN, timeout=120.0)
    try:
        assert client.health()
        gen = torch.Generator().manual_seed(11)
        for layer in SPEC["moe_layers"]:
            for shape in ((1, 32), (7, 32), (300, 32), (2, 5, 32)):
                x = torch.randn(*shape, generator=gen)
                y = client.forward(x, layer)
                assert y.shape == x.shape and y.dtype == x.dtype
                err = _rel(y, ref.forward(x, layer))
                assert err < 1e-6, (layer, shape, err)
        xn = np.random.default_rng(5).standard_normal((9, 32)).astype(np.float32)
        yn = client.forward(xn, 1)
        assert isinstance(yn, np.ndarray)
        assert _rel(torch.from_numpy(yn), ref.forward(torch.from_numpy(xn), 1)) < 1e-6

        st = client.status()
        groups = [(g.name, g.node_id, g.alive, g.slots) for g in st.groups]
        print(f"[real-cluster] gateway status: groups {groups}; routers "
              f"{[(rr.name, rr.address, list(rr.transports), rr.requests) for rr in st.routers]}")
        assert [g.name for g in st.groups] == [f"{dep_name}-group-0", f"{dep_name}-group-1"]
        assert all(g.alive for g in st.groups), groups
        assert sum(g.slots for g in st.groups) == SPEC["num_experts"] * len(SPEC["moe_layers"])
        assert len(st.experts) == SPEC["num_experts"] * len(SPEC["moe_layers"])
        assert st.routers[0].requests >= 9
        cluster_nodes = {n["node_id"] for n in cluster.node_info}
        group_nodes = [g.node_id for g in st.groups]
        assert set(group_nodes) <= cluster_nodes, (group_nodes, cluster_nodes)
        spread = len(set(group_nodes))
        print(f"[real-cluster] placement: the 2 expert groups are on {spread} distinct node(s): {group_nodes}")
        cluster.timings["groups_on_distinct_nodes"] = spread
    finally:
        client.close()

    # -- status ---------------------------------------------------------------------------------
    r = _cli(cluster, "status", "--address", cluster.address)
    assert r.returncode == 0, _show(r)
    print(r.stdout)
    assert NAME in r.stdout and dep_name in r.stdout and f"127.0.0.1:{gateway_port}" in r.stdout, _show(r)
    assert "DOWN" not in r.stdout, _show(r)

    r = _cli(cluster, "status", "--address", cluster.address, "--json")
    assert r.returncode == 0, _show(r)
    deps = json.loads(r.stdout)
    mine = [d for d in deps if d["name"] == dep_name]
    assert len(mine) == 1, deps
    d = mine[0]
    assert d["groups"] == [f"{dep_name}-group-0", f"{dep_name}-group-1"]
    assert d["routers"] == [f"{dep_name}-router-0"]
    assert d["gateways"] == [f"127.0.0.1:{gateway_port}"]
    (router_status,) = d["status"]
    assert "groups" in router_status, router_status
    assert [g["alive"] for g in router_status["groups"]] == [True, True], router_status["groups"]

    r = _cli(cluster, "status", "--address", cluster.address, "--name", dep_name, "--json")
    assert r.returncode == 0, _show(r)
    assert [x["name"] for x in json.loads(r.stdout)] == [dep_name]

    r = _cli(cluster, "status", "--json")  # no --address: 'auto', which RAY_ADDRESS overrides (how a job's driver runs it)
    assert r.returncode == 0, _show(r)
    assert dep_name in [x["name"] for x in json.loads(r.stdout)], r.stdout

    # -- down -----------------------------------------------------------------------------------
    t0 = time.monotonic()
    r = _cli(cluster, "down", "--address", cluster.address, "--name", dep_name)
    cluster.timings["down_s"] = time.monotonic() - t0
    assert r.returncode == 0, _show(r)
    print(r.stdout)
    for actor in (f"{dep_name}-group-0", f"{dep_name}-group-1", f"{dep_name}-router-0"):
        assert actor in r.stdout, _show(r)

    out = _python(cluster, _ACTORS, f"{dep_name}-", "120")
    left = json.loads(re.search(r"^ACTORS (.*)$", out, re.M).group(1))
    kv_left = json.loads(re.search(r"^KV (.*)$", out, re.M).group(1))
    print(f"[real-cluster] after down: named actors {left}, GCS KV keys (namespace moe-serve) {kv_left}")
    assert left == [], f"actors left after down: {left}"
    assert kv_left == [], f"GCS KV keys of {dep_name} left after down: {kv_left}"

    with MoEClient(gateways, token=TOKEN, timeout=10.0, max_attempts=3) as gone:
        assert not gone.health(timeout=5.0)
        with pytest.raises(MoEServeError):
            gone.forward(torch.randn(3, 32), 0)

    r = _cli(cluster, "status", "--address", cluster.address, "--json")
    assert r.returncode == 0, _show(r)
    assert dep_name not in [x["name"] for x in json.loads(r.stdout)], r.stdout
    r = _cli(cluster, "status", "--address", cluster.address)
    assert r.returncode == 0, _show(r)
    assert dep_name not in r.stdout, _show(r)
    print(r.stdout)
    r = _cli(cluster, "status", "--address", cluster.address, "--name", dep_name)
    assert r.returncode == 2 and "no deployment named" in r.stderr, _show(r)

    print(f"[real-cluster] timings: {cluster.timings}")


_DRIVER = r"""
import json, sys
import torch
from cluster import deploy
from router_svc.local import LocalMoE
config, kwargs = json.loads(sys.argv[2]), json.loads(sys.argv[3])
dep = deploy(config, detached=True, **kwargs)
try:
    assert dep.health(timeout=60), dep.status()
    ref = LocalMoE.from_config(config["model"]["random"], seed=config["model"]["seed"])
    x = torch.randn(13, config["model"]["random"]["hidden_size"], generator=torch.Generator().manual_seed(2))
    err = float((dep.forward(x, 1) - ref.forward(x, 1)).norm() / ref.forward(x, 1).norm())
    assert err < 1e-6, err
    print("DEPLOYED " + json.dumps({"name": dep.name, "gateways": dep.gateway_addresses, "rel_err": err}))
finally:
    dep.shutdown()
"""


def _driver(cluster: RealCluster, name: str, **kwargs: object) -> subprocess.CompletedProcess:
    """A driver as `ray job submit` runs one: RAY_ADDRESS set, no ray.init of its own, cluster.deploy(..., detached=True)."""
    config = {"model": {"random": SPEC, "seed": SEED}, "gateway": {"port": 0}, "auth": {"token": TOKEN},
              "deployment": {"name": name, "expert_groups": 2, "transport": "object_store"}}
    cluster.check_nodes_running()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _DRIVER, cluster.address, json.dumps(config), json.dumps(kwargs)],
                       capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=CLI_UP_S)
    print(f"[real-cluster] driver deploy({name!r}, detached=True, **{kwargs}) -> rc {r.returncode} in {time.monotonic() - t0:.1f} s")
    return r


def test_driver_deploy_with_address_auto(real_cluster: RealCluster) -> None:
    """What docs/deploy.md tells a `ray job submit` driver to do: deploy(config, address="auto", detached=True)."""
    r = _driver(real_cluster, "realdrv", address="auto")
    assert r.returncode == 0 and "DEPLOYED " in r.stdout, _show(r)
    print(r.stdout.strip())
    name = json.loads(re.search(r"^DEPLOYED (.*)$", r.stdout, re.M).group(1))["name"]
    out = _python(real_cluster, _ACTORS, f"{name}-", "120")
    assert json.loads(re.search(r"^ACTORS (.*)$", out, re.M).group(1)) == [], out


def test_down_leaves_no_state_in_gcs_kv(real_cluster: RealCluster, tmp_path: Path) -> None:
    """`moe-serve down` leaves neither actors nor GCS KV state (`deployment:<name>`, `supervisor:<name>`) behind.

    Regression: `down` once ray.kill()ed the supervisor without its `stop()`, leaving `supervisor:<name>` in GCS KV."""
    cluster = real_cluster
    cfg_path = tmp_path / "kv.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"random": SPEC, "seed": SEED}, "gateway": {"port": 0},
                                        "deployment": {"name": "realkv", "expert_groups": 2, "transport": "object_store"}}))
    r = _cli(cluster, "up", "--config", str(cfg_path), "--address", cluster.address, timeout=CLI_UP_S)
    assert r.returncode == 0, _show(r)
    dep_name = re.search(r"^deployment (\S+) is SERVING$", r.stdout, re.M).group(1)
    r = _cli(cluster, "down", "--address", cluster.address, "--name", dep_name)
    assert r.returncode == 0, _show(r)
    out = _python(cluster, _ACTORS, f"{dep_name}-", "120")
    assert json.loads(re.search(r"^ACTORS (.*)$", out, re.M).group(1)) == []
    kv_left = json.loads(re.search(r"^KV (.*)$", out, re.M).group(1))
    assert kv_left == [], f"GCS KV keys of {dep_name} left after `moe-serve down`: {kv_left}"


def test_driver_deploy_without_address_under_ray_address(real_cluster: RealCluster) -> None:
    """LIBRARY BUG (pinned): deploy(config) with no address, in a process where RAY_ADDRESS names a running cluster
    (every `ray job submit` driver), fails. cluster/deploy.py `_ensure_ray(None, ...)` calls
    `ray.init(namespace=..., num_cpus=..., include_dashboard=False)`; ray.init then takes RAY_ADDRESS, connects to the
    existing cluster and refuses `num_cpus` ("When connecting to an existing cluster, num_cpus and num_gpus must not be
    provided"). Expected: connect to the cluster RAY_ADDRESS names (as address="auto" does)."""
    r = _driver(real_cluster, "realenv")
    assert r.returncode == 0 and "DEPLOYED " in r.stdout, _show(r)
