"""Chaos on an embedded Ray: expert groups, routers and the supervisor killed (and groups stopped) while
gRPC clients send traffic; `cluster.chaos.run_chaos` checks every answer against LocalMoE and reports every failure.

Schedules are bounded (tens of seconds); recovery times are reported by the run, never asserted.
"""

from __future__ import annotations

import pytest
import ray

from cluster import deploy
from cluster.chaos import SMALL_MODEL, ChaosPlan, ChaosReport, Target, embedded_config, run_chaos
from router_svc import LocalMoE

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def _run(plan: ChaosPlan, **deployment) -> tuple[ChaosReport, dict, dict]:
    cfg = embedded_config(seed=plan.seed)
    cfg["deployment"].update(deployment)
    dep = deploy(cfg)
    try:
        before = ray.get(dep.supervisor.status.remote())
        report = run_chaos(Target(dep.name, dep.gateway_addresses, LocalMoE.from_config(SMALL_MODEL, seed=plan.seed)), plan, progress=print)
        after = ray.get(dep.supervisor.status.remote(), timeout=60)
        print(report.table())
        return report, before, after
    finally:
        dep.shutdown()


def _lost_nothing(report: ChaosReport) -> None:
    assert report.sent > 0
    assert report.failed == {} and report.wrong == 0 and report.succeeded == report.sent, report.table()
    assert not [f for f in report.faults if f.error], report.table()


def test_groups_killed_every_few_seconds_with_two_copies(ray_local) -> None:
    plan = ChaosPlan(clients=8, duration_s=36.0, group_kill_every_s=4.0, router_kill_at_s=(), supervisor_kill_at_s=(), quiet_s=6.0, seed=1)
    report, _, after = _run(plan, replicas=2)
    _lost_nothing(report)
    kills = [f for f in report.faults if f.kind == "group"]
    assert len(kills) >= 7 and all(f.recovered_s is not None for f in kills), report.table()
    assert sum(1 for e in after["events"] if e["kind"] == "failover") >= 1
    assert report.degraded_tokens == 0


@pytest.mark.parametrize("kind, seed", [("group_stop", 5), ("group_hang", 6)])
def test_groups_stopped_or_hung_under_traffic_with_two_copies(ray_local, kind: str, seed: int) -> None:
    """A group alive but of no use holds no request: stopped (SIGSTOP: silent), routers give up what was in
    flight to it once it misses its pings; hung (its batches never return, its pings still answer), once
    a batch computed past compute_timeout_s it answers unhealthy and routers do the same. The other copy
    serves, the supervisor replaces it."""
    at = {"group_stop_at_s" if kind == "group_stop" else "group_hang_at_s": (3.0, 10.0)}
    plan = ChaosPlan(clients=8, duration_s=20.0, group_kill_every_s=0, router_kill_at_s=(), supervisor_kill_at_s=(),
                     quiet_s=6.0, seed=seed, **at)
    report, _, after = _run(plan, replicas=2)
    _lost_nothing(report)
    faults = [f for f in report.faults if f.kind == kind]
    assert len(faults) == 2 and all(f.recovered_s is not None for f in faults), report.table()
    replaced = {g for e in after["events"] if e["kind"] == "failover" for g in e["groups"]}
    assert {f.victim for f in faults} <= replaced, (faults, after["events"])
    assert report.degraded_tokens == 0


@pytest.mark.parametrize("failover", ["wait", "reroute"])
def test_groups_killed_with_one_copy(ray_local, failover: str) -> None:
    plan = ChaosPlan(clients=8, duration_s=18.0, group_kill_every_s=4.0, router_kill_at_s=(), supervisor_kill_at_s=(), quiet_s=5.0, seed=2)
    report, _, _ = _run(plan, replicas=1, failover=failover)
    _lost_nothing(report)
    if failover == "wait":
        assert report.degraded_tokens == 0
    else:
        # a dead group's experts are rerouted until its replacement is in the table
        assert report.degraded_tokens > 0 and report.degraded_requests > 0, report.table()


def test_router_killed_clients_with_two_gateways_lose_nothing(ray_local) -> None:
    plan = ChaosPlan(clients=8, duration_s=14.0, group_kill_every_s=0, router_kill_at_s=(3.0,), supervisor_kill_at_s=(), quiet_s=5.0, seed=3)
    report, _, after = _run(plan, routers=2)
    _lost_nothing(report)
    (fault,) = report.faults
    assert fault.kind == "router" and fault.recovered_s is not None
    assert any(e["kind"] == "router_restart" and e["router"] == fault.victim for e in after["events"])


def test_supervisor_killed_twice_in_a_row(ray_local) -> None:
    # the second kill lands after the first restart (restarts take a few seconds here)
    plan = ChaosPlan(clients=8, duration_s=24.0, group_kill_every_s=0, router_kill_at_s=(), supervisor_kill_at_s=(3.0, 11.0), quiet_s=6.0, seed=4)
    report, before, after = _run(plan, replicas=2)
    _lost_nothing(report)
    assert after["restarts"] == 2
    for key in ("groups", "placement", "routers"):
        assert after[key] == before[key], key
    assert after["version"] >= before["version"]
