"""The supervisor's elastic passes: load, replicas, the group count, and drains.

  load     the tokens every router routed since the last look, over a sliding window: rates per slot.
  replicas every `rebalance_period_s`: a hot expert gets copies placed on the lightest group of a
           node without a copy (the copy is loaded before the table names it); a copy that stayed
           cool is taken out of the table and unloaded once routers finished the batches planned
           before (drain).
  groups   aggregate rate / target per group -> more or fewer groups, with up/down delays; a group
           Ray cannot place within `place_timeout_s` makes a `request_resources` call (Ray's
           autoscaler adds the node); a new group is filled with copies of the heaviest slots; a
           removed group is drained, then shut down.
  shares   routers split an expert's tokens over its copies by the shares in the table, computed
           from the observed load so groups even out.

`Scaling` is a base of `Supervisor` (cluster.supervisor), split out so supervisor.py reads as the
reconcile loop, healing and tables; it works on the supervisor's state named in its class body.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any

import ray
import torch

from cluster.actors import end_actors
from cluster.config import ElasticPolicy
from cluster.eplb import ReplicaPolicy, desired_replicas, group_loads, pick_removal, place_replica, replica_shares
from cluster.placement import Slot, as_slots
from expert_workers.group import SHARED
from router_svc import names
from router_svc.table import RoutingTable

log = logging.getLogger(__name__)


class Scaling:
    """Load, replicas, the group count and drains (see the module). Calls the supervisor's `_actor`,
    `_event`, `_placement`, `_new_group`, `_publish` and `_save`."""

    # the supervisor's, read and kept here
    name: str
    num_experts: int
    group_options: dict[str, Any]
    policy: ElasticPolicy
    state: dict[str, Any]  # saved in GCS: placement, base, groups, scaled, pending, draining, retiring, version, shares
    rates: dict[Slot, float]  # tokens per second per slot over the window
    _window: collections.deque  # (time, tokens per slot since the previous look)
    _last_counts: dict[str, dict[Slot, int]]  # each router's last token counts
    _cool_since: dict[Slot, float]  # when a slot's copies became more than its load wants
    _want_groups_since: tuple[int, float] | None  # the group count wanted, and since when
    _shares: list[list[float]] | None
    _table: RoutingTable | None
    _handles: dict[str, Any]

    # -- load ------------------------------------------------------------------
    def _observe_load(self, reports: dict[str, dict[str, Any]]) -> None:
        """Add the tokens every router routed since the last look (`reports`: this tick's) to the
        window; rates over it."""
        now = time.monotonic()
        delta: dict[Slot, float] = {}
        for rname, report in reports.items():
            counts = {(int(l), e): int(n) for l, row in report["expert_tokens"].items() for e, n in enumerate(row)}
            last = self._last_counts.get(rname)
            self._last_counts[rname] = counts
            if last is None:
                continue  # first look at this router: a baseline
            for s, n in counts.items():
                d = n - last.get(s, 0)
                delta[s] = delta.get(s, 0.0) + (d if d >= 0 else n)  # a restarted router counts from 0
        self._window.append((now, delta))
        while len(self._window) > 1 and now - self._window[0][0] > self.policy.load_window_s:
            self._window.popleft()
        span = max(now - self._window[0][0], self.policy.rebalance_period_s, 1e-3) if len(self._window) > 1 else None
        rates: dict[Slot, float] = {}
        if span is not None:
            for _, d in list(self._window)[1:]:
                for s, n in d.items():
                    rates[s] = rates.get(s, 0.0) + n / span
        self.rates = rates

    def _shares_moved(self, shares: list[list[float]]) -> bool:
        """True when the load split moved by more than 5% of some slot's tokens (or its shape changed)."""
        old = self._shares
        if old is None or [len(s) for s in old] != [len(s) for s in shares]:
            old = replica_shares(self._placement(), {})  # what routers use without shares: even
        return any(abs(a - b) > 0.05 for new, was in zip(shares, old) for a, b in zip(new, was))

    # -- replicas --------------------------------------------------------------
    def _nodes(self) -> list[str]:
        if self._table is not None and len(self._table.groups) == len(self.state["groups"]) and \
                [g.name for g in self._table.groups] == self.state["groups"]:
            return [g.node_id for g in self._table.groups]
        infos = ray.get([self._actor(n).info.remote() for n in self.state["groups"]], timeout=60)
        return [i["node_id"] for i in infos]

    def _scale_replicas(self) -> bool:
        """Hot experts up, cooled ones down (after the delay). True if the placement changed."""
        policy = ReplicaPolicy(hot_threshold=self.policy.hot_threshold, max_replicas=self.policy.max_replicas,
                               min_rate=self.policy.hot_replica_min_rate, down_fraction=self.policy.replica_down_fraction)
        placement = self._placement()
        base = [as_slots(b) for b in self.state["base"]]
        usable = list(range(len(self.state["groups"])))  # retiring groups have already left the list
        nodes = self._nodes()
        layers = sorted({l for slots in placement for l, e in slots})
        changed = False
        now = time.monotonic()
        for layer in layers:
            rate_E = torch.tensor([self.rates.get((layer, e), 0.0) for e in range(self.num_experts)])
            cur_E = torch.zeros(self.num_experts, dtype=torch.int64)
            base_E = torch.zeros(self.num_experts, dtype=torch.int64)
            for g, slots in enumerate(placement):
                for l, e in slots:
                    if l == layer and e != SHARED:
                        cur_E[e] += 1
            for slots in base:
                for l, e in slots:
                    if l == layer and e != SHARED:
                        base_E[e] += 1
            want_E = desired_replicas(rate_E, cur_E, base_E, policy)
            for e in torch.argsort(rate_E / cur_E.clamp_min(1), descending=True).tolist():
                slot = (layer, e)
                if int(want_E[e]) > int(cur_E[e]):
                    self._cool_since.pop(slot, None)
                    for _ in range(int(want_E[e]) - int(cur_E[e])):
                        loads = group_loads(placement, self.rates)
                        g = place_replica(placement, slot, loads, nodes, usable)
                        if g is None:
                            break
                        self._add_copy(g, slot)
                        placement = self._placement()
                        changed = True
                        self._event("replica_added", layer=layer, expert=e, group=self.state["groups"][g],
                                    rate=float(rate_E[e]), copies=sum(slot in p for p in placement))
                elif int(want_E[e]) < int(cur_E[e]):
                    since = self._cool_since.setdefault(slot, now)
                    if now - since < self.policy.replica_down_delay_s:
                        continue
                    g = pick_removal(placement, base, slot, group_loads(placement, self.rates), nodes)
                    if g is None:
                        continue
                    self._remove_copy(g, slot)
                    placement = self._placement()
                    self._cool_since.pop(slot, None)
                    changed = True
                    self._event("replica_removed", layer=layer, expert=e, group=self.state["groups"][g],
                                rate=float(rate_E[e]), copies=sum(slot in p for p in placement))
                else:
                    self._cool_since.pop(slot, None)
        return changed

    def _add_copy(self, g: int, slot: Slot) -> None:
        """Load the copy on group g (before any table names it)."""
        placement = self._placement()
        name = self.state["groups"][g]
        # a copy still draining there is simply kept
        self.state["draining"] = [d for d in self.state["draining"] if not (d["group"] == name and tuple(d["slot"]) == slot)]
        hosted = placement[g] + [slot] + [tuple(d["slot"]) for d in self.state["draining"] if d["group"] == name]
        ray.get(self._actor(name).set_slots.remote(hosted), timeout=300)
        self.state["placement"][g] = [list(s) for s in placement[g] + [slot]]

    def _remove_copy(self, g: int, slot: Slot) -> None:
        """Take the copy out of the placement; the group unloads it after the drain."""
        self.state["placement"][g] = [list(s) for s in self._placement()[g] if s != slot]
        self.state["draining"].append({"group": self.state["groups"][g], "slot": list(slot),
                                       "version": self.state["version"] + 1, "since": time.time()})

    # -- groups: autoscaling ---------------------------------------------------
    def _scale_groups(self) -> bool:
        p = self.policy
        if p.max_groups <= p.min_groups and len(self.state["groups"]) >= p.min_groups:
            return False
        n = len(self.state["groups"]) + len(self.state["pending"])
        total = sum(self.rates.values())
        want = n
        if p.target_group_tokens_per_s > 0:
            want = max(p.min_groups, min(p.max_groups, math.ceil(total / p.target_group_tokens_per_s) if total > 0 else p.min_groups))
        want = max(want, p.min_groups)
        now = time.monotonic()
        if want == n:
            self._want_groups_since = None
            return False
        if self._want_groups_since is None or self._want_groups_since[0] != want:
            self._want_groups_since = (want, now)
        delay = p.scale_up_delay_s if want > n else p.scale_down_delay_s
        if now - self._want_groups_since[1] < delay:
            return False
        self._want_groups_since = None
        if want > n:
            name = names.group(self.name, self.state["next_group"])
            self.state["next_group"] += 1
            self.state["pending"].append({"group": name, "since": time.time(), "requested": False})
            self._event("group_requested", group=name, rate=total, groups=n + 1)
            # NOTE: saved before the actor exists, so a supervisor restarted in between finds the name
            # pending (`_settle_pending` takes the actor or makes it) instead of making it again.
            self._save()
            self._handles[name] = self._new_group(name, [])
            return False
        # down: the newest group the autoscaler added
        scaled = [i for i, s in enumerate(self.state["scaled"]) if s]
        if not scaled:
            return False
        i = scaled[-1]
        name = self.state["groups"][i]
        for key in ("groups", "placement", "base", "scaled"):
            del self.state[key][i]
        self.state["retiring"].append({"group": name, "version": self.state["version"] + 1, "since": time.time()})
        self._event("group_removed", group=name, rate=total, groups=len(self.state["groups"]))
        return True

    def _settle_pending(self) -> None:
        """Groups the autoscaler asked for: placed -> filled with copies of the heaviest experts and
        published; not placed within `place_timeout_s` -> ask Ray's autoscaler for room."""
        if not self.state["pending"]:
            return
        still = []
        changed = placed_after_request = False
        for entry in self.state["pending"]:
            name = entry["group"]
            actor = self._actor(name)
            if actor is None:
                actor = self._handles[name] = self._new_group(name, [])
            ready, _ = ray.wait([actor.info.remote()], timeout=0.5)
            if ready:
                try:
                    ray.get(ready[0])
                except Exception as e:
                    log.warning("new group %s failed: %s", name, e)
                    self._handles.pop(name, None)
                    continue
                self._fill_new_group(name)
                placed_after_request = placed_after_request or entry["requested"]
                self._event("group_added", group=name, waited_s=time.time() - entry["since"],
                            groups=len(self.state["groups"]))
                changed = True
                continue
            if not entry["requested"] and time.time() - entry["since"] > self.policy.place_timeout_s:
                bundles = self._resource_bundles(len(self.state["groups"]) + len(self.state["pending"]))
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=bundles)
                entry["requested"] = True
                self._event("resources_requested", group=name, bundles=bundles)
            still.append(entry)
        self.state["pending"] = still
        if placed_after_request and not any(e["requested"] for e in self.state["pending"]):
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])  # placed: the groups hold their resources; withdraw the floor
        if changed:
            self._shares = self.state["shares"] = replica_shares(self._placement(), self.rates)
            self._publish("scale_up")
        self._save()

    def _resource_bundles(self, groups: int) -> list[dict[str, float]]:
        bundle = {"CPU": float(self.group_options.get("num_cpus", 1.0))}
        if self.group_options.get("num_gpus"):
            bundle["GPU"] = float(self.group_options["num_gpus"])
        return [dict(bundle) for _ in range(groups)]

    def _fill_new_group(self, name: str) -> None:
        """A new group takes as many slots as the average group: copies of the slots with the most
        load per copy that it does not hold yet (EPLB: replicate the heaviest into spare slots)."""
        placement = self._placement()
        size = max(1, round(sum(len(p) for p in placement) / max(len(placement), 1)))
        copies: dict[Slot, int] = collections.Counter(s for p in placement for s in p)
        ranked = sorted((s for s in copies if s[1] != SHARED),
                        key=lambda s: (-self.rates.get(s, 0.0) / copies[s], copies[s], s))
        # within max_replicas where that leaves enough slots; else the heaviest regardless (the group must carry load)
        capped = [s for s in ranked if copies[s] < self.policy.max_replicas]
        slots = (capped if len(capped) >= size else ranked)[:size]
        ray.get(self._actor(name).set_slots.remote(slots), timeout=300)
        self.state["groups"].append(name)
        self.state["placement"].append([list(s) for s in slots])
        self.state["base"].append([list(s) for s in slots])
        self.state["scaled"].append(True)

    # -- drains ----------------------------------------------------------------
    def _finish_drains(self) -> None:
        """Unload copies / kill groups once every router finished the batches planned before
        the version that dropped them (or after `drain_timeout_s`)."""
        if not self.state["draining"] and not self.state["retiring"]:
            return
        oldest = self.state["version"]
        for rname in self.state["routers"]:
            actor = self._actor(rname)
            try:
                report = ray.get(actor.load.remote(), timeout=10) if actor is not None else None
            except Exception:
                report = None
            if report is not None:
                oldest = min(oldest, report["oldest_in_flight"], report["version"])
        now = time.time()
        done_drains = [d for d in self.state["draining"] if oldest >= d["version"] or now - d["since"] > self.policy.drain_timeout_s]
        for d in done_drains:
            if d["group"] in self.state["groups"]:
                g = self.state["groups"].index(d["group"])
                keep = self._placement()[g] + [tuple(x["slot"]) for x in self.state["draining"]
                                               if x["group"] == d["group"] and x not in done_drains]
                try:
                    ray.get(self._actor(d["group"]).set_slots.remote(keep), timeout=60)
                except Exception as e:
                    log.warning("unloading %s from %s: %s", d["slot"], d["group"], e)
        self.state["draining"] = [d for d in self.state["draining"] if d not in done_drains]
        done_groups = [r for r in self.state["retiring"] if oldest >= r["version"] or now - r["since"] > self.policy.drain_timeout_s]
        retired = [self._actor(r["group"]) for r in done_groups]
        for r in done_groups:
            self._handles.pop(r["group"], None)
        end_actors([a for a in retired if a is not None], timeout_s=10.0)
        self.state["retiring"] = [r for r in self.state["retiring"] if r not in done_groups]
        if done_drains or done_groups:
            self._save()
