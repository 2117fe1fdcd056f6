"""The chaos fault schedule and its command line (no Ray started)."""

from __future__ import annotations

import pytest

from cluster import chaos, cli, faults

pytestmark = pytest.mark.unit


def test_schedule_orders_every_kind_and_keeps_the_quiet_end_free() -> None:
    plan = chaos.ChaosPlan(duration_s=30.0, quiet_s=10.0, group_kill_every_s=8.0, router_kill_at_s=(5.0, 25.0),
                           supervisor_kill_at_s=(12.0,), node_kill_at_s=(19.0,), group_stop_at_s=(3.0,),
                           group_hang_at_s=(9.0, 20.0, 21.0))
    assert plan.schedule() == [(3.0, "group_stop"), (5.0, "router"), (8.0, "group"), (9.0, "group_hang"),
                               (12.0, "supervisor"), (16.0, "group"), (19.0, "node"), (20.0, "group_hang")]
    assert {kind for _, kind in plan.schedule()} <= set(faults.FAULTS)


def test_command_line_sets_the_schedule() -> None:
    args = cli._parser().parse_args(["chaos", "--hang-group-at", "4", "11", "--stop-group-at", "6", "--group-every", "0"])
    assert (args.hang_group_at, args.stop_group_at, args.group_every) == ([4.0, 11.0], [6.0], 0.0)
    assert cli._parser().parse_args(["chaos"]).hang_group_at == []


def test_a_run_that_sent_nothing_or_whose_client_broke_off_fails() -> None:
    """PASS means traffic flowed and nothing was lost: a run with no request (no gateway to call, no
    client) is no pass, and a client thread that raised is reported, not silently gone."""
    import threading

    from router_svc.local import LocalMoE

    assert not chaos.ChaosReport().ok and "FAIL: no request was sent" in chaos.ChaosReport().table()
    report = chaos.ChaosReport()
    target = faults.Target(name="x", gateways=[], reference=LocalMoE.from_config(
        dict(hidden_size=8, intermediate_size=4, num_experts=4, num_layers=1, moe_layers=[0]), seed=1))
    chaos._client(target, chaos.ChaosPlan(), 0, threading.Event(), 0.0, [], report, threading.Lock())
    assert report.errors == ["client 0: ValueError: MoEClient needs at least one gateway address"]
    report.sent = report.succeeded = 3
    assert not report.ok and "client error: client 0: ValueError" in report.table()


def test_down_or_status_with_an_empty_name_is_refused_not_taken_for_all() -> None:
    from cluster import ops

    with pytest.raises(LookupError, match="an empty deployment name"):
        ops._entries("")


@pytest.mark.parametrize("actor, mine", [
    ("moe-a1-supervisor", True), ("moe-a1-router-0", True), ("moe-a1-router-3-rdt-12", True), ("moe-a1-group-2", True),
    ("moe-a1-group-2-r3", True), ("moe-a1-b2-supervisor", False), ("moe-a1-b2-group-0", False), ("moe-a1-group-1-x", False),
    ("moe-a1", False), ("moe-a10-router-0", False),
])
def test_a_deployment_owns_exactly_its_own_actor_names(actor: str, mine: bool) -> None:
    """`down` and shutdown remove a deployment's actors by name: another deployment whose name begins
    with this one's (moe-a1-b2 beside moe-a1) keeps its own."""
    from router_svc import names

    assert names.owned_by("moe-a1", actor) is mine
