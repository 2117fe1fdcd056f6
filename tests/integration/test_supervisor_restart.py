"""The supervisor across its own crashes and the deployment's edges: a replacement group a dead
supervisor left behind is adopted, table versions a crash left unsaved or unsent are caught up,
`Deployment.health`/`status` follow replaced groups, a failed deploy leaves nothing behind, and a
stopped supervisor never writes its state back.

Timings are liveness bounds only (a stuck reconciler fails instead of hanging); nothing is
asserted against wall time.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import pytest
import ray
import torch
from ray.experimental import internal_kv

from cluster import deploy
from cluster.config import load_config
from cluster.supervisor import KV_NAMESPACE, Supervisor, state_key
from expert_workers.group import CONCURRENCY_GROUPS, ExpertGroup
from router_svc import LocalMoE
from router_svc.table import RoutingTable
from tests.helpers.waiting import wait_until as _wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NS = "moe-serve"
SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=4, num_layers=1, moe_layers=[0],
            routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))


def _deploy(name: str, **deployment: Any) -> tuple[Any, LocalMoE]:
    # failover "fail": a router left with a dead group fails the request instead of waiting for a fix
    dep = deploy({"model": {"random": SPEC, "seed": 5}, "gateway": {"enabled": False},
                  "deployment": {"name": name, "expert_groups": 2, "transport": "object_store", "failover": "fail",
                                 "supervisor_period_s": 0.2, "group_cpus": 0.5, "router_cpus": 0.5, **deployment}})
    return dep, LocalMoE.from_config(SPEC, seed=5)



def _status(dep: Any) -> dict[str, Any] | None:
    try:
        return ray.get(dep.supervisor.status.remote(), timeout=5)
    except Exception:
        return None


def _exact(dep: Any, ref: LocalMoE) -> None:
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    got, want = dep.forward(x, 0), ref.forward(x, 0)
    assert float((got - want).norm() / want.norm()) < 1e-6


def _named(prefix: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def test_replacement_left_by_a_dead_supervisor_is_adopted(ray_local) -> None:
    """A supervisor that died while its replacement `<group>-r1` started left that actor, unrecorded, under
    the name its successor derives again: the successor adopts it (and loads its slots) instead of failing
    on the taken name every tick."""
    dep, ref = _deploy("adopt")
    try:
        st = ray.get(dep.supervisor.status.remote(), timeout=30)
        victim, slots = st["groups"][1], st["placement"][1]
        # the state the dead supervisor left: the replacement alive, detached, named, hosting nothing yet
        orphan = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertGroup).options(
            name=f"{victim}-r1", namespace=NS, num_cpus=0.5, lifetime="detached").remote(
            f"{victim}-r1", dep.config.model.source(), [])
        assert ray.get(orphan.info.remote(), timeout=60)["slots"] == []
        ray.kill(ray.get_actor(victim, namespace=NS))
        st = _wait("the replacement to be adopted", lambda: (lambda s: s if s and s["groups"][1] == f"{victim}-r1" else None)(_status(dep)))
        assert ray.get_actor(f"{victim}-r1", namespace=NS)._actor_id == orphan._actor_id
        assert sorted(map(tuple, ray.get(orphan.info.remote(), timeout=30)["slots"])) == sorted(map(tuple, slots))
        assert st["placement"][1] == slots
        _exact(dep, ref)
    finally:
        dep.shutdown()


def test_router_ahead_of_the_saved_version_takes_the_next_table(ray_local) -> None:
    """A supervisor that died after a router took version v+1 but before saving it restarts at v: its next
    table must go above v+1, or routers (which drop versions <= theirs) keep a table naming a dead group."""
    dep, ref = _deploy("ahead")
    try:
        v = ray.get(dep.supervisor.status.remote(), timeout=30)["version"]
        router = dep.routers[0]
        unsaved = RoutingTable.build(v + 1, dep.table.num_experts, dep.table.groups, dep.table.placement)
        assert ray.get(router.update_table.remote(unsaved, dep.groups), timeout=30) == v + 1
        ray.kill(dep.supervisor, no_restart=False)
        _wait("the supervisor restart", lambda: (lambda s: s and s["restarts"] == 1)(_status(dep)))
        victim = dep.groups[0]
        ray.kill(victim)
        st = _wait("the failover", lambda: (lambda s: s if s and s["groups"][0] != dep.table.groups[0].name else None)(_status(dep)))
        _wait("the router to take the failover's table",
              lambda: ray.get(router.status.remote(), timeout=30)["routing_table_version"] == st["version"] > v + 1)
        assert any(e["kind"] == "version_resync" for e in ray.get(dep.supervisor.status.remote(), timeout=30)["events"])
        _exact(dep, ref)
    finally:
        dep.shutdown()


def test_router_behind_the_saved_version_is_sent_the_table(ray_local) -> None:
    """A supervisor that died after saving version v+k but before sending it restarts at v+k with nothing to
    change: routers still at v get the table all the same."""
    dep, ref = _deploy("behind")
    try:
        key = state_key(dep.name)
        state = msgpack.unpackb(internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE), raw=False)
        v = state["version"]
        state["version"] = v + 5
        internal_kv._internal_kv_put(key, msgpack.packb(state, use_bin_type=True), overwrite=True, namespace=KV_NAMESPACE)
        ray.kill(dep.supervisor, no_restart=False)
        _wait("the supervisor restart", lambda: (lambda s: s and s["restarts"] == 1)(_status(dep)))
        _wait("the router to take the saved version",
              lambda: ray.get(dep.routers[0].status.remote(), timeout=30)["routing_table_version"] >= v + 5)
        _exact(dep, ref)
    finally:
        dep.shutdown()


def test_health_and_status_follow_a_replaced_group(ray_local) -> None:
    dep, ref = _deploy("health")
    try:
        assert dep.health()
        ray.kill(dep.groups[0])
        st = _wait("the failover", lambda: (lambda s: s if s and s["groups"][0] != dep.table.groups[0].name else None)(_status(dep)))
        assert dep.health()
        status = dep.status()
        assert [g["name"] for g in status["groups"]] == st["groups"]
        assert all(g["alive"] for g in status["groups"]), status["groups"]
        assert [g["slots"] for g in status["groups"]] == st["placement"]
        _exact(dep, ref)
    finally:
        dep.shutdown()


def test_failed_deploy_removes_its_supervisor_and_its_state(ray_local) -> None:
    """A detached deploy (`moe-serve up`) that fails after the supervisor started (here: its progress callback
    raises) leaves no actor and no saved state: the supervisor (detached and restartable, it would re-create
    routers and groups) goes too."""

    def progress(line: str) -> None:
        if line == "supervisor running":
            raise RuntimeError("interrupted")

    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            deploy({"model": {"random": SPEC, "seed": 5}, "gateway": {"enabled": False},
                    "deployment": {"name": "failsup", "expert_groups": 2, "transport": "object_store",
                                   "supervisor_period_s": 0.2, "group_cpus": 0.5, "router_cpus": 0.5}}, detached=True, progress=progress)
        _wait("no actor of the failed deployment", lambda: not _named("failsup-"))
        assert not internal_kv._internal_kv_list("supervisor:failsup-", namespace=KV_NAMESPACE)
    finally:
        for name in _named("failsup-"):
            ray.kill(ray.get_actor(name, namespace=NS), no_restart=True)
        for key in internal_kv._internal_kv_list("supervisor:failsup-", namespace=KV_NAMESPACE):
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


class _HeldTick(Supervisor):
    """A supervisor whose tick waits for `release` (as one waiting on a slow group would), then saves."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        super().__init__(*args, **kwargs)

    def reconcile(self) -> list[int]:
        self.entered.set()
        self.release.wait(timeout=60)
        self._event("tick_done")
        self._save()
        return []


def test_stop_whose_join_times_out_mid_tick_leaves_no_state(ray_local) -> None:
    source = load_config({"model": {"random": SPEC}}).model.source()
    sup = _HeldTick("stopmid-0", NS, source, {}, {}, [[(0, 0)]], SPEC["num_experts"], ["stopmid-0-group-0"], [], 0.05)
    key = state_key("stopmid-0")
    try:
        assert sup.entered.wait(timeout=30)
        assert internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) is not None
        sup.stop(join_timeout_s=0.1)  # the tick is still held
        assert internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) is None
        sup.release.set()
        sup._thread.join(timeout=60)
        assert not sup._thread.is_alive()
        assert internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) is None
    finally:
        sup.release.set()
        sup._stop.set()
        sup._thread.join(timeout=60)
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
