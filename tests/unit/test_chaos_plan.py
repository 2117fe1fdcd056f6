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
