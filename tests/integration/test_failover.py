"""Data-plane failover: a dead expert group's work moves to other replicas at once; with none left,
the failover policy decides (fail: ExpertUnavailableError; drop: tokens reported as degraded)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch

from cluster import deploy
from cluster import faults
from cluster.faults import hang_compute, release_compute
from expert_workers.errors import ExpertUnavailableError
from router_svc import LocalMoE

pytestmark = pytest.mark.integration
SPEC = dict(hidden_size=32, intermediate_size=48, num_experts=6, num_layers=2, moe_layers=[0, 1],
            routing=dict(policy="topk_softmax", top_k=2, normalize_topk=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _deploy(name: str, **deployment) -> tuple:
    dep = deploy({"model": {"random": SPEC, "seed": 5}, "gateway": {"port": 0},
                  "deployment": {"name": name, "expert_groups": 3, "transport": "object_store", **deployment}})
    return dep, LocalMoE.from_config(SPEC, seed=5)


def test_group_killed_under_traffic_with_replicas_loses_nothing(ray_local) -> None:
    dep, ref = _deploy("fo2", replicas=2, supervisor=False)
    try:
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(1 + i % 50, 32, generator=gen) for i in range(240)]

        def client(k: int) -> int:
            done = 0
            for i in range(k, len(xs), 8):
                out = dep.forward_output(xs[i], i % 2)
                assert out.degraded_tokens == ()
                assert _rel(torch.from_numpy(np.array(out.hidden_states)), ref.forward(xs[i], i % 2)) < 1e-6
                done += 1
            return done

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, k) for k in range(8)]
            time.sleep(0.5)
            ray.kill(dep.groups[1])
            assert sum(f.result() for f in futures) == len(xs)
        status = ray.get(dep.routers[0].status.remote())
        assert status["counters"].get("failovers", 0) >= 1 or 1 in status["dead"]
    finally:
        dep.shutdown()


def test_no_replica_left_fails_with_a_reason(ray_local) -> None:
    dep, ref = _deploy("fofail", replicas=1, failover="fail", supervisor=False)
    try:
        x = torch.randn(64, 32)
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
        ray.kill(dep.groups[0])
        with pytest.raises(ExpertUnavailableError, match="no live replica"):
            dep.forward(x, 0)
    finally:
        dep.shutdown()


def test_no_replica_left_drops_and_reports_degraded_tokens_exactly(ray_local) -> None:
    dep, ref = _deploy("fodrop", replicas=1, failover="drop", supervisor=False)
    try:
        layer = 1
        x = torch.randn(80, 32, generator=torch.Generator().manual_seed(2))
        dead_group = 2
        lost = {e for l, e in dep.table.placement[dead_group] if l == layer}
        ray.kill(dep.groups[dead_group])
        out = dep.forward_output(x, layer)
        got = torch.from_numpy(np.array(out.hidden_states))
        want, report = ref.forward(x, layer, return_routing=True)
        hit = {int(t) for t, e in zip(report.token_index.tolist(), report.expert.tolist()) if e in lost}
        assert set(out.degraded_tokens) == hit and hit, (sorted(hit), out.degraded_tokens)
        # tokens that lost nothing are exact; degraded ones are the LocalMoE sum over their live experts only
        keep = torch.tensor([t not in hit for t in range(80)])
        assert _rel(got[keep], want[keep]) < 1e-6
        live = LocalMoE.from_config(SPEC, seed=5)
        w = torch.zeros(80, 6)
        w[report.token_index, report.expert] = report.weight
        partial = torch.zeros_like(want)
        for e in range(6):
            if e in lost:
                continue
            rows = w[:, e] > 0
            if rows.any():
                ex = live.layer(layer).experts
                y = ex.forward(x[rows], [int(rows.sum()) if i == e else 0 for i in range(6)])
                partial[rows] += y * w[rows, e][:, None]
        assert _rel(got[~keep], partial[~keep]) < 1e-6
    finally:
        dep.shutdown()


def _split_by_lost(ref: LocalMoE, layer: int, lost: set[int], n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """n one-token requests that need none of the `lost` experts, and n that need one of them."""
    clear, hit = [], []
    gen = torch.Generator().manual_seed(seed)
    while len(clear) < n or len(hit) < n:
        x = torch.randn(1, 32, generator=gen)
        _, report = ref.forward(x, layer, return_routing=True)
        (hit if set(report.expert.tolist()) & lost else clear).append(x)
    return clear[:n], hit[:n]


def _compute_fails(group) -> bool:
    """Runs in an ExpertGroup (`__ray_call__`): every batch raises in its expert FFN (no MoEServeError)."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected compute failure")

    for ffn in faults._ffns(group):
        ffn.forward = broken
    return True


@pytest.mark.parametrize("failover,others", [("fail", "served"), ("wait", "served"), ("wait", "failing")])
def test_a_request_with_every_expert_live_is_not_held_by_its_batch(ray_local, failover: str, others: str) -> None:
    """Requests batched with one that needs an expert with no live replica are served as if alone:
    under 'fail' only that one fails; under 'wait' it waits apart, and the others (and the layer's
    later batches) do not wait with it; nor does it end with their error when their batch fails."""
    dep, ref = _deploy(f"foiso{failover}{others}", replicas=1, failover=failover, supervisor=False)
    try:
        layer, dead_group = 0, 2
        lost = {e for l, e in dep.table.placement[dead_group] if l == layer}
        clear, hit = _split_by_lost(ref, layer, lost, 24, seed=3)
        ray.kill(dep.groups[dead_group])
        if others == "failing":
            ray.get([g.__ray_call__.remote(_compute_fails) for g in dep.groups[:dead_group]], timeout=30)
            refs = [dep.submit(x, layer) for pair in zip(hit, clear) for x in pair]
            for r in refs[1::2]:
                with pytest.raises(RuntimeError, match="injected compute failure"):
                    dep.result(r, clear[0], timeout=120)
            ready, _ = ray.wait(refs[0::2], num_returns=len(hit), timeout=0)
            assert not ready  # still waiting for a live replica, not failed with their batch
            return
        if failover == "fail":
            with pytest.raises(ExpertUnavailableError):  # the router learns of the death on its own
                dep.forward(hit[0], layer)
        # interleaved and concurrent: they share batches (requests queue while one is in flight)
        refs = [dep.submit(x, layer) for pair in zip(hit, clear) for x in pair]
        hit_refs, clear_refs = refs[0::2], refs[1::2]
        for x, r in zip(clear, clear_refs):
            out = ray.get(r, timeout=120)
            assert _rel(torch.from_numpy(np.array(out.hidden_states)), ref.forward(x, layer)) < 1e-6
        batched = ray.get(dep.routers[0].status.remote())["counters"]
        assert batched["batches"] < batched["requests"]  # some were batched together
        if failover == "wait":
            # every clear request was answered while the others wait (failover_wait_s, 60 s, for a
            # group no supervisor brings back; they end with the deployment)
            ready, _ = ray.wait(hit_refs, num_returns=len(hit_refs), timeout=0)
            assert not ready
            return
        for r in hit_refs:
            with pytest.raises(ExpertUnavailableError, match="no live replica") as e:
                dep.result(r, hit[0], timeout=120)
            assert e.value.expert in lost
    finally:
        dep.shutdown()


def test_a_death_met_by_a_batch_of_a_replaced_table_marks_no_group_of_the_new_one(ray_local) -> None:
    """A batch planned with table v meets its group's death after the router adopted v+1, which numbers
    the groups otherwise: the group number the batch reports is v's, so nothing of v+1 is marked dead;
    the batch is planned again on v+1 and answered exactly from the other copies."""
    from router_svc.table import RoutingTable

    dep, ref = _deploy("fostale", replicas=2, failover="fail", supervisor=False)
    try:
        layer, x = 0, torch.randn(96, 32, generator=torch.Generator().manual_seed(4))
        assert _rel(dep.forward(x, layer), ref.forward(x, layer)) < 1e-6
        ray.get(dep.groups[0].__ray_call__.remote(hang_compute), timeout=30)
        held = dep.submit(x, layer)
        ready, _ = ray.wait([held], timeout=1.0)
        assert not ready  # in flight, held in group 0's compute
        old, order = dep.table, [2, 1, 0]
        new = RoutingTable.build(old.version + 1, old.num_experts, [old.groups[i] for i in order], [old.placement[i] for i in order])
        assert ray.get(dep.routers[0].update_table.remote(new, [dep.groups[i] for i in order])) == new.version
        ray.kill(dep.groups[0])  # v's group 0, v+1's group 2
        assert _rel(dep.result(held, x, timeout=120), ref.forward(x, layer)) < 1e-6
        assert ray.get(dep.routers[0].status.remote())["dead"] in ([], [2])
    finally:
        dep.shutdown()


@pytest.mark.parametrize("replicas", [1, 2])
def test_supervisor_replaces_a_killed_group_and_wait_loses_nothing(ray_local, replicas: int) -> None:
    """failover=wait with the supervisor: requests hold until the group is back; none fails, all exact."""
    dep, ref = _deploy(f"fosup{replicas}", replicas=replicas, failover="wait")
    try:
        gen = torch.Generator().manual_seed(3)
        xs = [torch.randn(1 + i % 40, 32, generator=gen) for i in range(160)]

        def client(k: int) -> int:
            for i in range(k, len(xs), 8):
                got = dep.forward(xs[i], i % 2)
                assert _rel(got, ref.forward(xs[i], i % 2)) < 1e-6
            return len(range(k, len(xs), 8))

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, k) for k in range(8)]
            time.sleep(0.5)
            victim_name = ray.get(dep.supervisor.status.remote())["groups"][0]
            ray.kill(dep.current_groups()[0])
            assert sum(f.result() for f in futures) == len(xs)
        deadline = time.time() + 60
        while True:
            st = ray.get(dep.supervisor.status.remote())
            if any(e["kind"] == "failover" for e in st["events"]):
                break
            assert time.time() < deadline, "the supervisor never replaced the group"
            time.sleep(0.2)
        event = [e for e in st["events"] if e["kind"] == "failover"][-1]
        assert event["kind"] == "failover" and event["groups"] == [victim_name] and event["recovery_s"] > 0
        assert st["groups"][0].endswith("-r1") and st["version"] >= 2
        assert ray.get(dep.routers[0].status.remote())["routing_table_version"] == st["version"]
        x = torch.randn(33, 32)
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
    finally:
        dep.shutdown()


def _mix(ref: LocalMoE, layer: int, x: torch.Tensor, tokens: list[int], experts: list[int], weights: list[float]) -> torch.Tensor:
    """sum over assignments (t, e, w) of w * expert_e(x_t), one expert at a time (the reference experts)."""
    out = torch.zeros_like(x)
    ex = ref.layer(layer).experts
    num_e = SPEC["num_experts"]
    for e in range(num_e):
        rows = [(t, w) for t, ee, w in zip(tokens, experts, weights) if ee == e]
        if not rows:
            continue
        idx = torch.tensor([t for t, _ in rows])
        y = ex.forward(x[idx], [len(rows) if i == e else 0 for i in range(num_e)])
        out.index_add_(0, idx, y * torch.tensor([w for _, w in rows])[:, None])
    return out


def test_no_replica_left_reroutes_to_the_next_best_live_expert(ray_local) -> None:
    """failover=reroute: an assignment to a dead expert moves, with its weight, to the token's best
    live expert by gate logit that it does not use yet; those tokens are reported as degraded."""
    dep, ref = _deploy("foreroute", replicas=1, failover="reroute", supervisor=False)
    try:
        layer = 0
        x = torch.randn(90, 32, generator=torch.Generator().manual_seed(6))
        dead_group = 1
        lost = {e for l, e in dep.table.placement[dead_group] if l == layer}
        ray.kill(dep.groups[dead_group])
        out = dep.forward_output(x, layer)
        got = torch.from_numpy(np.array(out.hidden_states))
        _, report = ref.forward(x, layer, return_routing=True)
        logits = torch.nn.functional.linear(x.float(), ref.layer(layer).router.weight.float())
        tokens, experts, weights = report.token_index.tolist(), report.expert.tolist(), report.weight.tolist()
        used: dict[int, set[int]] = {}
        for t, e in zip(tokens, experts):
            used.setdefault(t, set()).add(e)
        moved = []
        for i, (t, e) in enumerate(zip(tokens, experts)):
            if e in lost:
                ranked = [c for c in torch.argsort(logits[t], descending=True).tolist() if c not in lost and c not in used[t]]
                experts[i] = ranked[0]
                used[t].add(ranked[0])
                moved.append(t)
        assert moved, "no token lost an expert: the test would not notice a wrong reroute"
        assert set(out.degraded_tokens) == set(moved)
        assert _rel(got, _mix(ref, layer, x, tokens, experts, weights)) < 1e-6
        # tokens that lost nothing are exactly LocalMoE's
        keep = torch.tensor([t not in set(moved) for t in range(90)])
        assert _rel(got[keep], ref.forward(x, layer)[keep]) < 1e-6
    finally:
        dep.shutdown()


# -- a group that stops answering (stopped process, cut-off host): neither answers nor fails -------------

# Liveness bounds only: the router notices a silent group within a ping period plus the ping timeout
# (about 3 s); these bounds turn a hang into a failure, nothing is timed against them.
NOTICED_S = 30.0


def _pid(group) -> int:
    return int(ray.get(group.info.remote(), timeout=30)["pid"])


def _until(predicate, what: str, bound_s: float = NOTICED_S) -> None:
    deadline = time.monotonic() + bound_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _until_replaced(dep, name: str, what: str) -> None:
    _until(lambda: name not in ray.get(dep.supervisor.status.remote(), timeout=30)["groups"],
           f"the supervisor never replaced {what}", bound_s=120)


def _status(dep) -> dict:
    return ray.get(dep.routers[0].status.remote(), timeout=30)


def _dead(dep) -> list[int]:
    return _status(dep)["dead"]


def _traffic_stopping(dep, ref, xs: list[torch.Tensor], pid: int, after: int, clients: int = 8) -> int:
    """`clients` threads send every x once (layer i % 2), each answer checked against LocalMoE; the
    process `pid` is stopped (SIGSTOP) once `after` answers are in. Returns the answers."""
    return _traffic_then(dep, ref, xs, lambda: os.kill(pid, signal.SIGSTOP), after, clients)


def _traffic_then(dep, ref, xs: list[torch.Tensor], fault, after: int, clients: int = 8) -> int:
    """As `_traffic_stopping`, with `fault()` run once `after` answers are in."""
    answered: list[int] = []
    lock = threading.Lock()

    def client(k: int) -> int:
        for i in range(k, len(xs), clients):
            got = dep.result(dep.submit(xs[i], i % 2), xs[i], timeout=120)
            assert _rel(got, ref.forward(xs[i], i % 2)) < 1e-6
            with lock:
                answered.append(i)
        return len(range(k, len(xs), clients))

    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        _until(lambda: len(answered) >= after or any(f.done() for f in futures), "no traffic flowed")
        for f in futures:
            if f.done():
                f.result()  # a client that failed before the fault says why
        fault()
        return sum(f.result() for f in futures)


@pytest.mark.parametrize("transport", ["grpc", "object_store", "rdt"])
def test_group_that_stops_answering_under_traffic_loses_nothing(ray_local, transport: str) -> None:
    """SIGSTOP a group with batches in flight to it: they are given up once it misses its pings and
    planned again on the other replicas; every request answers, exact. Continued, it serves again.
    rdt: the collective group breaks with transfers in flight; no other member may be lost with it (Ray
    kills both ends of a failed collective transfer unless told otherwise), and once the member answers
    again the group is rebuilt with it and RDT serves again."""
    dep, ref = _deploy(f"fostop-{transport}".replace("_", ""), replicas=2, supervisor=False, transport=transport)
    victim = 1
    pid = _pid(dep.groups[victim])
    try:
        gen = torch.Generator().manual_seed(6)
        xs = [torch.randn(1 + i % 30, 32, generator=gen) for i in range(200)]
        assert _traffic_stopping(dep, ref, xs, pid, after=20) == len(xs)
        status = _status(dep)
        assert victim in status["dead"], status["dead"]
        assert status["counters"].get("failovers", 0) >= 1, status["counters"]
        assert all(ray.get([g.ping.remote() for i, g in enumerate(dep.groups) if i != victim], timeout=30))
    finally:
        os.kill(pid, signal.SIGCONT)  # harmless when it was never stopped
    try:
        _until(lambda: _dead(dep) == [], "the continued group never read as alive again")
        if transport == "rdt":
            _until(lambda: _status(dep)["rdt_ready"],
                   "the collective group was never rebuilt", bound_s=60)
        before = ray.get(dep.groups[victim].stats.remote(), timeout=30)["batches"]
        served = _status(dep)["counters"]["by_transport"].get(transport, 0)
        for i in range(40):
            x = torch.randn(1 + i, 32, generator=gen)
            assert _rel(dep.result(dep.submit(x, i % 2), x, timeout=NOTICED_S), ref.forward(x, i % 2)) < 1e-6
        assert ray.get(dep.groups[victim].stats.remote(), timeout=30)["batches"] > before
        status = _status(dep)
        assert status["counters"]["by_transport"].get(transport, 0) >= served + 40, status["counters"]
    finally:
        dep.shutdown()


def test_rdt_batch_computing_long_holds_no_health_ping(ray_local) -> None:
    """RDT: while one group computes a batch for seconds (well inside compute_timeout_s), every group
    still answers the router's pings and nothing is given up. Ray sends an actor one caller's calls in
    order, each once its arguments are ready: the other layer's batch, its rows waiting behind the held
    batch's gather, would hold every later call from the router to each group it is sent to, pings
    included, were its forwards submitted before its rows were ready. Both layers' batches answer
    exactly over RDT."""
    dep, ref = _deploy("fordtslow", replicas=1, transport="rdt", supervisor=False)
    gen = torch.Generator().manual_seed(13)
    xs = [torch.randn(64, 32, generator=gen) for _ in range(2)]
    release = lambda: ray.get(dep.groups[0].__ray_call__.options(concurrency_group="control").remote(release_compute), timeout=30)  # noqa: E731
    held = False
    try:
        for layer in (0, 1):
            assert _rel(dep.forward(xs[layer], layer), ref.forward(xs[layer], layer)) < 1e-6
        served = _status(dep)["counters"]["by_transport"].get("rdt", 0)
        ray.get(dep.groups[0].__ray_call__.remote(hang_compute), timeout=30)
        held = True
        pending = [dep.submit(xs[layer], layer) for layer in (0, 1)]  # 64 tokens: every group has a share
        seen = set()
        deadline = time.monotonic() + 6.0  # past two rounds of the 2 s ping timeout
        while time.monotonic() < deadline:
            seen.add(tuple(_dead(dep)))
            time.sleep(0.1)
        assert ray.wait(pending, num_returns=2, timeout=0)[0] == [], "answered while group 0 was held"
        assert seen == {()}, f"groups taken for silent while one computed: {sorted(seen)}"
        release()
        held = False
        for layer, p in enumerate(pending):
            assert _rel(dep.result(p, xs[layer], timeout=NOTICED_S), ref.forward(xs[layer], layer)) < 1e-6
        status = _status(dep)
        assert status["counters"].get("failovers", 0) == 0, status["counters"]
        assert status["counters"]["by_transport"].get("rdt", 0) == served + 2, status["counters"]
    finally:
        if held:
            release()
        dep.shutdown()


def test_collective_member_that_stops_answering_is_replaced_and_nothing_is_lost(ray_local) -> None:
    """RDT: a silent member wedges the collective group for every member (their transfers queue behind
    it). The router gives the batch and the group up when the member misses its pings and serves on
    another transport; the supervisor replaces whoever does not answer. Every request answers, exact."""
    dep, ref = _deploy("fostoprdt", replicas=2, transport="rdt")
    victim_name = ray.get(dep.supervisor.status.remote(), timeout=30)["groups"][1]
    pid = _pid(dep.current_groups()[1])
    try:
        gen = torch.Generator().manual_seed(9)
        xs = [torch.randn(1 + i % 30, 32, generator=gen) for i in range(120)]
        assert _traffic_stopping(dep, ref, xs, pid, after=10) == len(xs)
        _until_replaced(dep, victim_name, "the silent member")
        x = torch.randn(33, 32, generator=gen)
        assert _rel(dep.result(dep.submit(x, 0), x, timeout=NOTICED_S), ref.forward(x, 0)) < 1e-6
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # replaced: the supervisor killed it
            pass
        dep.shutdown()


def test_collective_group_is_never_rebuilt_with_a_silent_member(ray_local) -> None:
    """RDT, no supervisor: once a member is silent, rebuild attempts leave it out of the collective
    group: members join on their main threads, in front of every batch, and one that never joins holds
    them there for the collective timeout (torch's default: 30 minutes). So once the silent member is
    killed and rebuilds begin, the others still answer at once."""
    dep, ref = _deploy("forebuild", replicas=2, transport="rdt", supervisor=False)
    victim = 1
    pid = _pid(dep.groups[victim])
    gen = torch.Generator().manual_seed(10)
    try:
        x = torch.randn(12, 32, generator=gen)
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
        os.kill(pid, signal.SIGSTOP)
        _until(lambda: _dead(dep) == [victim], "the silent member was never noticed")
        for i in range(6):  # each dispatch past the rebuild delay starts a rebuild attempt
            x = torch.randn(5 + i, 32, generator=gen)
            assert _rel(dep.result(dep.submit(x, i % 2), x, timeout=NOTICED_S), ref.forward(x, i % 2)) < 1e-6
            time.sleep(0.5)
        ray.kill(dep.groups[victim])  # as a supervisor would; the teardown it held up ends, rebuilds begin
        for i in range(16):
            x = torch.randn(7 + i, 32, generator=gen)
            assert _rel(dep.result(dep.submit(x, i % 2), x, timeout=10), ref.forward(x, i % 2)) < 1e-6
            time.sleep(0.5)
        assert not _status(dep)["rdt_ready"]
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        dep.shutdown()


def test_ping_answers_of_a_replaced_group_list_are_not_applied_to_the_new_one(ray_local) -> None:
    """A ping round in flight when a new routing table renumbers the groups answers for the old list.
    Group 1 is stopped; while a round waits on it, a table that swaps groups 1 and 2 is adopted. The
    round's "1 is silent" is of the old numbering: taken for the new one it would mark the live group
    (now 1) dead and send batches to the stopped one (now 2). The router drops it; the next round
    finds group 2 silent."""
    from router_svc.table import RoutingTable

    dep, ref = _deploy("fostaleping", replicas=2, supervisor=False)
    pid = _pid(dep.groups[1])
    router = dep.routers[0]
    try:
        os.kill(pid, signal.SIGSTOP)
        _until(lambda: _dead(dep) == [1], "the stopped group was never noticed")
        # NOTE: rounds last the 2 s ping timeout and repeat 1 s after; one has begun ~1 s after the
        # last was read, and the swap lands inside it (were it outside, the test would pass vacuously).
        time.sleep(1.3)
        old = dep.table
        order = [0, 2, 1]
        swapped = RoutingTable.build(old.version + 1, old.num_experts, [old.groups[i] for i in order],
                                     [old.placement[i] for i in order])
        handles = [dep.groups[i] for i in order]
        assert ray.get(router.update_table.remote(swapped, handles), timeout=30) == swapped.version
        seen = set()
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            seen.add(tuple(_dead(dep)))
            time.sleep(0.05)
        assert (1,) not in seen, f"the old list's answer marked the live group dead: {sorted(seen)}"
        assert _dead(dep) == [2]
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(11))
        assert _rel(dep.result(dep.submit(x, 0), x, timeout=NOTICED_S), ref.forward(x, 0)) < 1e-6
    finally:
        os.kill(pid, signal.SIGCONT)
        dep.shutdown()


def test_group_that_stops_answering_with_no_replica_fails_with_a_reason(ray_local) -> None:
    """failover=fail: a request whose expert is only on a silent group fails (not waits forever)."""
    dep, ref = _deploy("fostopfail", replicas=1, failover="fail", supervisor=False)
    pid = _pid(dep.groups[0])
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(7))
    try:
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(ExpertUnavailableError, match="no live replica"):
            dep.result(dep.submit(x, 0), x, timeout=120)
    finally:
        os.kill(pid, signal.SIGCONT)
        dep.shutdown()


def test_request_waiting_on_a_silent_group_goes_on_when_it_answers_again(ray_local) -> None:
    """failover=wait, no supervisor, no other replica: requests wait while the group is silent (one sent
    before it was noticed, given up in flight; one sent after, held at planning) and are answered,
    exact, as soon as the group answers pings again (not when failover_wait_s runs out)."""
    dep, ref = _deploy("fostopwait", replicas=1, failover="wait", supervisor=False)
    pid = _pid(dep.groups[0])
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(8))
    stopped = False
    try:
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        in_flight = dep.submit(x, 0)
        _until(lambda: _dead(dep) == [0], "the silent group was never noticed")
        held = dep.submit(x, 0)
        ready, _ = ray.wait([in_flight, held], num_returns=2, timeout=1.0)
        assert not ready, "answered while its only group was stopped"
        assert _status(dep)["counters"].get("failovers", 0) >= 1
        os.kill(pid, signal.SIGCONT)
        stopped = False
        # NOTE: well inside failover_wait_s (60 s): the answers come from the group's return, not the wait's end.
        want = ref.forward(x, 0)
        assert _rel(dep.result(in_flight, x, timeout=NOTICED_S), want) < 1e-6
        assert _rel(dep.result(held, x, timeout=NOTICED_S), want) < 1e-6
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        dep.shutdown()


def test_requests_held_from_many_batches_leave_together_when_a_host_returns(ray_local) -> None:
    """failover=wait, no supervisor, no other replica: requests sent one after another while their
    experts' only group is silent are each held from a batch of its own. When the group answers again
    they go back to the batcher together and leave in one or two batches (not one per batch held,
    each reading the experts' weights again). Every answer exact."""
    dep, ref = _deploy("forelease", replicas=1, failover="wait", supervisor=False)
    pid = _pid(dep.groups[0])
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(16, 32, generator=gen) for _ in range(10)]
    stopped = False
    try:
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        _until(lambda: _dead(dep) == [0], "the silent group was never noticed")
        refs = []
        for x in xs:
            refs.append(dep.submit(x, 0))
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.3)  # planned and held before the next is sent
            assert not ready, "answered while its experts' only group was stopped"
        batches = _status(dep)["counters"]["batches"]
        os.kill(pid, signal.SIGCONT)
        stopped = False
        for r, x in zip(refs, xs):
            assert _rel(dep.result(r, x, timeout=NOTICED_S), ref.forward(x, 0)) < 1e-6
        assert _status(dep)["counters"]["batches"] - batches <= 2
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        dep.shutdown()


def test_group_whose_compute_hangs_is_planned_around_and_nothing_is_lost(ray_local) -> None:
    """A group whose batch never returns while its process answers (a hung kernel): once that batch has
    computed longer than compute_timeout_s its pings answer False, the router gives up what it sent
    there and plans it again on the other copies. Every request answers, exact; released, the group
    reads as alive again and serves."""
    dep, ref = _deploy("fohang", replicas=2, supervisor=False, transport="grpc", compute_timeout_s=1.0)
    victim = dep.groups[1]
    try:
        gen = torch.Generator().manual_seed(10)
        xs = [torch.randn(1 + i % 30, 32, generator=gen) for i in range(200)]
        hang = lambda: ray.get(victim.__ray_call__.remote(hang_compute), timeout=30)  # noqa: E731
        assert _traffic_then(dep, ref, xs, hang, after=20) == len(xs)
        status = _status(dep)
        assert 1 in status["dead"], status["dead"]
        assert status["counters"].get("failovers", 0) >= 1, status["counters"]
        assert ray.get(victim.ping.remote(), timeout=30) is False
        assert dep.health() is False
        info = ray.get(victim.info.remote(), timeout=30)
        assert info["healthy"] is False and info["computing_s"] > 1.0
    finally:
        ray.get(victim.__ray_call__.options(concurrency_group="control").remote(release_compute), timeout=30)
    try:
        _until(lambda: _dead(dep) == [], "the released group never read as alive again")
        before = ray.get(victim.stats.remote(), timeout=30)["batches"]
        for i in range(40):
            x = torch.randn(1 + i, 32, generator=gen)
            assert _rel(dep.forward(x, i % 2), ref.forward(x, i % 2)) < 1e-6
        assert ray.get(victim.stats.remote(), timeout=30)["batches"] > before
        assert dep.health() is True
    finally:
        dep.shutdown()


def test_group_whose_compute_hangs_is_replaced_and_wait_loses_nothing(ray_local) -> None:
    """The default policy with one copy per expert: the hung group reads unhealthy, the supervisor replaces
    it, batches waiting on it are planned again on the replacement. Every request answers, exact."""
    dep, ref = _deploy("fohangsup", replicas=1, failover="wait", compute_timeout_s=1.0)
    victim_name = ray.get(dep.supervisor.status.remote(), timeout=30)["groups"][1]
    victim = dep.current_groups()[1]
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(1 + i % 30, 32, generator=gen) for i in range(120)]
    try:
        hang = lambda: ray.get(victim.__ray_call__.remote(hang_compute), timeout=30)  # noqa: E731
        assert _traffic_then(dep, ref, xs, hang, after=10) == len(xs)
        _until_replaced(dep, victim_name, "the hung group")
        x = torch.randn(33, 32, generator=gen)
        assert _rel(dep.forward(x, 1), ref.forward(x, 1)) < 1e-6
    finally:
        dep.shutdown()


def test_batch_that_hangs_every_group_it_reaches_fails_after_two(ray_local) -> None:
    """A batch whose compute hangs on one group, then on the copy it was planned again on, fails
    (UNAVAILABLE, the reason names compute_timeout_s) instead of going on to hang group after group
    or waiting out failover_wait_s. Both groups hang every batch; the second is stopped while the
    batch is first planned, so it reaches them one after the other."""
    dep, ref = _deploy("fohang2", expert_groups=2, replicas=2, supervisor=False, transport="grpc", compute_timeout_s=1.0)
    g0, g1 = dep.groups
    pid1 = _pid(g1)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(12))
    stopped = False
    try:
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
        for g in (g0, g1):
            ray.get(g.__ray_call__.remote(hang_compute), timeout=30)
        os.kill(pid1, signal.SIGSTOP)
        stopped = True
        _until(lambda: _dead(dep) == [1], "the stopped group was never noticed")
        t0 = time.monotonic()
        pending = dep.submit(x, 0)  # planned on group 0 alone
        os.kill(pid1, signal.SIGCONT)
        stopped = False
        with pytest.raises(ExpertUnavailableError, match="compute_timeout_s on 2 expert groups"):
            dep.result(pending, x, timeout=NOTICED_S)
        assert time.monotonic() - t0 < 50.0  # not failover_wait_s (60 s) running out
    finally:
        if stopped:
            os.kill(pid1, signal.SIGCONT)
        for g in (g0, g1):
            ray.get(g.__ray_call__.options(concurrency_group="control").remote(release_compute), timeout=30)
    try:
        _until(lambda: _dead(dep) == [], "the released groups never read as alive again")
        assert _rel(dep.forward(x, 0), ref.forward(x, 0)) < 1e-6
    finally:
        dep.shutdown()
