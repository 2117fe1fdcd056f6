"""The faults `moe-serve chaos` injects into a deployment, each a function (target, rng, timeout) -> Fault
that acts on a random live victim and waits for the supervisor's matching recovery event:
kill an expert group, a router, the supervisor or a node (its raylet); stop a group's process
(SIGSTOP: it neither answers nor fails); hang a group's compute (its batches never return while
its pings answer, until its compute_timeout_s makes it report unhealthy).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray

from router_svc import names
from router_svc.client import TLSOptions
from router_svc.local import LocalMoE

NAMESPACE = names.NAMESPACE


@dataclass
class Target:
    """The deployment under test: its name on the cluster, gateways, and the reference engine."""

    name: str
    gateways: list[str]
    reference: LocalMoE
    token: str | None = None
    tls: TLSOptions | None = None
    # removes a node (a `ray.cluster_utils.Cluster` in tests); default: kill the node's raylet
    node_killer: Callable[[str], None] | None = None


@dataclass
class Fault:
    kind: str
    at_s: float
    victim: str = ""
    recovered_s: float | None = None
    error: str = ""


def _status(name: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The supervisor's status, retried until `timeout` (it may be restarting); None if it never answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(ray.get_actor(names.supervisor(name), namespace=NAMESPACE).status.remote(),
                           timeout=max(deadline - time.monotonic(), 0.5))
        except Exception:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


def _wait_event(name: str, match: Callable[[dict[str, Any]], bool], since: float, timeout: float) -> float | None:
    """Seconds from `since` (unix time) to the first supervisor event matching, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _status(name)
        if st is not None:
            hits = [e for e in st["events"] if e["at"] >= since and match(e)]
            if hits:
                return max(hits[0]["at"] - since, 0.0)
        time.sleep(0.2)
    return None


def _live_actor(candidates: Sequence[str], rng: random.Random, answering: bool = False) -> tuple[str, Any]:
    """A random one of `candidates` that still exists (one just lost, e.g. with its node, is skipped);
    with `answering`, one that also answers a ping (not one stopped already)."""
    for name in rng.sample(list(candidates), len(candidates)):
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            if answering and ray.get(actor.ping.remote(), timeout=2.0) is not True:
                continue
            return name, actor
        except (ValueError, ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            continue
    return "", None


def _group_fault(kind: str, act: Callable[[Any], None], target: Target, rng: random.Random, timeout: float) -> Fault:
    """`act` on a random live expert group; recovered when the supervisor reports its failover."""
    st = _status(target.name, timeout=30)
    if st is None:
        return Fault(kind, 0.0, error="supervisor unavailable: no group list")
    victim, actor = _live_actor(st["groups"], rng, answering=kind in ("group_stop", "group_hang"))
    if actor is None:
        return Fault(kind, 0.0, error="no live expert group")
    since = time.time()
    act(actor)
    rec = _wait_event(target.name, lambda e: e["kind"] == "failover" and victim in e.get("groups", []), since, timeout)
    return Fault(kind, 0.0, victim=victim, recovered_s=rec)


def _kill_group(target: Target, rng: random.Random, timeout: float) -> Fault:
    return _group_fault("group", ray.kill, target, rng, timeout)


def _stop_self(_actor: Any) -> None:
    """Runs in the victim's process (any node): it stops itself, mid-call, as a hung host would."""
    os.kill(os.getpid(), signal.SIGSTOP)


def _stop_group(target: Target, rng: random.Random, timeout: float) -> Fault:
    # NOTE: the call is never answered; the supervisor's kill of the stopped process ends it.
    return _group_fault("group_stop", lambda actor: actor.__ray_call__.remote(_stop_self), target, rng, timeout)


# a hung compute ends by itself after this long, if nothing (the supervisor's kill) ended it before
HANG_BOUND_S = 300.0


def _ffns(group: Any) -> list[Any]:
    """The grouped FFNs (routed and shared) of every layer an ExpertGroup hosts."""
    return [ffn for ls in group.core.layers.values() for ffn in (ls.grouped, ls.shared) if ffn is not None]


def hang_compute(group: Any, bound_s: float = HANG_BOUND_S) -> bool:
    """Runs in an ExpertGroup (`__ray_call__`): from now on every batch blocks inside its expert FFN, as
    on a hung kernel or device, until `release_compute` or `bound_s`; the process still answers pings.
    Layers the group loads afterwards (set_slots) compute normally."""
    release = getattr(group, "_chaos_release", None)
    if release is None or release.is_set():
        release = group._chaos_release = threading.Event()
    for ffn in _ffns(group):
        if "forward" in ffn.__dict__:  # held already
            continue
        real = ffn.forward

        def held(x: Any, counts: Any, real: Callable[..., Any] = real) -> Any:
            release.wait(bound_s)
            return real(x, counts)

        ffn.forward = held
    return True


def release_compute(group: Any) -> bool:
    """Runs in an ExpertGroup: undoes `hang_compute` (held batches go on, new ones compute at once).
    Call it on the `control` concurrency group: on the object-store path the default one is the held batch's."""
    for ffn in _ffns(group):
        ffn.__dict__.pop("forward", None)
    release = getattr(group, "_chaos_release", None)
    if release is not None:
        release.set()
    return True


def _hang_group(target: Target, rng: random.Random, timeout: float) -> Fault:
    return _group_fault("group_hang", lambda actor: ray.get(actor.__ray_call__.remote(hang_compute), timeout=30), target, rng, timeout)


def _kill_router(target: Target, rng: random.Random, timeout: float) -> Fault:
    st = _status(target.name, timeout=30)
    routers = st["routers"] if st is not None else []
    if not routers:
        return Fault("router", 0.0, error="no router list")
    victim, actor = _live_actor(routers, rng)
    if actor is None:
        return Fault("router", 0.0, error="no live router to kill")
    since = time.time()
    ray.kill(actor)
    rec = _wait_event(target.name, lambda e: e["kind"] == "router_restart" and e.get("router") == victim, since, timeout)
    return Fault("router", 0.0, victim=victim, recovered_s=rec)


def _kill_supervisor(target: Target, rng: random.Random, timeout: float) -> Fault:
    victim = names.supervisor(target.name)
    before = _status(target.name, timeout=30)
    restarts = before["restarts"] if before is not None else 0
    t0 = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace=NAMESPACE), no_restart=False)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        st = _status(target.name, timeout=2)
        if st is not None and st["restarts"] > restarts:
            return Fault("supervisor", 0.0, victim=victim, recovered_s=time.monotonic() - t0)
        time.sleep(0.1)
    return Fault("supervisor", 0.0, victim=victim, error="not back within the timeout")


def _kill_raylet() -> None:
    """Runs on the node to remove: its worker's parent process is the node's raylet."""
    os.kill(os.getppid(), signal.SIGKILL)


def _kill_node(target: Target, rng: random.Random, timeout: float) -> Fault:
    st = _status(target.name, timeout=30)
    if st is None:
        return Fault("node", 0.0, error="supervisor unavailable")
    head = ray.get_runtime_context().get_node_id()
    nodes = {g["node_id"] for g in st["group_info"] if g["node_id"] and g["node_id"] != head}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    options = sorted(nodes & alive)
    if len(alive) < 2 or not options:
        return Fault("node", 0.0, error="needs a multi-node cluster with groups off the driver's node")
    victim = rng.choice(options)
    lost = {g["name"] for g in st["group_info"] if g["node_id"] == victim}
    since = time.time()
    if target.node_killer is not None:
        target.node_killer(victim)
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray.remote(_kill_raylet).options(num_cpus=0, max_retries=0,
                                         scheduling_strategy=NodeAffinitySchedulingStrategy(victim, soft=False)).remote()
    rec = _wait_event(target.name, lambda e: e["kind"] == "failover" and bool(lost & set(e.get("groups", []))), since, timeout)
    return Fault("node", 0.0, victim=victim, recovered_s=rec)


ACTIONS = {"group_stop": "stop group", "group_hang": "hang group"}
FAULTS = {"group": _kill_group, "router": _kill_router, "supervisor": _kill_supervisor, "node": _kill_node,
          "group_stop": _stop_group, "group_hang": _hang_group}
