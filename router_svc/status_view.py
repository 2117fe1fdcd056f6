"""What the Status RPC reports: the router's own view, overlaid with the supervisor's when it answers.

The router knows its routing table, the tokens it routed since it started and whether the
groups it dispatches to answer. The supervisor knows more: where every copy sits, the load
over a sliding window summed over all routers, which groups the autoscaler added, and what
it did (failovers, restarts, copies and groups added or removed). Status shows the
supervisor's placement and load whenever it answers within a few seconds, and the router's
own view otherwise (no supervisor, or one being restarted by Ray).

The merge and the event formatting are pure functions over plain dicts; `ask_supervisor`
and `probe_groups` are the only Ray calls; `service_status` puts a router's view together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable, Mapping, Sequence

import ray

from router_svc import names

log = logging.getLogger(__name__)

# NOTE: the router is not told where the control plane lives, and a Ray actor's runtime namespace is
# its driver's, not its own: the deployment's namespace is the fixed one its actors are created in.
CONTROL_NAMESPACE = names.NAMESPACE
EVENTS_SHOWN = 50
SUPERVISOR_TIMEOUT_S = 3.0
GROUP_TIMEOUT_S = 5.0

# event keys that have their own ControlEvent field; the rest go into `detail`, in this order first.
_OWN_FIELDS = frozenset({"kind", "at", "version", "recovery_s"})
_DETAIL_ORDER = ("groups", "replacements", "group", "router", "layer", "expert", "copies", "rate", "waited_s",
                 "restarts", "bundles")


# -- pure ------------------------------------------------------------------------------------------


def supervisor_name(router_name: str) -> str | None:
    """`<deployment>-router-<i>` -> `<deployment>-supervisor`; None for a router not named that way."""
    deployment = names.deployment_of_router(router_name)
    return None if deployment is None else names.supervisor(deployment)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".")
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def event_detail(event: Mapping[str, Any]) -> str:
    """The keys of a supervisor event other than kind/at/version/recovery_s as `key=value` pairs.

    {"kind": "replica_added", "layer": 0, "expert": 3, "group": "x-group-1", "copies": 2, "rate": 812.25}
    -> "group=x-group-1 layer=0 expert=3 copies=2 rate=812.25"  (lists join with ",")
    """
    known = [k for k in _DETAIL_ORDER if k in event]
    others = sorted(k for k in event if k not in _OWN_FIELDS and k not in _DETAIL_ORDER)
    return " ".join(f"{k}={_text(event[k])}" for k in known + others)


def control_events(events: Sequence[Mapping[str, Any]], limit: int = EVENTS_SHOWN) -> list[dict[str, Any]]:
    """The last `limit` supervisor events (oldest first) as ControlEvent fields."""
    recent = list(events)[-limit:] if limit > 0 else []
    return [{"kind": str(e.get("kind", "")), "at_unix": float(e.get("at", 0.0)), "version": int(e.get("version", 0)),
             "detail": event_detail(e), "recovery_s": float(e.get("recovery_s", 0.0))} for e in recent]


def new_groups(supervisor: Mapping[str, Any] | None, known: Iterable[str]) -> list[str]:
    """Groups the supervisor placed that the router's table does not name yet (a replacement
    published a moment ago)."""
    if supervisor is None:
        return []
    known = set(known)
    names = (g.get("name") for g in supervisor.get("group_info", ()) if isinstance(g, Mapping))
    return [n for n in names if isinstance(n, str) and n not in known]


def merge_experts(own: Sequence[Mapping[str, Any]], supervised: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The router's expert rows with replicas, groups and tokens_per_s taken from the supervisor's
    rows of the same (layer, expert). The supervisor's shared slots (expert -1) have no row here."""
    by_slot = {(int(s["layer"]), int(s["expert"])): s for s in supervised}
    out = []
    for row in own:
        s = by_slot.get((int(row["layer"]), int(row["expert"])))
        if s is None:
            out.append(dict(row))
        else:
            out.append({**row, "replicas": int(s["replicas"]), "groups": [str(g) for g in s["groups"]],
                        "tokens_per_s": float(s["tokens_per_s"])})
    return out


def _alive(info: Mapping[str, Any] | None) -> bool:
    """A group's `info()` says it lives and no batch of it computed past its compute_timeout_s."""
    return info is not None and info.get("healthy", True) is True


def merge_groups(supervised: Iterable[Mapping[str, Any]], probes: Mapping[str, Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """The supervisor's groups (node, slots, scaled, load) with liveness and device from `probes`
    (group name -> its `info()`, None when it did not answer; alive: it answered, healthy)."""
    out = []
    for g in supervised:
        info = probes.get(g["name"])
        out.append({"name": g["name"], "node_id": g["node_id"] or (info or {}).get("node_id", ""),
                    "alive": _alive(info), "device": "" if info is None else str(info["device"]),
                    "slots": len(g["slots"]), "scaled": bool(g["scaled"]), "tokens_per_s": float(g["tokens_per_s"])})
    return out


def supervised_view(own: Mapping[str, Any], supervisor: Mapping[str, Any],
                    probes: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """`own` (the router's service status) with the supervisor's placement, load, version and events."""
    return {**own, "experts": merge_experts(own["experts"], supervisor["experts"]),
            "groups": merge_groups(supervisor["group_info"], probes),
            "routing_table_version": max(int(own["routing_table_version"]), int(supervisor["version"])),
            "events": control_events(supervisor["events"]), "supervisor_alive": True,
            "supervisor_restarts": int(supervisor["restarts"])}


# -- Ray -------------------------------------------------------------------------------------------


async def ask_supervisor(router_name: str, timeout_s: float = SUPERVISOR_TIMEOUT_S) -> dict[str, Any] | None:
    """The supervisor's `status()`, or None when there is none or it does not answer within `timeout_s`."""
    name = supervisor_name(router_name)
    if name is None:
        return None

    async def ask() -> dict[str, Any]:
        # NOTE: get_actor is a blocking GCS lookup; off the event loop, which serves requests meanwhile.
        actor = await asyncio.to_thread(ray.get_actor, name, namespace=CONTROL_NAMESPACE)
        return await actor.status.remote()

    try:
        return await asyncio.wait_for(ask(), timeout=timeout_s)
    except Exception as e:  # absent, restarting, busy: Status falls back to the router's own view
        log.debug("supervisor %s did not answer: %r", name, e)
        return None


async def probe_groups(names: Sequence[str], handles: Mapping[str, Any],
                       timeout_s: float = GROUP_TIMEOUT_S) -> dict[str, dict[str, Any] | None]:
    """Group name -> its `info()` (None: no answer). Groups not in `handles` are looked up by name."""

    async def probe(name: str) -> dict[str, Any] | None:
        handle = handles.get(name)
        if handle is None:
            handle = await asyncio.to_thread(ray.get_actor, name, namespace=CONTROL_NAMESPACE)
        info = await handle.info.remote()
        return info if isinstance(info, dict) else None

    results = await asyncio.gather(*(asyncio.wait_for(probe(n), timeout_s) for n in names), return_exceptions=True)
    return {n: (r if isinstance(r, dict) else None) for n, r in zip(names, results)}


# -- the Status RPC --------------------------------------------------------------------------------

def _rdt_state(router: Any) -> str:
    """A router's RDT as the Status RPC reports it (see RouterStatus.rdt in the proto)."""
    if not router.config.rdt_owner:
        return ""
    if "rdt" not in router.chain:
        return "not used"
    return router.transports["rdt"].describe()


async def service_status(router: Any) -> dict[str, Any]:
    """What a router's gateway reports: experts (copies, where, load), groups (node, device,
    liveness, load), routers and the supervisor's recent events. Placement and load are the
    supervisor's (a window over all routers) when it answers, else the router's own: its table
    and the tokens it routed since it started. Liveness and device: a ping of every group."""
    supervisor = await ask_supervisor(router.name)
    # NOTE: one table throughout: update_table may swap it while this awaits the pings.
    table, handles, spec = router.table, router.groups, router.spec
    uptime = max(time.monotonic() - router.started, 1e-9)
    experts = []
    tokens = router.usage.tokens
    for layer in spec.moe_layers:
        counts = tokens[layer].tolist()
        for e in range(spec.num_experts):
            copies = table.replicas(layer, e)
            experts.append({"layer": layer, "expert": e, "replicas": len(copies),
                            "groups": [table.groups[g].name for g, _ in copies], "tokens_per_s": counts[e] / uptime})
    known = {ref.name: handle for ref, handle in zip(table.groups, handles)}
    probes = await probe_groups(list(known) + new_groups(supervisor, known), known)
    groups = []
    for ref, slots in zip(table.groups, table.placement):
        info = probes[ref.name]
        groups.append({"name": ref.name, "node_id": ref.node_id, "alive": _alive(info),
                       "device": "" if info is None else info["device"], "slots": len(slots),
                       "scaled": False, "tokens_per_s": 0.0})
    routers = [{"name": router.name, "address": router.gateway_address() or "", "transports": list(router.chain),
                "requests": router.counters["requests"], "batches": router.counters["batches"],
                "rdt": _rdt_state(router)}]
    own = {"model": spec.family, "routing_table_version": table.version, "experts": experts,
           "groups": groups, "routers": routers, "events": [], "supervisor_alive": False, "supervisor_restarts": 0}
    if supervisor is None:
        return own
    try:
        return supervised_view(own, supervisor, probes)
    except (KeyError, TypeError, ValueError) as e:  # a supervisor of another shape: the router's own view
        log.warning("supervisor status not understood: %r", e)
        return own
