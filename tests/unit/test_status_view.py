"""What Status reports, pure parts: the supervisor's name, event details, the merge of the router's
own view with the supervisor's (router_svc.status_view), its mapping onto StatusResponse
(router_svc.gateway) and the event lines of `moe-serve status` (cluster.cli)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cluster.cli import _event_line
from cluster import NAMESPACE
from moe.v1 import expert_service_pb2 as pb
from router_svc import status_view as sv
from router_svc.gateway import ExpertServicer

pytestmark = pytest.mark.unit


def own_view() -> dict[str, Any]:
    """A router's own view: 2 experts of layer 0 on groups a and b (one copy each), 10 s of traffic."""
    return {
        "model": "random", "routing_table_version": 3,
        "experts": [{"layer": 0, "expert": 0, "replicas": 1, "groups": ["d-group-0"], "tokens_per_s": 5.0},
                    {"layer": 0, "expert": 1, "replicas": 1, "groups": ["d-group-1"], "tokens_per_s": 7.0}],
        "groups": [{"name": n, "node_id": "n0", "alive": True, "device": "cpu", "slots": 1, "scaled": False, "tokens_per_s": 0.0}
                   for n in ("d-group-0", "d-group-1")],
        "routers": [{"name": "d-router-0", "address": "127.0.0.1:1", "transports": ["object_store"], "requests": 4, "batches": 2}],
        "events": [], "supervisor_alive": False, "supervisor_restarts": 0,
    }


def supervisor_status() -> dict[str, Any]:
    """The supervisor after group 1 died and was replaced by d-group-1-r1 (copies of both experts on 0 and 1)."""
    return {
        "groups": ["d-group-0", "d-group-1-r1"], "version": 4, "restarts": 1, "routers": ["d-router-0"],
        "experts": [{"layer": 0, "expert": -1, "replicas": 1, "groups": ["d-group-0"], "tokens_per_s": 0.0},
                    {"layer": 0, "expert": 0, "replicas": 2, "groups": ["d-group-0", "d-group-1-r1"], "tokens_per_s": 1.5},
                    {"layer": 0, "expert": 1, "replicas": 2, "groups": ["d-group-0", "d-group-1-r1"], "tokens_per_s": 2.5}],
        "group_info": [{"name": "d-group-0", "node_id": "n0", "slots": [[0, 0], [0, 1], [0, -1]], "scaled": False, "tokens_per_s": 2.0},
                       {"name": "d-group-1-r1", "node_id": "", "slots": [[0, 0], [0, 1]], "scaled": True, "tokens_per_s": 2.0}],
        "events": [{"kind": "supervisor_restart", "at": 100.0, "version": 3, "restarts": 1},
                   {"kind": "failover", "at": 101.5, "version": 4, "groups": ["d-group-1"], "replacements": ["d-group-1-r1"],
                    "recovery_s": 1.25}],
        "pending": [], "draining": [], "retiring": [], "placement": [],
    }


@pytest.mark.parametrize("router, supervisor", [
    ("moe-1a2b3c-router-0", "moe-1a2b3c-supervisor"),
    ("moe-1a2b3c-router-12", "moe-1a2b3c-supervisor"),
    ("a-router-1-x-router-2", "a-router-1-x-supervisor"),
    ("router-0", None),
    ("moe-1a2b3c-router-", None),
    ("moe-1a2b3c-router-0-rdt", None),
])
def test_supervisor_name_from_router_name(router, supervisor) -> None:
    assert sv.supervisor_name(router) == supervisor


def test_control_namespace_is_the_deployments() -> None:
    assert sv.CONTROL_NAMESPACE == NAMESPACE


def test_actor_names_round_trip() -> None:
    from router_svc import names

    assert (names.group("moe-1a", 3), names.router("moe-1a", 0), names.supervisor("moe-1a")) == (
        "moe-1a-group-3", "moe-1a-router-0", "moe-1a-supervisor")
    assert names.deployment_of_router(names.router("moe-1a", 11)) == "moe-1a"
    assert names.deployment_of_router(names.group("moe-1a", 1)) is None


@pytest.mark.parametrize("event, detail", [
    ({"kind": "failover", "at": 1.0, "version": 2, "groups": ["x-group-1"], "replacements": ["x-group-1-r1"], "recovery_s": 0.5},
     "groups=x-group-1 replacements=x-group-1-r1"),
    ({"kind": "failover", "at": 1.0, "version": 2, "groups": ["a", "b"], "replacements": ["a-r1", "b-r1"], "recovery_s": 0.5},
     "groups=a,b replacements=a-r1,b-r1"),
    ({"kind": "replica_added", "at": 1.0, "version": 5, "copies": 2, "expert": 3, "layer": 0, "group": "x-group-1", "rate": 812.25},
     "group=x-group-1 layer=0 expert=3 copies=2 rate=812.25"),
    ({"kind": "replica_removed", "at": 1.0, "version": 6, "layer": 2, "expert": 0, "group": "g", "rate": 0.0, "copies": 1},
     "group=g layer=2 expert=0 copies=1 rate=0"),
    ({"kind": "router_restart", "at": 1.0, "version": 1, "router": "x-router-0", "recovery_s": 3.0}, "router=x-router-0"),
    ({"kind": "supervisor_restart", "at": 1.0, "version": 1, "restarts": 2}, "restarts=2"),
    ({"kind": "group_added", "at": 1.0, "version": 1, "group": "x-group-3", "waited_s": 12.3456, "groups": 4},
     "groups=4 group=x-group-3 waited_s=12.35"),
    ({"kind": "resources_requested", "at": 1.0, "version": 1, "group": "x-group-3", "bundles": [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]},
     "group=x-group-3 bundles={CPU:1},{CPU:1,GPU:1}"),
    ({"kind": "failover", "at": 1.0, "version": 1, "zeta": True, "alpha": "x"}, "alpha=x zeta=true"),
    ({"kind": "failover", "at": 1.0, "version": 1}, ""),
])
def test_event_detail_is_key_value_pairs_of_the_other_keys(event, detail) -> None:
    assert sv.event_detail(event) == detail


def test_control_events_keep_the_last_50_oldest_first() -> None:
    events = [{"kind": "replica_added", "at": float(i), "version": i, "layer": 0, "expert": i} for i in range(60)]
    events[-1] = {"kind": "failover", "at": 59.0, "version": 59, "groups": ["g"], "replacements": ["g-r1"], "recovery_s": 2.5}
    out = sv.control_events(events)
    assert len(out) == sv.EVENTS_SHOWN == 50
    assert [e["version"] for e in out] == list(range(10, 60))
    assert out[0] == {"kind": "replica_added", "at_unix": 10.0, "version": 10, "detail": "layer=0 expert=10", "recovery_s": 0.0}
    assert out[-1] == {"kind": "failover", "at_unix": 59.0, "version": 59, "detail": "groups=g replacements=g-r1", "recovery_s": 2.5}
    assert sv.control_events(events, limit=0) == []
    assert sv.control_events([]) == []


def test_merge_experts_takes_the_supervisors_copies_and_load() -> None:
    own = own_view()["experts"] + [{"layer": 2, "expert": 0, "replicas": 1, "groups": ["d-group-0"], "tokens_per_s": 9.0}]
    merged = sv.merge_experts(own, supervisor_status()["experts"])
    assert merged == [
        {"layer": 0, "expert": 0, "replicas": 2, "groups": ["d-group-0", "d-group-1-r1"], "tokens_per_s": 1.5},
        {"layer": 0, "expert": 1, "replicas": 2, "groups": ["d-group-0", "d-group-1-r1"], "tokens_per_s": 2.5},
        # a slot the supervisor does not list keeps the router's row; its shared slot (-1) gets none
        {"layer": 2, "expert": 0, "replicas": 1, "groups": ["d-group-0"], "tokens_per_s": 9.0},
    ]
    assert own[0]["replicas"] == 1  # inputs untouched


def test_merge_groups_liveness_and_device_from_pings() -> None:
    probes = {"d-group-0": {"device": "cuda:0", "node_id": "n0"}, "d-group-1-r1": {"device": "cpu", "node_id": "n7"}}
    groups = sv.merge_groups(supervisor_status()["group_info"], probes)
    assert groups == [
        {"name": "d-group-0", "node_id": "n0", "alive": True, "device": "cuda:0", "slots": 3, "scaled": False, "tokens_per_s": 2.0},
        # the supervisor has no node for it yet: the group's own answer gives it
        {"name": "d-group-1-r1", "node_id": "n7", "alive": True, "device": "cpu", "slots": 2, "scaled": True, "tokens_per_s": 2.0},
    ]
    silent = sv.merge_groups(supervisor_status()["group_info"], {"d-group-0": None})
    assert [(g["alive"], g["device"], g["node_id"]) for g in silent] == [(False, "", "n0"), (False, "", "")]


def test_new_groups_are_the_supervisors_that_the_table_lacks() -> None:
    assert sv.new_groups(supervisor_status(), ["d-group-0", "d-group-1"]) == ["d-group-1-r1"]
    assert sv.new_groups(None, ["d-group-0"]) == []
    assert sv.new_groups({"group_info": [{"slots": []}, "junk"]}, []) == []


def test_supervised_view() -> None:
    own = own_view()
    probes = {"d-group-0": {"device": "cpu", "node_id": "n0"}, "d-group-1-r1": {"device": "cpu", "node_id": "n1"}}
    view = sv.supervised_view(own, supervisor_status(), probes)
    assert view["supervisor_alive"] is True and view["supervisor_restarts"] == 1
    assert view["routing_table_version"] == 4  # the newer of the two
    assert sv.supervised_view({**own, "routing_table_version": 9}, supervisor_status(), probes)["routing_table_version"] == 9
    assert [g["name"] for g in view["groups"]] == ["d-group-0", "d-group-1-r1"]
    assert [e["kind"] for e in view["events"]] == ["supervisor_restart", "failover"]
    assert view["events"][1]["detail"] == "groups=d-group-1 replacements=d-group-1-r1" and view["events"][1]["recovery_s"] == 1.25
    assert view["routers"] == own["routers"] and view["model"] == "random"
    with pytest.raises(KeyError, match="group_info"):
        sv.supervised_view(own, {k: v for k, v in supervisor_status().items() if k != "group_info"}, probes)


class _FakeRouter:
    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    async def service_status(self) -> dict[str, Any]:
        return self.status


@pytest.mark.parametrize("supervised", [False, True], ids=["own", "supervised"])
def test_gateway_maps_every_field_onto_status_response(supervised) -> None:
    own = own_view()
    probes = {"d-group-0": {"device": "cpu", "node_id": "n0"}, "d-group-1-r1": {"device": "cpu", "node_id": "n1"}}
    st = sv.supervised_view(own, supervisor_status(), probes) if supervised else own
    resp = asyncio.run(ExpertServicer(_FakeRouter(st)).Status(pb.StatusRequest(), None))  # type: ignore[arg-type]
    back = pb.StatusResponse.FromString(resp.SerializeToString())
    assert back.supervisor_alive is supervised and back.supervisor_restarts == (1 if supervised else 0)
    assert back.routing_table_version == (4 if supervised else 3)
    assert [list(e.groups) for e in back.experts] == [e["groups"] for e in st["experts"]]
    assert [(g.name, g.node_id, g.alive, g.device, g.slots, g.scaled, g.tokens_per_s) for g in back.groups] == \
        [(g["name"], g["node_id"], g["alive"], g["device"], g["slots"], g["scaled"], g["tokens_per_s"]) for g in st["groups"]]
    assert [(e.kind, e.at_unix, e.version, e.detail, e.recovery_s) for e in back.events] == \
        [(e["kind"], e["at_unix"], e["version"], e["detail"], e["recovery_s"]) for e in st["events"]]


def test_cli_event_line() -> None:
    line = _event_line({"kind": "failover", "at_unix": 101.5, "version": 4, "detail": "groups=a replacements=a-r1", "recovery_s": 1.25})
    assert "failover" in line and "v4" in line and line.endswith("groups=a replacements=a-r1  recovery 1.25 s")
    quiet = _event_line({"kind": "replica_added", "at_unix": 0.0, "version": 2, "detail": "layer=0 expert=1", "recovery_s": 0.0})
    assert quiet.endswith("layer=0 expert=1") and "recovery" not in quiet
