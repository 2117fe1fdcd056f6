"""Supervisor: the control plane's reconciler. Desired state: every placed group alive; observed: pings.

Each tick pings every expert group; a group that does not answer is replaced by a new
actor hosting the same slots (weights reloaded from the source), the routing table's
version is bumped and the new table pushed to every router, which adopts it atomically.
State (placement, actor names, table version, events) is kept in Ray's GCS KV with
msgpack, so a restarted supervisor resumes from it; routers keep serving while it is down.
The loop catches, logs and continues on every tick.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Sequence

import msgpack
import ray
from ray.experimental import internal_kv

from expert_workers.group import CONCURRENCY_GROUPS, ExpertGroup
from expert_workers.source import SourceSpec
from router_svc.table import GroupRef, RoutingTable

log = logging.getLogger(__name__)
KV_NAMESPACE = "moe-serve"


class Supervisor:
    """Created by `cluster.deploy` as a named actor with unlimited restarts."""

    def __init__(self, name: str, namespace: str, source: SourceSpec, group_options: dict[str, Any],
                 group_kwargs: dict[str, Any], placement: Sequence[Sequence[tuple[int, int]]], num_experts: int,
                 group_names: Sequence[str], router_names: Sequence[str], period_s: float = 0.5) -> None:
        self.name = name
        self.namespace = namespace
        self.source = source
        self.group_options = group_options
        self.group_kwargs = group_kwargs
        self.num_experts = num_experts
        self.period_s = period_s
        self.state: dict[str, Any] = self._load() or {
            "placement": [[list(s) for s in slots] for slots in placement],
            "groups": list(group_names),
            "routers": list(router_names),
            "version": 1,
            "events": [],
        }
        self._save()
        # handles of the groups this process made or found; names in `state` survive restarts.
        self._handles: dict[int, Any] = {}
        # NOTE: the loop runs on its own thread, started here, so a supervisor that Ray
        # restarts (max_restarts=-1) resumes reconciling without anyone calling it.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()

    # -- persistence --------------------------------------------------------
    def _key(self) -> str:
        return f"supervisor:{self.name}"

    def _load(self) -> dict[str, Any] | None:
        raw = internal_kv._internal_kv_get(self._key(), namespace=KV_NAMESPACE)
        return None if raw is None else msgpack.unpackb(raw, raw=False)

    def _save(self) -> None:
        internal_kv._internal_kv_put(self._key(), msgpack.packb(self.state, use_bin_type=True), overwrite=True, namespace=KV_NAMESPACE)

    # -- loop ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # one bad observation never stops the loop
                log.exception("supervisor tick failed")
            self._stop.wait(self.period_s)

    def _actor(self, name: str) -> Any:
        try:
            return ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            return None

    def reconcile(self) -> list[int]:
        """One tick: find dead groups, replace them, publish a new table. Returns the replaced indices."""
        dead = []
        for i, gname in enumerate(self.state["groups"]):
            actor = self._handles.get(i) or self._actor(gname)
            if actor is not None:
                self._handles[i] = actor
            try:
                ok = actor is not None and ray.get(actor.ping.remote(), timeout=max(2.0, 4 * self.period_s))
            except Exception:
                ok = False
            if not ok:
                dead.append(i)
        if not dead:
            return []
        t0 = time.monotonic()
        for i in dead:
            self._replace(i)
        self._publish()
        self.state["events"] = (self.state["events"] + [
            {"kind": "failover", "groups": dead, "recovery_s": time.monotonic() - t0, "at": time.time(),
             "version": self.state["version"]}])[-50:]
        self._save()
        return dead

    def _replace(self, index: int) -> None:
        old = self.state["groups"][index]
        stale = self._handles.pop(index, None) or self._actor(old)
        if stale is not None:
            ray.kill(stale)
        m = re.match(r"^(.*)-r(\d+)$", old)
        base, gen = (m.group(1), int(m.group(2)) + 1) if m else (old, 1)
        new_name = f"{base}-r{gen}"
        slots = [tuple(s) for s in self.state["placement"][index]]
        cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertGroup)
        actor = cls.options(name=new_name, namespace=self.namespace, **self.group_options).remote(
            new_name, self.source, slots, **self.group_kwargs)
        ray.get(actor.info.remote(), timeout=300)
        self.state["groups"][index] = new_name
        self._handles[index] = actor
        log.warning("expert group %s replaced by %s", old, new_name)

    def _publish(self) -> None:
        handles = [self._handles.get(i) or self._actor(n) for i, n in enumerate(self.state["groups"])]
        infos = ray.get([h.info.remote() for h in handles], timeout=60)
        self.state["version"] += 1
        table = RoutingTable.build(self.state["version"], self.num_experts,
                                   [GroupRef(i["name"], i["grpc_address"], i["node_id"]) for i in infos],
                                   [[tuple(s) for s in slots] for slots in self.state["placement"]])
        for rname in self.state["routers"]:
            router = self._actor(rname)
            if router is None:
                continue
            try:
                ray.get(router.update_table.remote(table, handles), timeout=60)
            except Exception as e:
                log.warning("router %s did not take table v%d: %s", rname, table.version, e)

    # -- admin -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"groups": list(self.state["groups"]), "version": self.state["version"],
                "events": list(self.state["events"])}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        internal_kv._internal_kv_del(self._key(), namespace=KV_NAMESPACE)
