"""Supervisor: the control plane's reconciler.

Desired state: every placed group alive and hosting its slots; every router alive; hot
experts with more copies (EPLB packing), cooled ones back to their starting copies; the
group count between min and max for the observed load. Observed: pings, router load
reports (tokens per expert), Ray's placement of new groups. Each tick closes the gap:

  heal     a dead group is replaced by a new actor hosting the same slots (Ray places it on
           a live node); a dead router is re-created with the current table.
  scale    hot experts' copies, the group count, the shares and drains: cluster.scaling.

Every change publishes a new routing-table version to every router (adopted atomically).
State (placement, names, version, events, drains) is msgpack in Ray's GCS KV: a restarted
supervisor resumes from it; routers keep serving while it is down. Rates live in memory
(a restarted supervisor observes afresh). The loop catches, logs and continues on every tick.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import threading
import time
from typing import Any, Sequence

import msgpack
import ray
from ray.experimental import internal_kv

from cluster.config import ElasticPolicy
from cluster.eplb import group_loads, replica_shares
from cluster.placement import Slot, as_slots
from cluster.scaling import Scaling
from expert_workers.group import CONCURRENCY_GROUPS, ExpertGroup
from expert_workers.source import SourceSpec
from router_svc.table import GroupRef, RoutingTable

log = logging.getLogger(__name__)
KV_NAMESPACE = "moe-serve"


def state_key(name: str) -> str:
    """The GCS KV key (namespace KV_NAMESPACE) of deployment `name`'s supervisor state."""
    return f"supervisor:{name}"


class Supervisor(Scaling):
    """Created by `cluster.deploy` as a named actor with unlimited restarts."""

    def __init__(self, name: str, namespace: str, source: SourceSpec, group_options: dict[str, Any],
                 group_kwargs: dict[str, Any], placement: Sequence[Sequence[Slot]], num_experts: int,
                 group_names: Sequence[str], router_names: Sequence[str], period_s: float = 0.5, *,
                 policy: ElasticPolicy | None = None, router_specs: Sequence[dict[str, Any]] = (),
                 detached: bool = True) -> None:
        self.name = name
        # NOTE: the actors made here are detached (they outlive a supervisor restart); for a deployment
        # that ends with its driver they are tied to this supervisor's name and end when it is gone.
        self._tie = None if detached else (ray.get_runtime_context().get_actor_name(), namespace)
        self.namespace = namespace
        self.source = source
        self.group_options = group_options
        self.group_kwargs = group_kwargs
        self.num_experts = num_experts
        self.period_s = period_s
        self.policy = policy or ElasticPolicy(min_groups=len(group_names), max_groups=len(group_names))
        # how to re-create router i (Ray options and constructor arguments, table and groups aside)
        self.router_specs = list(router_specs)
        self._lock = threading.RLock()
        self._kv_lock = threading.Lock()  # orders `_save` against `stop`'s delete
        self._stop = threading.Event()
        loaded = self._load()
        self.state: dict[str, Any] = loaded or {
            "placement": [[list(s) for s in slots] for slots in placement],
            "base": [[list(s) for s in slots] for slots in placement],
            "groups": list(group_names),
            "scaled": [False] * len(group_names),
            "routers": list(router_names),
            "version": 1,
            "events": [],
            "draining": [],   # {"group": name, "slot": [l, e], "version": v, "since": t}
            "retiring": [],   # {"group": name, "version": v, "since": t}
            "pending": [],    # {"group": name, "since": t, "requested": bool}
            "next_group": len(group_names),
            "restarts": 0,
        }
        if loaded is not None:  # Ray restarted this actor: carry on from the saved state
            self.state["restarts"] += 1
            self._event("supervisor_restart", restarts=self.state["restarts"])
        self._save()
        # handles of actors this process made or found; names in `state` survive restarts.
        self._handles: dict[str, Any] = {}
        self._table: RoutingTable | None = None
        # sliding window of (time, tokens per (layer, expert) summed over routers) deltas
        self._window: collections.deque[tuple[float, dict[Slot, float]]] = collections.deque()
        self._last_counts: dict[str, dict[Slot, int]] = {}
        self.rates: dict[Slot, float] = {}
        self._cool_since: dict[Slot, float] = {}
        self._want_groups_since: tuple[int, float] | None = None
        self._last_rebalance = 0.0
        self._shares: list[list[float]] | None = self.state.get("shares")
        # NOTE: the loop runs on its own thread, started here, so a supervisor that Ray
        # restarts (max_restarts=-1) resumes reconciling without anyone calling it.
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()

    # -- persistence --------------------------------------------------------
    def _key(self) -> str:
        return state_key(self.name)

    def _load(self) -> dict[str, Any] | None:
        raw = internal_kv._internal_kv_get(self._key(), namespace=KV_NAMESPACE)
        return None if raw is None else msgpack.unpackb(raw, raw=False)

    def _save(self) -> None:
        # NOTE: a tick that outlives `stop` (its join timed out) must not write back the state `stop` deleted.
        with self._kv_lock:
            if not self._stop.is_set():
                internal_kv._internal_kv_put(self._key(), msgpack.packb(self.state, use_bin_type=True), overwrite=True,
                                             namespace=KV_NAMESPACE)

    def _event(self, kind: str, **detail: Any) -> None:
        self.state["events"] = (self.state["events"] + [{"kind": kind, "at": time.time(), "version": self.state["version"], **detail}])[-100:]
        log.warning("supervisor: %s %s", kind, detail)

    # -- loop ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # one bad observation never stops the loop
                log.exception("supervisor tick failed")
            self._stop.wait(self.period_s)

    def _actor(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is not None:
            return handle
        try:
            handle = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            return None
        self._handles[name] = handle
        return handle

    def reconcile(self) -> list[int]:
        """One tick. Returns the indices of the groups replaced in it."""
        with self._lock:
            replaced = self._heal_groups()
            reports = self._heal_routers()
            self._sync_routers(reports)
            self._settle_pending()
            now = time.monotonic()
            if now - self._last_rebalance >= self.policy.rebalance_period_s:
                self._last_rebalance = now
                self._observe_load(reports)
                changed = self._scale_groups()
                changed = self._scale_replicas() or changed
                shares = replica_shares(self._placement(), self.rates)
                if changed or self._shares_moved(shares):
                    self._shares = shares
                    self.state["shares"] = shares
                    self._publish("rebalance")
            self._finish_drains()
            return replaced

    # -- groups ----------------------------------------------------------------
    def _placement(self) -> list[list[Slot]]:
        return [as_slots(p) for p in self.state["placement"]]

    def _ping(self, name: str) -> bool:
        actor = self._actor(name)
        try:
            return actor is not None and ray.get(actor.ping.remote(), timeout=max(2.0, 4 * self.period_s)) is True
        except Exception:
            return False

    def _heal_groups(self) -> list[int]:
        dead = [i for i, gname in enumerate(self.state["groups"]) if not self._ping(gname)]
        if not dead:
            return []
        t0 = time.monotonic()
        names = [self.state["groups"][i] for i in dead]
        for i in dead:
            self._replace(i)
        self._publish("failover")
        self._event("failover", groups=names, replacements=[self.state["groups"][i] for i in dead],
                    recovery_s=time.monotonic() - t0)
        self._save()
        return dead

    def _new_group(self, name: str, slots: Sequence[Slot], avoid_nodes: set[str] = frozenset()) -> Any:  # type: ignore[assignment]
        cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ExpertGroup)
        # NOTE: detached: an actor this supervisor makes must outlive it (Ray ends an owned actor with
        # its owner, and a restarted supervisor is a new process); Deployment.shutdown removes them.
        options = {**self.group_options, "lifetime": "detached"}
        node = self._node_without(avoid_nodes) if avoid_nodes else None
        if node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # soft: a node without room (or gone meanwhile) leaves the choice to Ray
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        return cls.options(name=name, namespace=self.namespace, **options).remote(
            name, self.source, list(slots), **self.group_kwargs, tied_to=self._tie)

    def _node_without(self, avoid: set[str]) -> str | None:
        """A live node outside `avoid` with the fewest of this deployment's groups (None: no such node)."""
        alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= self.group_options.get("num_cpus", 1)]
        options = [n for n in alive if n not in avoid]
        if not options:
            return None
        mine = collections.Counter(g.node_id for g in self._table.groups) if self._table is not None else collections.Counter()
        return min(options, key=lambda n: (mine[n], n))

    def _replace(self, index: int) -> None:
        old = self.state["groups"][index]
        stale = self._handles.pop(old, None) or self._actor(old)
        self._handles.pop(old, None)
        if stale is not None:
            ray.kill(stale)
        # NOTE: away from the nodes of groups holding copies of the same slots (and from the dead one's).
        placement = self._placement()
        mine = set(placement[index])
        avoid: set[str] = set()
        if self._table is not None and len(self._table.groups) == len(placement):
            avoid = {self._table.groups[g].node_id for g, p in enumerate(placement) if g != index and mine & set(p)}
            avoid.add(self._table.groups[index].node_id)
        new_name, actor = self._replacement(old, placement[index], avoid)
        self.state["groups"][index] = new_name
        self._handles[new_name] = actor
        # copies being drained from the dead group are gone with it
        self.state["draining"] = [d for d in self.state["draining"] if d["group"] != old]
        log.warning("expert group %s replaced by %s", old, new_name)

    def _replacement(self, old: str, slots: Sequence[Slot], avoid: set[str]) -> tuple[str, Any]:
        """A live group named `<old>-r<n>` hosting `slots`: a new one, or the one a predecessor made.

        NOTE: the name is saved only with the table that names it, so a supervisor that died while
        its replacement started left that actor (detached) under the name a restarted supervisor
        derives again from the saved state: it is adopted (given `slots`) if it answers, else
        killed and the next name tried; creating it again would fail on every tick (name taken).
        """
        m = re.match(r"^(.*)-r(\d+)$", old)
        base, gen = (m.group(1), int(m.group(2)) + 1) if m else (old, 1)
        for n in itertools.count(gen):
            name = f"{base}-r{n}"
            found = self._actor(name)
            if found is None:
                actor = self._new_group(name, slots, avoid)
                ray.get(actor.info.remote(), timeout=300)
                return name, actor
            self._handles.pop(name, None)
            try:
                ray.get(found.info.remote(), timeout=300)
                ray.get(found.set_slots.remote(list(slots)), timeout=300)
            except Exception as e:
                log.warning("group %s left by a previous supervisor does not answer (%r): killed", name, e)
                ray.kill(found, no_restart=True)
                continue
            log.warning("group %s left by a previous supervisor adopted", name)
            return name, found
        raise AssertionError("unreachable")

    # -- routers ---------------------------------------------------------------
    def _heal_routers(self) -> dict[str, dict[str, Any]]:
        """Re-create routers that died; returns the load reports of those that answered."""
        reports: dict[str, dict[str, Any]] = {}
        for i, rname in enumerate(self.state["routers"]):
            actor = self._actor(rname)
            try:
                if actor is not None:
                    reports[rname] = ray.get(actor.load.remote(), timeout=10)
                    continue
            except ray.exceptions.GetTimeoutError:
                continue  # busy, not dead
            except Exception as e:
                log.warning("router %s does not answer: %r", rname, e)
            if i >= len(self.router_specs):
                continue
            self._handles.pop(rname, None)
            t0 = time.monotonic()
            try:
                if actor is not None:
                    # NOTE: an actor lost with its node keeps its name until it is killed explicitly.
                    ray.kill(actor, no_restart=True)
                self._restart_router(i, rname)
            except Exception as e:
                log.warning("router %s could not be re-created yet: %s", rname, e)
                continue
            self._event("router_restart", router=rname, recovery_s=time.monotonic() - t0)
            self._save()
        return reports

    def _sync_routers(self, reports: dict[str, dict[str, Any]]) -> None:
        """Every router holds the current table version. A router ahead of it (a supervisor that died
        between sending a version and saving it) makes the next version start above the router's;
        a router behind it (died between saving and sending, or the router did not take it) gets it."""
        ahead = max((int(r["version"]) for r in reports.values()), default=0)
        if ahead > self.state["version"]:
            self._event("version_resync", saved=self.state["version"], routers=ahead)
            self.state["version"] = ahead
            self._publish("resync")
            return
        behind = [rname for rname, r in reports.items() if int(r["version"]) < self.state["version"]]
        if not behind:
            return
        table, handles = self._current_table()
        for rname in behind:
            try:
                ray.get(self._actor(rname).update_table.remote(table, handles), timeout=60)
            except Exception as e:
                log.warning("router %s did not take table v%d: %s", rname, table.version, e)

    def _restart_router(self, index: int, rname: str) -> None:
        from router_svc.router import Router

        spec = self.router_specs[index]
        table, handles = self._current_table()
        router = ray.remote(Router).options(name=rname, namespace=self.namespace, **{**spec["options"], "lifetime": "detached"}).remote(
            table=table, groups=handles, **spec["kwargs"], tied_to=self._tie)
        ray.get(router.start.remote(), timeout=120)
        self._handles[rname] = router

    # -- tables ------------------------------------------------------------------
    def _current_table(self) -> tuple[RoutingTable, list[Any]]:
        handles = [self._actor(n) for n in self.state["groups"]]
        if self._table is None or self._table.version != self.state["version"]:
            infos = ray.get([h.info.remote() for h in handles], timeout=60)
            shares = self._shares if self._shares is not None and [len(s) for s in self._shares] == [len(p) for p in self.state["placement"]] else None
            self._table = RoutingTable.build(self.state["version"], self.num_experts,
                                             [GroupRef(i["name"], i["grpc_address"], i["node_id"]) for i in infos],
                                             self._placement(), shares)
        return self._table, handles

    def _publish(self, why: str) -> None:
        self.state["version"] += 1
        # NOTE: saved before any router takes it: routers drop a version <= theirs, so a supervisor
        # restarted after sending an unsaved version would publish it again in vain. Routers still
        # behind (it died before sending) are caught up by `_sync_routers`.
        self._save()
        self._table = None
        table, handles = self._current_table()
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
        """Groups (names, nodes, slots), experts (copies, where, rate), table version, events."""
        with self._lock:
            placement = self._placement()
            table = self._table
            nodes = {g.name: g.node_id for g in table.groups} if table is not None else {}
            experts = []
            for slot in sorted({s for p in placement for s in p}):
                hosts = [self.state["groups"][g] for g, p in enumerate(placement) if slot in p]
                experts.append({"layer": slot[0], "expert": slot[1], "replicas": len(hosts), "groups": hosts,
                                "tokens_per_s": self.rates.get(slot, 0.0)})
            loads = group_loads(placement, self.rates, self._shares if self._shares is not None and
                                [len(s) for s in self._shares] == [len(p) for p in placement] else None)
            groups = [{"name": n, "node_id": nodes.get(n, ""), "slots": [list(s) for s in placement[i]],
                       "scaled": bool(self.state["scaled"][i]), "tokens_per_s": loads[i]}
                      for i, n in enumerate(self.state["groups"])]
            return {"groups": list(self.state["groups"]), "version": self.state["version"],
                    "events": [dict(e) for e in self.state["events"]], "experts": experts, "group_info": groups,
                    "pending": [dict(p) for p in self.state["pending"]], "draining": [dict(d) for d in self.state["draining"]],
                    "retiring": [dict(r) for r in self.state["retiring"]], "routers": list(self.state["routers"]),
                    "restarts": self.state["restarts"], "placement": [[list(s) for s in p] for p in placement]}

    def stop(self, join_timeout_s: float = 30.0) -> None:
        """End the loop (waiting up to `join_timeout_s` for a tick in progress) and delete the saved state."""
        self._stop.set()
        self._thread.join(timeout=join_timeout_s)
        with self._kv_lock:
            internal_kv._internal_kv_del(self._key(), namespace=KV_NAMESPACE)
