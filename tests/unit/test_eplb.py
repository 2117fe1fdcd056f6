"""EPLB placement: the worked example of docs/eplb.md, and invariants over random loads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.eplb import balanced_packing, rebalance, replicate_experts

pytestmark = pytest.mark.unit
LOAD = torch.tensor([90.0, 10, 40, 20, 5, 35])


def test_worked_example_replication() -> None:
    # slot 7: expert 0 has 90 per replica, the most -> 2 copies (45 each);
    # slot 8: expert 0 still has the most per replica (45 > 40 of expert 2) -> 3 copies.
    assert replicate_experts(LOAD, 8, max_replicas=4).tolist() == [3, 1, 1, 1, 1, 1]


def test_worked_example_packing() -> None:
    p = balanced_packing(LOAD, torch.tensor([3, 1, 1, 1, 1, 1]), 4)
    assert p.groups == ((2, 4), (0, 5), (0, 3), (0, 1))
    assert p.group_load == (45.0, 65.0, 50.0, 40.0)
    assert p.max_over_mean == pytest.approx(65 / 50)
    flat = balanced_packing(LOAD, torch.ones(6, dtype=torch.int64), 4)
    assert flat.max_over_mean == pytest.approx(90 / 50)
    # one replica fewer packs better here: {0,4} {0,1} {2,...} ... max 55 instead of 65
    best = rebalance(LOAD, 4, 2)
    assert best.group_load == (50.0, 45.0, 50.0, 55.0)
    assert best.groups == ((0, 4), (0,), (1, 2), (3, 5))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="every expert needs a slot"):
        replicate_experts(LOAD, 5)
    with pytest.raises(ValueError, match="at most 1 replicas"):
        replicate_experts(LOAD, 7, max_replicas=1)
    with pytest.raises(ValueError, match="only 2 groups"):
        balanced_packing(LOAD, torch.tensor([3, 1, 1, 1, 1, 1]), 2)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(
    loads=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=2, max_size=24),
    groups=st.integers(min_value=1, max_value=6),
    extra=st.integers(min_value=0, max_value=12),
)
def test_invariants(loads: list[float], groups: int, extra: int) -> None:
    load = torch.tensor(loads, dtype=torch.float64)
    e = load.numel()
    slots = -(-(e + extra) // groups)
    if slots * groups < e:
        return
    p = rebalance(load, groups, slots)
    hosted = [x for g in p.groups for x in g]
    assert sorted(set(hosted)) == list(range(e)), "every expert hosted at least once"
    assert len(hosted) <= groups * slots and all(len(g) <= slots for g in p.groups)
    for g in p.groups:
        assert len(set(g)) == len(g), "no group holds two copies of one expert"
    counts = torch.bincount(torch.tensor(hosted), minlength=e)
    assert int(counts.max()) <= groups
    assert sum(p.group_load) == pytest.approx(float(load.sum()), rel=1e-9, abs=1e-9)
    # replication never makes the busiest group busier than packing one copy each would
    flat = balanced_packing(load, torch.ones(e, dtype=torch.int64), groups) if e >= groups else None
    if flat is not None and max(flat.group_load) > 0:
        assert max(p.group_load) <= max(flat.group_load) + 1e-6 * max(flat.group_load)


def test_packing_never_overfills_a_group_when_an_equal_packing_exists() -> None:
    # lightest-first put expert 4's three copies on 3 groups after 0 and 2 had left one group full:
    # sizes [3, 5, 4] against a limit of 4, though [4, 4, 4] exists
    counts = torch.tensor([3, 1, 2, 2, 3, 1])
    p = balanced_packing(torch.tensor([17.0, 5, 10, 5, 4, 20]), counts, 3)
    assert [len(g) for g in p.groups] == [4, 4, 4]
    assert torch.bincount(torch.tensor([x for g in p.groups for x in g]), minlength=6).tolist() == counts.tolist()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    groups=st.integers(min_value=1, max_value=8),
    data=st.data(),
)
def test_packing_invariants_over_random_counts(groups: int, data: st.DataObject) -> None:
    """Any counts with at most `groups` copies per expert pack into groups of at most ceil(P / G)
    slots, each holding distinct experts, every copy placed and every load accounted for."""
    counts = data.draw(st.lists(st.integers(min_value=1, max_value=groups), min_size=1, max_size=16), label="counts")
    loads = data.draw(st.lists(st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1e3, allow_nan=False)),
                               min_size=len(counts), max_size=len(counts)), label="loads")
    counts_E, load_E = torch.tensor(counts), torch.tensor(loads, dtype=torch.float64)
    p = balanced_packing(load_E, counts_E, groups)
    limit = -(-sum(counts) // groups)
    assert all(len(g) <= limit for g in p.groups), [len(g) for g in p.groups]
    assert all(len(set(g)) == len(g) for g in p.groups), "no group holds two copies of one expert"
    hosted = torch.bincount(torch.tensor([x for g in p.groups for x in g], dtype=torch.int64), minlength=len(counts))
    assert hosted.tolist() == counts
    assert sum(p.group_load) == pytest.approx(float(load_E.sum()), rel=1e-9, abs=1e-9)
