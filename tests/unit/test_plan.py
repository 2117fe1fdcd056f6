"""plan_by_group (router_svc.dispatch) over a RoutingTable, against brute force and plan_by_expert.

Legend: T tokens, N assignments, E experts; expert index E in expert_N is the shared slot (id -1).
Each sorted row's source assignment is recovered by planning a second time with the
weights replaced by the assignment indices (the sort does not depend on the weights).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement import all_slots, spread
from expert_workers.group import SHARED
from expert_workers.spec import MoESpec, SharedExpertSpec
from router_svc.dispatch import combine, plan_by_expert, plan_by_group
from router_svc.gate.policies import Assignments
from router_svc.table import GroupRef, RoutingTable, layer_orders
from router_svc.transports.base import Part

pytestmark = pytest.mark.unit

E, D, G = 8, 5, 3
SPEC = MoESpec(
    hidden_size=16, intermediate_size=8, num_experts=E, num_layers=3, moe_layers=(0, 2),
    shared_experts=SharedExpertSpec(count=1, intermediate_size=8),
)
PLACEMENT = spread(all_slots(SPEC, shared_as_slot=True), G)
GROUPS = [GroupRef(f"g{i}", f"127.0.0.1:{5000 + i}") for i in range(G)]
TABLE = RoutingTable.build(1, E, GROUPS, PLACEMENT)


def expert_id(index: int) -> int:
    return SHARED if index == E else index


def plan(table: RoutingTable, layer: int, token_N: torch.Tensor, expert_N: torch.Tensor, weight_N: torch.Tensor):
    group_of, local_of = table.lookup(layer)
    return plan_by_group(token_N, expert_N, weight_N, group_of=group_of, local_of=local_of,
                         orders=layer_orders(table, layer), part_type=Part)


def sorted_source(table: RoutingTable, layer: int, token_N: torch.Tensor, expert_N: torch.Tensor) -> list[int]:
    """The assignment index of each sorted row (weights replaced by indices)."""
    ids = torch.arange(expert_N.shape[0], dtype=torch.float64)
    return [int(v) for v in plan(table, layer, token_N, expert_N, ids).weight_N.tolist()]


def host_of(table: RoutingTable, layer: int) -> dict[int, int]:
    """Brute force: expert id -> first group (by index) hosting it in `layer`."""
    out: dict[int, int] = {}
    for g, slots in enumerate(table.placement):
        for l, e in slots:
            if l == layer:
                out.setdefault(e, g)
    return out


def f(token_N: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
    """A per-row value depending on (token, expert index): (N,) x (N,) -> (N, D) float64."""
    d = torch.arange(D, dtype=torch.float64)
    return torch.sin(token_N.double()[:, None] * 0.37 + (expert_N.double()[:, None] + 2.0) * 1.31 + d * 0.11)


def random_assignments(T: int, N: int, seed: int, num_experts: int = E + 1):
    gen = torch.Generator().manual_seed(seed)
    token_N = torch.randint(0, max(T, 1), (N,), generator=gen)
    expert_N = torch.randint(0, num_experts, (N,), generator=gen)
    weight_N = torch.rand((N,), generator=gen, dtype=torch.float64) + 0.1
    return token_N, expert_N, weight_N


def check_plan(table: RoutingTable, layer: int, token_N: torch.Tensor, expert_N: torch.Tensor, weight_N: torch.Tensor) -> None:
    N = int(expert_N.shape[0])
    p = plan(table, layer, token_N, expert_N, weight_N)
    src = sorted_source(table, layer, token_N, expert_N)
    assert sorted(src) == list(range(N))  # a permutation
    assert p.token_N.tolist() == [int(token_N[i]) for i in src]
    assert p.weight_N.tolist() == [float(weight_N[i]) for i in src]

    hosts = host_of(table, layer)
    orders = [[e for e in range(E) if (layer, e) in set(s)] + ([SHARED] if (layer, SHARED) in set(s) else [])
              for s in table.placement]
    # brute force: per group, counts of each of its experts, in the group's slot order
    want = Counter((hosts[expert_id(int(e))], expert_id(int(e))) for e in expert_N)
    expected_parts = []
    for g in range(len(table.placement)):
        experts = tuple(e for e in orders[g] if want[(g, e)] and hosts[e] == g)
        if experts:
            expected_parts.append((g, experts, tuple(want[(g, e)] for e in experts)))
    assert [(pt.group, pt.experts, pt.counts) for pt in p.parts] == expected_parts

    # contiguous, in group order, covering every row
    start = 0
    for pt in p.parts:
        assert pt.start == start and pt.end == start + sum(pt.counts)
        start = pt.end
        # rows of the part: the experts in slot order, each with its count, each assignment in input order
        row_experts = [expert_id(int(expert_N[i])) for i in src[pt.start:pt.end]]
        assert row_experts == [e for e, c in zip(pt.experts, pt.counts) for _ in range(c)]
        assert all(hosts[e] == pt.group for e in row_experts)
        for e in pt.experts:
            idx = [i for i in src[pt.start:pt.end] if expert_id(int(expert_N[i])) == e]
            assert idx == sorted(idx)  # stable
    assert start == N
    assert [pt.group for pt in p.parts] == sorted(pt.group for pt in p.parts)


def combine_by_group(table: RoutingTable, layer: int, T: int, token_N, expert_N, weight_N) -> torch.Tensor:
    p = plan(table, layer, token_N, expert_N, weight_N)
    src = sorted_source(table, layer, token_N, expert_N)
    y = f(p.token_N, expert_N[src])
    return torch.zeros((T, D), dtype=torch.float64).index_add_(0, p.token_N, y * p.weight_N[:, None])


def combine_by_expert(T: int, token_N, expert_N, weight_N) -> torch.Tensor:
    a = Assignments(token_N=token_N, expert_N=expert_N, weight_N=weight_N,
                    probs_TE=torch.zeros((T, E + 1)), logits_TE=torch.zeros((T, E + 1)))
    p = plan_by_expert(a, E + 1)
    assert p.counts_E.tolist() == [int((expert_N == e).sum()) for e in range(E + 1)]
    return combine(f(p.token_N, p.expert_N), p, T)


def brute_total(T: int, token_N, expert_N, weight_N) -> torch.Tensor:
    out = torch.zeros((T, D), dtype=torch.float64)
    d = torch.arange(D, dtype=torch.float64)
    for t, e, w in zip(token_N.tolist(), expert_N.tolist(), weight_N.tolist()):
        out[t] += w * torch.sin(t * 0.37 + (e + 2.0) * 1.31 + d * 0.11)
    return out


# -- the table ----------------------------------------------------------------------


@pytest.mark.parametrize("layer", SPEC.moe_layers)
def test_lookup_agrees_with_layer_orders(layer: int) -> None:
    group_of, local_of = TABLE.lookup(layer)
    orders = layer_orders(TABLE, layer)
    hosts = host_of(TABLE, layer)
    for idx in range(E + 1):
        e = expert_id(idx)
        g = int(group_of[idx])
        assert g == hosts[e]
        assert orders[g][int(local_of[idx])] == e
    for g, order in enumerate(orders):
        routed = sorted(e for l, e in PLACEMENT[g] if l == layer and e != SHARED)
        assert order[: len(routed)] == routed
        assert order[len(routed):] == ([SHARED] if (layer, SHARED) in PLACEMENT[g] else [])


def test_placement_has_three_groups_that_each_host_both_layers() -> None:
    assert len(PLACEMENT) == G
    for layer in SPEC.moe_layers:
        assert all(layer_orders(TABLE, layer)[g] for g in range(G))


# -- plan_by_group --------------------------------------------------------------------


@pytest.mark.parametrize("layer", SPEC.moe_layers)
@pytest.mark.parametrize("seed", range(4))
def test_plan_rows_contiguous_and_in_slot_order(layer: int, seed: int) -> None:
    token_N, expert_N, weight_N = random_assignments(T=9, N=30, seed=seed)
    check_plan(TABLE, layer, token_N, expert_N, weight_N)


def test_plan_with_a_hand_checked_example() -> None:
    # layer 0: spread deals slot i to group i % 3 over [(0,0..7), (2,0..7), (0,-1), (2,-1)]
    # -> g0: experts 0,3,6 + shared(0,-1) at position 16 -> 16 % 3 = 1 -> g1 hosts (0,-1)
    assert layer_orders(TABLE, 0) == [[0, 3, 6], [1, 4, 7, SHARED], [2, 5]]
    token_N = torch.tensor([0, 0, 1, 1, 2, 2])
    expert_N = torch.tensor([7, 2, E, 1, 5, 7])
    weight_N = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64)
    p = plan(TABLE, 0, token_N, expert_N, weight_N)
    assert p.parts == (
        Part(group=1, start=0, end=4, experts=(1, 7, SHARED), counts=(1, 2, 1)),
        Part(group=2, start=4, end=6, experts=(2, 5), counts=(1, 1)),
    )
    assert p.token_N.tolist() == [1, 0, 2, 1, 0, 2]
    assert p.weight_N.tolist() == [0.4, 0.1, 0.6, 0.3, 0.2, 0.5]


def test_plan_of_no_assignments() -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    p = plan(TABLE, 0, empty, empty, torch.zeros(0))
    assert p.parts == () and p.token_N.numel() == 0 and p.weight_N.numel() == 0


@pytest.mark.parametrize("layer", SPEC.moe_layers)
@pytest.mark.parametrize("seed", range(3))
def test_group_combine_equals_expert_combine(layer: int, seed: int) -> None:
    T = 7
    token_N, expert_N, weight_N = random_assignments(T=T, N=25, seed=100 + seed)
    by_group = combine_by_group(TABLE, layer, T, token_N, expert_N, weight_N)
    by_expert = combine_by_expert(T, token_N, expert_N, weight_N)
    brute = brute_total(T, token_N, expert_N, weight_N)
    torch.testing.assert_close(by_group, brute)
    torch.testing.assert_close(by_expert, brute)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 10),
    data=st.data(),
    layer=st.sampled_from(SPEC.moe_layers),
)
def test_plan_and_combine_properties(T: int, data: st.DataObject, layer: int) -> None:
    N = data.draw(st.integers(0, 24), label="N")
    tokens = data.draw(st.lists(st.integers(0, T - 1), min_size=N, max_size=N), label="tokens")
    experts = data.draw(st.lists(st.integers(0, E), min_size=N, max_size=N), label="experts")
    weights = data.draw(st.lists(st.floats(0.01, 2.0), min_size=N, max_size=N), label="weights")
    token_N = torch.tensor(tokens, dtype=torch.int64)
    expert_N = torch.tensor(experts, dtype=torch.int64)
    weight_N = torch.tensor(weights, dtype=torch.float64)
    check_plan(TABLE, layer, token_N, expert_N, weight_N)
    torch.testing.assert_close(
        combine_by_group(TABLE, layer, T, token_N, expert_N, weight_N),
        combine_by_expert(T, token_N, expert_N, weight_N),
    )


# -- errors and replicas --------------------------------------------------------------


def test_expert_without_host_is_a_lookup_error() -> None:
    placement = [[s for s in slots if s != (0, 3) and s != (0, 6)] for slots in PLACEMENT]
    table = RoutingTable.build(2, E, GROUPS, placement)
    group_of, _ = table.lookup(0)
    assert int(group_of[3]) == -1 and int(group_of[6]) == -1
    token_N = torch.tensor([0, 1, 2, 3])
    with pytest.raises(LookupError, match=re.escape("no expert group hosts experts [3, 6]")):
        plan(table, 0, token_N, torch.tensor([6, 1, 3, 6]), torch.ones(4))
    # assignments that avoid the missing experts still plan
    check_plan(table, 0, token_N, torch.tensor([0, 1, 2, E]), torch.ones(4, dtype=torch.float64))


def test_missing_shared_slot_is_a_lookup_error() -> None:
    no_shared = spread(all_slots(SPEC, shared_as_slot=False), G)
    table = RoutingTable.build(1, E, GROUPS, no_shared)
    with pytest.raises(LookupError, match=re.escape(f"no expert group hosts experts [{E}]")):
        plan(table, 0, torch.tensor([0, 0]), torch.tensor([1, E]), torch.ones(2))


def test_replicated_slots_plan_on_the_first_replica() -> None:
    """BUG (router_svc/dispatch.py, plan_by_group): IndexError with replicated slots.

    `slots = local_of.max() + 1` sizes each group's count row by the largest local index
    in use, but `orders[g]` is every slot the group hosts. When group 1 holds replicas
    of experts 4 and 5 that group 0 serves first, group 1's order [0..5] is longer than
    the count row (max local index 3 -> 4 columns) and `row[i]` raises IndexError (which
    the router, catching LookupError, reports as an unavailable expert).
    """
    table = RoutingTable.build(1, 6, GROUPS[:2], [[(0, 4), (0, 5)], [(0, e) for e in range(6)]])
    group_of, local_of = table.lookup(0)
    assert group_of.tolist()[:6] == [1, 1, 1, 1, 0, 0]
    p = plan(table, 0, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4, 1, 5]), torch.ones(4))
    assert p.parts == (
        Part(group=0, start=0, end=2, experts=(4, 5), counts=(1, 1)),
        Part(group=1, start=2, end=4, experts=(0, 1), counts=(1, 1)),
    )
    assert p.token_N.tolist() == [1, 3, 0, 2]
