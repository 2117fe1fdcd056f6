"""Elastic replicas, pure parts: the replica policy (cluster.eplb), the load split a routing table
carries (router_svc.table), how a router splits and reroutes assignments (router_svc.router),
a group changing slots in place (expert_workers.group) and the knobs (cluster.config)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cluster.config import DeploymentSettings, ElasticPolicy
from cluster.eplb import ReplicaPolicy, desired_replicas, group_loads, pick_removal, place_replica, replica_shares
from expert_workers.errors import ConfigError, InvalidRequestError
from expert_workers.group import SHARED, GroupCore
from expert_workers.source import SourceSpec
from expert_workers.spec import MoESpec, SharedExpertSpec
from router_svc.config import DataPlaneConfig
from router_svc.dispatch import copy_credit, reroute_lost, split_copies
from router_svc.table import GroupRef, RoutingTable

pytestmark = pytest.mark.unit

POLICY = ReplicaPolicy(hot_threshold=2.0, max_replicas=3, min_rate=1.0)
X, Y, Z = (0, 0), (0, 1), (0, 2)  # (layer, expert) slots


def want(rates: list[float], cur: list[int], base: list[int] | None = None, policy: ReplicaPolicy = POLICY) -> list[int]:
    cur_E = torch.tensor(cur)
    base_E = torch.ones_like(cur_E) if base is None else torch.tensor(base)
    return desired_replicas(torch.tensor(rates, dtype=torch.float64), cur_E, base_E, policy).tolist()


# -- cluster/eplb.py: the replica policy ------------------------------------------------------

@pytest.mark.parametrize("rates, max_replicas, expected", [
    ([10.0, 2, 2, 2], 3, [3, 1, 1, 1]),  # mean 4: 10 > 8 is hot, ceil(10 / 4) = 3
    ([40.0, 0, 0, 0], 3, [3, 1, 1, 1]),  # ceil(40 / 10) = 4, capped
    ([10.0, 2, 2, 2], 2, [2, 1, 1, 1]),
    ([6.0, 2, 2, 2], 3, [1, 1, 1, 1]),  # mean 3: 6 is not above 2x mean
    ([0.9, 0, 0, 0], 3, [1, 1, 1, 1]),  # 4x mean, but below min_rate
])
def test_hot_expert_goes_up_to_ceil_rate_over_mean_capped(rates: list[float], max_replicas: int, expected: list[int]) -> None:
    assert want(rates, [1, 1, 1, 1], policy=dataclasses.replace(POLICY, max_replicas=max_replicas)) == expected


def test_never_below_base_and_hot_never_shrinks() -> None:
    # hot, wants 2, but starts with 3 copies / already has 3
    assert want([10.0, 2, 2, 2], [3, 1, 1, 1], base=[3, 1, 1, 1], policy=dataclasses.replace(POLICY, max_replicas=2))[0] == 3
    assert want([10.0, 2, 2, 2], [3, 1, 1, 1], policy=dataclasses.replace(POLICY, max_replicas=2))[0] == 3
    # cold at its base: stays
    assert want([0.0, 9, 9, 9], [2, 1, 1, 1], base=[2, 1, 1, 1]) == [2, 1, 1, 1]


@pytest.mark.parametrize("rates, cur, expected", [
    ([4.0, 4, 4, 4], [3, 1, 1, 1], [2, 1, 1, 1]),  # 4 / 2 < 4: one step down, not two
    ([4.0, 4, 4, 4], [2, 1, 1, 1], [2, 1, 1, 1]),  # 4 / 1 == mean: not below, kept
    ([0.5, 0.5, 0.5, 0.5], [2, 1, 1, 1], [1, 1, 1, 1]),  # 0.5 >= mean, but below min_rate
    ([0.0, 0, 0, 0], [3, 2, 1, 1], [2, 1, 1, 1]),  # no traffic at all: extras come down
])
def test_cool_extra_copy_goes_one_step(rates: list[float], cur: list[int], expected: list[int]) -> None:
    assert want(rates, cur) == expected


@pytest.mark.parametrize("max_replicas", [
    2,
    3,
])
def test_expert_jittering_at_the_hot_threshold_does_not_flap(max_replicas: int) -> None:
    # 7 experts at 1 and one at x: hot iff x > 2 * (x + 7) / 8, i.e. x > 2.33
    policy = dataclasses.replace(POLICY, max_replicas=max_replicas)
    cur = [1] * 8
    seen = []
    for x in (2.4, 2.3, 2.4, 2.3, 2.4):
        cur = want([x] + [1.0] * 7, cur, policy=policy)
        seen.append(cur[0])
    assert seen[1:] == [seen[0]] * 4, seen


def test_group_loads_split_evenly_or_by_shares() -> None:
    placement = [[X, Y], [X]]
    rate = {X: 10.0, Y: 4.0}
    assert group_loads(placement, rate) == [9.0, 5.0]
    assert group_loads(placement, rate, shares=[[0.2, 1.0], [0.8]]) == pytest.approx([6.0, 8.0])


# groups 0 and 1 on node "a", 2 and 3 on node "b"; group 0 holds X.
NODES = ["a", "a", "b", "b"]
HOLDS_X = [[X], [Y], [Y], [Z]]


@pytest.mark.parametrize("loads, usable, expected", [
    ([0.0, 1, 50, 60], [0, 1, 2, 3], 2),  # another node first, though busier
    ([0.0, 1, 50, 40], [0, 1, 2, 3], 3),  # then the lightest there
    ([0.0, 1, 50, 60], [0, 1], 1),  # no other node usable: the same node
    ([0.0, 1, 50, 60], [0], None),  # every usable group holds X
])
def test_place_replica(loads: list[float], usable: list[int], expected: int | None) -> None:
    assert place_replica(HOLDS_X, X, loads, NODES, usable) == expected


@pytest.mark.parametrize("nodes, loads, expected", [
    (["a", "a", "b"], [99.0, 1, 50], 1),  # group 1 shares node a with group 0's copy
    (["a", "b", "c"], [99.0, 5, 9], 2),  # no node keeps another copy: the busiest extra
])
def test_pick_removal_spares_base_copies(nodes: list[str], loads: list[float], expected: int) -> None:
    placement, base = [[X], [X, Y], [X, Z]], [[X], [Y], [Z]]
    assert pick_removal(placement, base, X, loads, nodes) == expected
    assert pick_removal(placement, placement, X, loads, nodes) is None  # every copy a starting one


def test_replica_shares_single_replicated_and_dead() -> None:
    placement = [[X, Y], [X], [X, Z]]
    shares = replica_shares(placement, {X: 9.0, Y: 3.0, Z: 3.0}, alive=[True, True, False])
    assert shares[0][1] == 1.0  # Y has one copy
    assert shares[2] == [0.0, 0.0]  # dead group
    assert shares[0][0] + shares[1][0] == pytest.approx(1.0)
    # Y's 3 on group 0: X's 9 fills group 1 first (to 3), then 6 more split evenly
    assert (shares[0][0], shares[1][0]) == pytest.approx((3 / 9, 6 / 9), abs=1 / 32)


def test_replica_shares_water_fill_evens_group_loads() -> None:
    # group 0 also carries Y (10); an even split of X (8) leaves it at 14 against 4
    placement, rate = [[X, Y], [X, Z]], {X: 8.0, Y: 10.0, Z: 0.0}
    shares = replica_shares(placement, rate)
    assert shares[0][0] + shares[1][0] == 1.0 and shares[0][1] == shares[1][1] == 1.0
    even, filled = group_loads(placement, rate), group_loads(placement, rate, shares)

    def max_over_mean(loads: list[float]) -> float:
        return max(loads) / (sum(loads) / len(loads))

    assert even == [14.0, 4.0]
    assert filled == pytest.approx([10.0, 8.0])
    assert max_over_mean(filled) < max_over_mean(even)


def test_replica_shares_zero_rate_splits_evenly() -> None:
    assert replica_shares([[X], [X], [X, Y]], {Y: 5.0}) == [[1 / 3], [1 / 3], [1 / 3, 1.0]]


# -- router_svc/table.py: shares in the table ------------------------------------------------

E = 4
GROUPS = [GroupRef(f"g{i}", f"127.0.0.1:{5000 + i}") for i in range(3)]
PLACED = [[(0, 0), (0, 1), (0, SHARED), (1, 0)], [(0, 0), (0, 2), (1, 0)], [(0, 0), (0, 3), (0, SHARED)]]
SHARES = [[0.5, 1.0, 0.5, 0.1], [0.25, 1.0, 0.9], [0.25, 1.0, 0.5]]


@pytest.mark.parametrize("shares", [[[1.0] * 4, [1.0] * 3], [[1.0] * 4, [1.0] * 2, [1.0] * 3], [[1.0] * 4, [1.0] * 3, [1.0] * 4]])
def test_build_rejects_shares_of_another_shape(shares: list[list[float]]) -> None:
    with pytest.raises(ValueError, match="one entry per placed slot"):
        RoutingTable.build(1, E, GROUPS, PLACED, shares=shares)


@pytest.mark.parametrize("shares, dead, layer, expected", [
    (SHARES, frozenset(), 0, {0: [0.5, 0.75, 1.0], 1: [1.0, 1.0, 1.0], E: [0.5, 1.0, 1.0]}),
    (SHARES, frozenset({0}), 0, {0: [0.5, 1.0], 1: [0.0, 0.0], 2: [1.0, 1.0], E: [1.0, 1.0]}),
    (SHARES, frozenset(), 1, {0: [0.1, 1.0], 1: [0.0, 0.0]}),  # layer 1's shares, not layer 0's
    # 0.1, 0.2, 0.3 normalised sum to 0.9999999999999999 in float64: the end is pinned to 1.0
    ([[0.1, 1.0, 0.5, 0.1], [0.2, 1.0, 0.9], [0.3, 1.0, 0.5]], frozenset(), 0, {0: [1 / 6, 0.5, 1.0]}),
    (None, frozenset(), 0, {0: [1 / 3, 2 / 3, 1.0], E: [0.5, 1.0, 1.0]}),
    (None, frozenset({1}), 0, {0: [0.5, 1.0], 2: [0.0, 0.0]}),
    # live copies with no share at all: even split
    ([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], frozenset({0}), 0, {0: [0.5, 1.0]}),
])
def test_split_alive(shares: list[list[float]] | None, dead: frozenset[int], layer: int, expected: dict[int, list[float]]) -> None:
    table = RoutingTable.build(1, E, GROUPS, PLACED, shares=shares)
    cum = table.split_alive(layer, dead)
    assert cum.shape[0] == E + 1
    for row, values in expected.items():
        assert cum[row, : len(values)].tolist() == pytest.approx(values), row
    _, _, count = table.lookup_alive(layer, dead)
    for row in range(E + 1):
        if count[row]:
            assert cum[row, int(count[row]) - 1] == 1.0  # exactly, so no assignment falls off the end


# -- router_svc/dispatch.py: split over copies, reroute the lost -------------------------------

def test_split_follows_the_shares_in_input_order() -> None:
    pick = split_copies(torch.zeros(100, dtype=torch.int64), torch.tensor([[0.25, 1.0]], dtype=torch.float64))
    assert pick.tolist() == [0] * 25 + [1] * 75


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_split_interleaved_experts(n: int) -> None:
    cum = torch.tensor([[0.25, 0.5, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    expert = torch.tensor([0, 1, 2] * n)
    pick = split_copies(expert, cum)
    assert pick[expert == 1].tolist() == [0] * n  # one live copy
    assert pick[expert == 2].tolist() == [1] * n  # the first copy takes no share
    p0 = pick[expert == 0].tolist()
    assert p0 == sorted(p0)  # ranks in input order: earlier assignments, earlier copies
    for j, share in enumerate([0.25, 0.25, 0.5]):
        assert abs(p0.count(j) - n * share) <= 1


def test_split_single_copy_and_empty() -> None:
    assert split_copies(torch.tensor([2, 0, 1]), torch.ones((4, 1), dtype=torch.float64)).tolist() == [0, 0, 0]
    assert split_copies(torch.zeros(0, dtype=torch.int64), torch.ones((4, 2), dtype=torch.float64)).numel() == 0


def _copies_used(expert: torch.Tensor, pick: torch.Tensor, e: int) -> set[int]:
    return set(pick[expert == e].tolist())


def test_few_rows_of_an_expert_go_to_one_copy_and_copies_take_turns_by_their_shares() -> None:
    """Under `min_rows` rows an expert's rows go to one copy (each copy would read all its weights);
    over batches the copies get their shares of the rows (0.25 / 0.75 here), never one copy always."""
    cum = torch.tensor([[0.25, 1.0]], dtype=torch.float64)
    credit = copy_credit(cum)
    rows = [0, 0]
    for b in range(400):
        n = 1 + b % 5  # 1..5 rows, all under min_rows
        pick = split_copies(torch.zeros(n, dtype=torch.int64), cum, 8, credit)
        assert len(set(pick.tolist())) == 1, (b, pick.tolist())
        rows[int(pick[0])] += n
    assert abs(rows[0] - 0.25 * sum(rows)) <= 5, rows  # within one batch's rows of the share
    assert credit.abs().max() <= 5


def test_a_busy_spell_leaves_no_debt_for_the_quiet_one_after() -> None:
    """Batches that use every copy follow the table's rank rule and owe nothing after: 500 batches of
    17 rows (the later copy takes the odd row each time), then lone rows still take turns at once."""
    cum = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    credit = copy_credit(cum)
    for _ in range(500):
        split_copies(torch.zeros(17, dtype=torch.int64), cum, 8, credit)
    quiet = [int(split_copies(torch.zeros(1, dtype=torch.int64), cum, 8, credit)[0]) for _ in range(20)]
    assert sorted(set(quiet)) == [0, 1] and all(a != b for a, b in zip(quiet, quiet[1:])), quiet


@pytest.mark.parametrize("shares, n, min_rows", [([0.495, 0.495, 0.01], 2, 1), ([0.01, 0.495, 0.495], 20, 16), ([0.6, 0.3, 0.1], 3, 2)])
def test_a_copy_with_a_small_share_gets_it_and_no_credit_grows(shares: list[float], n: int, min_rows: int) -> None:
    """Three unequal copies, batches using two of them: every chosen copy gets rows, so each copy's
    rows follow its share and the credit stays bounded (a chosen copy given none would be owed ever more)."""
    cum = torch.tensor([shares], dtype=torch.float64).cumsum(1)
    cum[0, -1] = 1.0
    credit = copy_credit(cum)
    rows = [0, 0, 0]
    for _ in range(3000):
        for j in split_copies(torch.zeros(n, dtype=torch.int64), cum, min_rows, credit).tolist():
            rows[j] += 1
    assert credit.abs().max() <= n + 1, credit
    for got, share in zip(rows, shares):
        assert abs(got - share * 3000 * n) <= n + 1, rows


def test_rows_past_min_rows_spread_over_as_many_copies_as_they_fill() -> None:
    cum = torch.tensor([[1 / 3, 2 / 3, 1.0]], dtype=torch.float64)
    for n, copies in [(1, 1), (8, 1), (9, 2), (16, 2), (17, 3), (100, 3)]:
        pick = split_copies(torch.zeros(n, dtype=torch.int64), cum, 8, copy_credit(cum))
        assert len(set(pick.tolist())) == copies, (n, pick.tolist())
        assert pick.tolist() == sorted(pick.tolist())  # ranks in input order: contiguous blocks per copy


def test_with_every_copy_in_use_the_split_is_the_tables() -> None:
    """Enough rows for every copy: exactly the shares' rank rule, the same with or without a credit."""
    cum = torch.tensor([[0.25, 0.5, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    expert = torch.tensor([0, 1, 2] * 40)
    credit = copy_credit(cum)
    assert split_copies(expert, cum, 8, credit).tolist() == split_copies(expert, cum).tolist()
    assert split_copies(expert, cum, 1, credit).tolist() == split_copies(expert, cum).tolist()


def test_lone_rows_of_many_experts_start_spread_over_the_copies() -> None:
    """Experts with one row each in the first batch: the fresh credit spreads them over the copies
    (not every expert's row on the same group); a copy with no share never gets one."""
    cum = torch.tensor([[0.5, 1.0]] * 6 + [[0.0, 1.0]], dtype=torch.float64)
    pick = split_copies(torch.arange(7), cum, 16, copy_credit(cum))
    assert pick.tolist() == [0, 1, 0, 1, 0, 1, 1]
    credit = copy_credit(cum)
    for _ in range(20):
        assert split_copies(torch.tensor([6, 6]), cum, 16, credit).tolist() == [1, 1]


def test_reroute_lost_takes_best_live_unused_expert() -> None:
    logits = torch.tensor([[5.0, 9, 6, 1, 8], [1.0, 9, 2, 3, 8], [1.0, 2, 3, 4, 5]])
    live = torch.tensor([True, False, True, True, False])  # experts 1 and 4 have no live copy
    token = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0])
    expert = torch.tensor([1, 2, 1, 4, 0, 2, 3, 1, 5])  # 5 == num_experts: the shared slot
    lost = ~live[expert.clamp_max(4)] | (expert == 5)
    new, still = reroute_lost(token, expert, lost, logits, live)
    # token 0: 2 is used, so 0; token 1 loses two: 3 then 2; token 2 uses every live expert
    assert new.tolist() == [0, 2, 3, 2, 0, 2, 3, 1, 5]
    assert still.tolist() == [False] * 7 + [True, True]
    assert expert.tolist() == [1, 2, 1, 4, 0, 2, 3, 1, 5]  # input untouched


def test_reroute_lost_with_no_live_expert_stays_lost() -> None:
    token, expert = torch.tensor([0, 1]), torch.tensor([0, 1])
    new, still = reroute_lost(token, expert, torch.tensor([True, True]), torch.randn(2, 3), torch.zeros(3, dtype=torch.bool))
    assert new.tolist() == [0, 1] and still.tolist() == [True, True]


# -- expert_workers/group.py: slots changed in place ------------------------------------------

SPEC = MoESpec(hidden_size=16, intermediate_size=24, num_experts=6, num_layers=2, moe_layers=(0, 1),
               shared_experts=SharedExpertSpec(count=1, intermediate_size=20))
SOURCE = SourceSpec(random=SPEC, seed=11)


def test_set_slots_adds_removes_and_keeps_counters() -> None:
    core = GroupCore(SOURCE, [(0, 3), (0, 1), (1, 0)], device="cpu", dtype="float32")
    x = torch.randn((9, 16), generator=torch.Generator().manual_seed(0))
    before = core.compute(0, [1, 3], [4, 5], x)
    core.compute(1, [0], [2], x[:2])
    assert core.set_slots([(0, 1), (0, 3), (0, 4), (1, 2)]) == [(0, 1), (0, 3), (0, 4), (1, 2)]
    after = core.compute(0, [1, 3, 4], [4, 2, 3], x)
    torch.testing.assert_close(after[:6], before[:6])  # kept experts: same weights
    fresh = GroupCore(SOURCE, [(0, 4)], device="cpu", dtype="float32").compute(0, [4], [3], x[6:])
    torch.testing.assert_close(after[6:], fresh, rtol=1e-6, atol=1e-6)
    with pytest.raises(InvalidRequestError, match=r"experts \[0\] are not hosted"):
        core.compute(1, [0], [1], x[:1])
    assert core.tokens == {(0, 1): 8, (0, 3): 7, (0, 4): 3, (1, 2): 0}
    core.set_slots([(0, 4)])
    with pytest.raises(InvalidRequestError, match="hosts no slot of layer 1"):
        core.compute(1, [2], [1], x[:1])
    assert core.tokens == {(0, 4): 3}


def test_set_slots_that_cannot_load_leaves_the_group_as_it_was() -> None:
    plain = dataclasses.replace(SPEC, shared_experts=SharedExpertSpec())
    core = GroupCore(SourceSpec(random=plain, seed=11), [(0, 1)], device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="shared-expert slot"):
        core.set_slots([(0, 2), (0, SHARED)])
    assert core.slots == [(0, 1)]
    assert core.compute(0, [1], [1], torch.ones((1, 16))).shape == (1, 16)


# -- cluster/config.py and router_svc/config.py: the knobs -------------------------------------

@pytest.mark.parametrize("name, value", [
    ("max_replicas", 0), ("max_replicas", True), ("hot_threshold", -1.0), ("hot_threshold", "2"),
    ("load_window_s", math.nan), ("rebalance_period_s", None), ("replica_down_delay_s", -1),
    ("min_groups", 0), ("max_groups", 2.5), ("target_group_tokens_per_s", -0.1), ("scale_up_delay_s", True),
    ("scale_down_delay_s", -5), ("place_timeout_s", "10"), ("drain_timeout_s", -1.0),
    ("batch_max_in_flight", 0), ("batch_max_in_flight", 1.5),
    ("hot_replica_min_rate", -1.0), ("replica_down_fraction", 1.5), ("replica_down_fraction", "0.5"),
])
def test_bad_elastic_settings_name_the_field(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"'deployment.{name}'") as err:
        DeploymentSettings(**{name: value})
    assert err.value.field == f"deployment.{name}"


def test_elastic_defaults_follow_replicas_and_expert_groups() -> None:
    got = DeploymentSettings(expert_groups=3, replicas=2).elastic()
    assert got == ElasticPolicy(max_replicas=2, min_groups=3, max_groups=3)


def test_elastic_maps_every_field() -> None:
    knobs = dict(max_replicas=3, hot_threshold=1.5, load_window_s=4.0, rebalance_period_s=1.0, replica_down_delay_s=7.0,
                 min_groups=2, max_groups=6, target_group_tokens_per_s=500.0, scale_up_delay_s=2.0,
                 scale_down_delay_s=9.0, place_timeout_s=3.0, drain_timeout_s=11.0, hot_replica_min_rate=0.5,
                 replica_down_fraction=0.6)
    assert set(knobs) == {f.name for f in dataclasses.fields(ElasticPolicy)}, "a policy knob without a setting"
    got = DeploymentSettings(expert_groups=4, replicas=2, **knobs).elastic()
    assert got == ElasticPolicy(**knobs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(expert_groups=2, min_groups=3), "min_groups"),
    (dict(expert_groups=4, max_groups=3), "max_groups"),
    (dict(expert_groups=3, replicas=2, max_replicas=1), "max_replicas"),
])
def test_group_range_and_max_replicas_must_contain_the_start(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ConfigError, match=f"'deployment.{name}'"):
        DeploymentSettings(**kwargs)


def test_data_plane_accepts_reroute_and_checks_in_flight() -> None:
    assert DataPlaneConfig(failover="reroute", batch_max_in_flight=4).failover == "reroute"
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ConfigError, match="'deployment.batch_max_in_flight'"):
            DataPlaneConfig(batch_max_in_flight=bad)
    with pytest.raises(ConfigError, match="'deployment.failover'"):
        DataPlaneConfig(failover="retry")
