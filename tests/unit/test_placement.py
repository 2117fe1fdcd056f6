"""Placement (cluster.placement): all_slots and spread, checked as properties."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement import all_slots, spread
from expert_workers.group import SHARED
from expert_workers.spec import MoESpec, RoutingSpec, SharedExpertSpec

pytestmark = pytest.mark.unit


def make_spec(num_experts: int, moe_layers: tuple[int, ...], shared: int = 0, num_layers: int | None = None) -> MoESpec:
    return MoESpec(
        hidden_size=8, intermediate_size=4, num_experts=num_experts,
        num_layers=num_layers if num_layers is not None else max(moe_layers) + 1, moe_layers=moe_layers,
        routing=RoutingSpec(top_k=1),
        shared_experts=SharedExpertSpec(count=shared, intermediate_size=4 if shared else 0),
    )


# -- all_slots ----------------------------------------------------------------------


@pytest.mark.parametrize("shared_as_slot", [False, True])
def test_all_slots_without_shared_experts(shared_as_slot: bool) -> None:
    spec = make_spec(3, (1, 3), shared=0, num_layers=5)
    slots = all_slots(spec, shared_as_slot=shared_as_slot)
    assert slots == [(1, 0), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)]


def test_all_slots_with_shared_experts_kept_in_the_router() -> None:
    spec = make_spec(2, (0, 2), shared=2)
    assert all_slots(spec, shared_as_slot=False) == [(0, 0), (0, 1), (2, 0), (2, 1)]


def test_all_slots_with_shared_experts_as_slots() -> None:
    spec = make_spec(2, (0, 2), shared=2)
    slots = all_slots(spec, shared_as_slot=True)
    assert Counter(slots) == Counter([(0, 0), (0, 1), (2, 0), (2, 1), (0, SHARED), (2, SHARED)])
    assert len(slots) == 6
    # layer-major routed slots first
    assert slots[:4] == [(0, 0), (0, 1), (2, 0), (2, 1)]


@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(1, 12),
    layers=st.sets(st.integers(0, 6), min_size=1, max_size=4),
    shared=st.integers(0, 3),
    shared_as_slot=st.booleans(),
)
def test_all_slots_properties(num_experts: int, layers: set[int], shared: int, shared_as_slot: bool) -> None:
    moe_layers = tuple(sorted(layers))
    spec = make_spec(num_experts, moe_layers, shared=shared, num_layers=7)
    slots = all_slots(spec, shared_as_slot=shared_as_slot)
    assert len(set(slots)) == len(slots)
    for layer in range(7):
        routed = sorted(e for l, e in slots if l == layer and e != SHARED)
        n_shared = sum(1 for l, e in slots if l == layer and e == SHARED)
        if layer in layers:
            assert routed == list(range(num_experts))
            assert n_shared == (1 if shared_as_slot and shared > 0 else 0)
        else:
            assert routed == [] and n_shared == 0
    assert all(e == SHARED or 0 <= e < num_experts for _, e in slots)


# -- spread ---------------------------------------------------------------------------


def check_spread(slots: list[tuple[int, int]], num_groups: int) -> list[list[tuple[int, int]]]:
    groups = spread(slots, num_groups)
    assert len(groups) == num_groups
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(slots)
    flat = [s for g in groups for s in g]
    assert Counter(flat) == Counter(slots)  # every slot exactly once
    for layer in {l for l, _ in slots}:
        routed = [e for l, e in slots if l == layer and e != SHARED]
        spans = {g for g, members in enumerate(groups) for l, e in members if l == layer and e != SHARED}
        assert len(spans) == min(num_groups, len(routed))
    return groups


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4, 5, 7, 8, 16, 20])
@pytest.mark.parametrize("num_experts, layers", [(8, (0, 1)), (6, (1, 3, 4)), (3, (0,)), (64, (0, 5))])
def test_spread_balances_and_spans(num_groups: int, num_experts: int, layers: tuple[int, ...]) -> None:
    spec = make_spec(num_experts, layers, shared=1)
    for shared_as_slot in (False, True):
        check_spread(all_slots(spec, shared_as_slot=shared_as_slot), num_groups)


def test_spread_hand_example() -> None:
    slots = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (0, SHARED), (1, SHARED)]
    assert spread(slots, 3) == [
        [(0, 0), (0, 3), (1, 2), (1, SHARED)],
        [(0, 1), (1, 0), (1, 3)],
        [(0, 2), (1, 1), (0, SHARED)],
    ]


def test_spread_more_groups_than_slots_leaves_some_empty() -> None:
    slots = [(0, 0), (0, 1)]
    groups = check_spread(slots, 5)
    assert groups == [[(0, 0)], [(0, 1)], [], [], []]


def test_spread_of_nothing() -> None:
    assert spread([], 3) == [[], [], []]


def test_one_group_takes_everything_in_order() -> None:
    slots = all_slots(make_spec(4, (0, 1), shared=1), shared_as_slot=True)
    assert spread(slots, 1) == [slots]


@settings(max_examples=50, deadline=None)
@given(
    num_experts=st.integers(1, 40),
    layers=st.sets(st.integers(0, 5), min_size=1, max_size=3),
    num_groups=st.integers(1, 50),
    shared=st.booleans(),
)
def test_spread_properties(num_experts: int, layers: set[int], num_groups: int, shared: bool) -> None:
    spec = make_spec(num_experts, tuple(sorted(layers)), shared=int(shared), num_layers=6)
    check_spread(all_slots(spec, shared_as_slot=True), num_groups)


@pytest.mark.parametrize("num_groups", [0, -1, -10])
def test_spread_rejects_fewer_than_one_group(num_groups: int) -> None:
    with pytest.raises(ValueError, match=f"num_groups must be >= 1, got {num_groups}"):
        spread([(0, 0)], num_groups)
