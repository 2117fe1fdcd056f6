"""Capacity limits and the overflow policies, on hand-computed cases and under hypothesis.

Priority (GShard): all first choices in token order, then all second choices, ...
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from expert_workers.spec import RoutingSpec
from router_svc.gate import Assignments, GateInput, capacity_for, route

pytestmark = pytest.mark.unit


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pair_softmax(a: float, b: float) -> tuple[float, float]:
    z = math.exp(a) + math.exp(b)
    return math.exp(a) / z, math.exp(b) / z


def as_dict(a: Assignments) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for t, e, w in zip(a.token_N.tolist(), a.expert_N.tolist(), a.weight_N.tolist()):
        assert (t, e) not in out, f"token {t} got expert {e} twice"
        out[(t, e)] = w
    return out


def assert_pairs(a: Assignments, expected: dict[tuple[int, int], float]) -> None:
    got = as_dict(a)
    assert set(got) == set(expected)
    keys = sorted(expected)
    torch.testing.assert_close(
        torch.tensor([got[k] for k in keys], dtype=torch.float64),
        torch.tensor([expected[k] for k in keys], dtype=torch.float64),
        rtol=1e-6, atol=1e-7,
    )


# ---------------------------------------------------------------- capacity_for


@pytest.mark.parametrize(
    "factor,tokens,k,experts,expected",
    [
        (1.0, 8, 2, 4, 4),      # 1 * 8 * 2 / 4 = 4 exactly
        (1.25, 10, 2, 4, 7),    # 6.25 -> 7
        (1.0, 3, 1, 4, 1),      # 0.75 -> 1
        (0.5, 4, 2, 4, 1),      # 1.0 exactly
        (0.5, 5, 2, 4, 2),      # 1.25 -> 2
        (0.125, 1, 1, 16, 1),   # 0.0078 -> 1: never zero for a non-empty request
        (2.0, 64, 4, 16, 32),
        (1.5, 7, 3, 5, 7),      # 6.3 -> 7
        (1.1, 400, 1, 8, 55),   # exactly 55 (55.000000000000007 in floats)
        (1.2, 50, 2, 8, 15),    # exactly 15 (15.000000000000002 in floats)
        (0.1, 30, 1, 3, 1),     # exactly 1 (1.0000000000000002 in floats)
    ],
)
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_capacity_for_is_ceil_c_t_k_over_e(factor, tokens, k, experts, expected, overflow) -> None:
    spec = RoutingSpec(policy="topk_softmax", top_k=k, capacity_factor=factor, overflow=overflow)
    assert capacity_for(tokens, spec, experts) == expected


def test_expert_choice_capacity_is_exact_for_decimal_factors() -> None:
    from router_svc.gate.policies import expert_choice_capacity

    assert expert_choice_capacity(400, RoutingSpec(policy="expert_choice", top_k=1, capacity_factor=1.1), 8) == 55


def test_capacity_for_unlimited_when_dropless_or_no_factor() -> None:
    assert capacity_for(100, RoutingSpec(top_k=2), 4) is None
    assert capacity_for(100, RoutingSpec(top_k=2, capacity_factor=0.5, overflow="dropless"), 4) is None


# ---------------------------------------------------------------- drop

# T=4, E=4, k=2, capacity_factor 1.0 -> capacity ceil(1 * 4 * 2 / 4) = 2.
# (first, second) choice per token, read off the logits:
#   t0: e0 (3), e1 (2) | t1: e0 (2), e1 (1) | t2: e1 (2), e0 (1) | t3: e0 (2), e2 (1)
# Priority: first choices t0->e0, t1->e0, t2->e1, t3->e0 (3rd on e0: overflow),
#           then second choices t0->e1 (2nd on e1), t1->e1 (3rd: overflow), t2->e0 (4th: overflow), t3->e2.
# A token-major order would instead keep t1->e1 and drop t2->e1: this case tells them apart.
CAP_LOGITS = torch.tensor(
    [
        [3.0, 2.0, 0.0, 0.0],
        [2.0, 1.0, 0.0, -1.0],
        [1.0, 2.0, 0.0, -1.0],
        [2.0, 0.5, 1.0, 0.0],
    ]
)


def _spec(overflow: str, policy: str = "topk_softmax", **kw) -> RoutingSpec:
    return RoutingSpec(policy=policy, top_k=2, capacity_factor=1.0, overflow=overflow, **kw)


def test_drop_keeps_first_choices_first_and_leaves_weights_alone() -> None:
    a = route(GateInput(CAP_LOGITS), _spec("drop"))
    w0 = pair_softmax(3.0, 2.0)
    w1 = pair_softmax(2.0, 1.0)
    w2 = pair_softmax(2.0, 1.0)  # t2: e1 (2.0), e0 (1.0)
    w3 = pair_softmax(2.0, 1.0)  # t3: e0 (2.0), e2 (1.0)
    assert_pairs(
        a,
        {
            (0, 0): w0[0], (0, 1): w0[1],
            (1, 0): w1[0],               # t1 lost e1; its e0 weight is NOT renormalised to 1
            (2, 1): w2[0],               # t2 lost e0
            (3, 2): w3[1],               # t3 lost its first choice e0, keeps e2 at its old weight
        },
    )
    assert a.dropped == 3
    assert a.rerouted == 0
    assert torch.bincount(a.expert_N, minlength=4).tolist() == [2, 2, 1, 0]


def test_drop_unnormalized_weights_unchanged() -> None:
    a = route(GateInput(CAP_LOGITS), _spec("drop", normalize_topk=False))
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in CAP_LOGITS.tolist()]
    assert_pairs(
        a,
        {(0, 0): probs[0][0], (0, 1): probs[0][1], (1, 0): probs[1][0], (2, 1): probs[2][1], (3, 2): probs[3][2]},
    )
    assert a.dropped == 3


def test_drop_k1_token_order() -> None:
    # 5 tokens all preferring e0, E=2, k=1, factor 0.8: capacity ceil(0.8 * 5 / 2) = 2.
    # t0, t1 keep e0; t2, t3, t4 are dropped (drop never moves them to e1).
    logits = torch.tensor([[1.0, 0.0]] * 5)
    spec = RoutingSpec(policy="topk_softmax", top_k=1, capacity_factor=0.8, overflow="drop")
    a = route(GateInput(logits), spec)
    assert_pairs(a, {(0, 0): 1.0, (1, 0): 1.0})
    assert a.dropped == 3


# ---------------------------------------------------------------- reroute


def test_reroute_moves_to_next_best_expert_with_room() -> None:
    # After the originals (see CAP_LOGITS): loads e0 2, e1 2, e2 1, e3 0 -> room e2 1, e3 2.
    # Rank 1 (first choices) pending: t3 (e0 full). t3 already uses e0, e2; e1 is full -> e3.
    #   room now e2 1, e3 1.
    # Rank 2 pending in token order: t1 (lost e1), t2 (lost e0).
    #   t1 uses e0, e1; best with room is e2 (logit 0 > e3's -1).
    #   t2 uses e1, e0; best with room is e2 (0 > -1) too, but t1 came first and filled it -> e3.
    a = route(GateInput(CAP_LOGITS), _spec("reroute"))
    w0 = pair_softmax(3.0, 2.0)      # t0 untouched: {e0, e1}
    w1 = pair_softmax(2.0, 0.0)      # t1 final set {e0, e2}, renormalised
    w2 = pair_softmax(2.0, -1.0)     # t2 final set {e1, e3}
    w3 = pair_softmax(0.0, 1.0)      # t3 final set {e3, e2}
    assert_pairs(
        a,
        {
            (0, 0): w0[0], (0, 1): w0[1],
            (1, 0): w1[0], (1, 2): w1[1],
            (2, 1): w2[0], (2, 3): w2[1],
            (3, 3): w3[0], (3, 2): w3[1],
        },
    )
    assert a.rerouted == 3
    assert a.dropped == 0
    assert torch.bincount(a.expert_N, minlength=4).tolist() == [2, 2, 2, 2]


def test_reroute_unnormalized_weights_are_the_policy_probs() -> None:
    a = route(GateInput(CAP_LOGITS), _spec("reroute", normalize_topk=False))
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in CAP_LOGITS.tolist()]
    expected = {(t, e): probs[t][e] for t, e in [(0, 0), (0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 3), (3, 2)]}
    assert_pairs(a, expected)


def test_reroute_softmax_topk_scaling_applied_to_final_set() -> None:
    a = route(GateInput(CAP_LOGITS), _spec("reroute", policy="softmax_topk", routed_scaling_factor=2.0))
    w1 = pair_softmax(2.0, 0.0)
    w3 = pair_softmax(0.0, 1.0)
    got = as_dict(a)
    torch.testing.assert_close(
        torch.tensor([got[(1, 0)], got[(1, 2)], got[(3, 3)], got[(3, 2)]], dtype=torch.float64),
        torch.tensor([2 * w1[0], 2 * w1[1], 2 * w3[0], 2 * w3[1]], dtype=torch.float64),
        rtol=1e-6, atol=1e-7,
    )


# T=3, E=3, k=2, factor 0.5 -> capacity ceil(0.5 * 3 * 2 / 3) = 1; every token ranks e0 > e1 > e2.
# Originals: t0 keeps e0 and e1. Rank 1: t1, t2 pending; only e2 has room: t1 takes it, t2 has
# nowhere -> dropped. Rank 2: t1 (lost e1), t2 (lost e1): no room anywhere -> dropped.
FULL_LOGITS = torch.tensor([[3.0, 2.0, 1.0]] * 3)
FULL_SPEC = RoutingSpec(policy="topk_softmax", top_k=2, capacity_factor=0.5, overflow="reroute")


def test_reroute_with_no_room_anywhere_drops() -> None:
    a = route(GateInput(FULL_LOGITS), FULL_SPEC)
    assert sorted(as_dict(a)) == [(0, 0), (0, 1), (1, 2)]
    assert a.rerouted == 1
    assert a.dropped == 3
    w0 = pair_softmax(3.0, 2.0)
    got = as_dict(a)
    torch.testing.assert_close(
        torch.tensor([got[(0, 0)], got[(0, 1)]], dtype=torch.float64), torch.tensor(w0, dtype=torch.float64)
    )


def test_reroute_weight_keeps_the_dropped_assignments_place() -> None:
    # t1 ends with the single expert e2: its first choice e0 was rerouted to e2, its second
    # choice e1 was dropped. As documented (capacity.py, docs/routing.md) the dropped e1 keeps
    # its place in the set the weights are computed over (contributing zero), so t1's weight on
    # e2 is p2 / (p2 + p1) = e^1 / (e^1 + e^2), not 1: dropping never inflates the others.
    a = route(GateInput(FULL_LOGITS), FULL_SPEC)
    assert as_dict(a)[(1, 2)] == pytest.approx(math.exp(1.0) / (math.exp(1.0) + math.exp(2.0)), rel=1e-6)


def test_reroute_stays_inside_the_allowed_groups() -> None:
    # sigmoid_group_topk, E=4 in 2 groups, topk_groups 1, k 1; T=3, factor 1.0 -> capacity
    # ceil(1 * 3 * 1 / 4) = 1. Every token's best group is g0 = {e0, e1}
    # (sig(2) + sig(1) > sig(-1) + sig(-2)). t0 -> e0; t1 overflows -> e1 (same group);
    # t2 overflows, g0 is full -> dropped, although e2 and e3 are empty.
    logits = torch.tensor([[2.0, 1.0, -1.0, -2.0]] * 3)
    spec = RoutingSpec(
        policy="sigmoid_group_topk", top_k=1, num_groups=2, topk_groups=1, score_function="sigmoid",
        capacity_factor=1.0, overflow="reroute",
    )
    a = route(GateInput(logits), spec)
    assert_pairs(a, {(0, 0): 1.0, (1, 1): 1.0})
    assert (a.rerouted, a.dropped) == (1, 1)


def test_reroute_unnormalized_sigmoid_weight_is_new_experts_score() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0, -2.0]] * 2)
    spec = RoutingSpec(
        policy="sigmoid_group_topk", top_k=1, score_function="sigmoid", normalize_topk=False,
        routed_scaling_factor=2.0, capacity_factor=0.5, overflow="reroute",
    )
    # capacity ceil(0.5 * 2 * 1 / 4) = 1: t0 -> e0 at 2 sig(2); t1 -> e1 at 2 sig(1).
    a = route(GateInput(logits), spec)
    assert_pairs(a, {(0, 0): 2 * sig(2.0), (1, 1): 2 * sig(1.0)})


# ---------------------------------------------------------------- dropless


@pytest.mark.parametrize("factor", [None, 0.1])
def test_dropless_never_drops(factor) -> None:
    # 32 tokens all wanting e0 then e1: e0 and e1 get 32 each, whatever capacity_factor says.
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]] * 32)
    spec = RoutingSpec(policy="topk_softmax", top_k=2, capacity_factor=factor, overflow="dropless")
    a = route(GateInput(logits), spec)
    assert (a.dropped, a.rerouted) == (0, 0)
    assert torch.bincount(a.expert_N, minlength=4).tolist() == [32, 32, 0, 0]
    w = pair_softmax(4.0, 3.0)
    got = as_dict(a)
    assert all(got[(t, 0)] == pytest.approx(w[0]) and got[(t, 1)] == pytest.approx(w[1]) for t in range(32))


# ---------------------------------------------------------------- hypothesis: never over capacity


@st.composite
def capacity_cases(draw):
    t = draw(st.integers(1, 64))
    e = draw(st.integers(2, 16))
    k = draw(st.integers(1, min(4, e)))
    factor = draw(st.floats(0.1, 2.0, allow_nan=False))
    overflow = draw(st.sampled_from(["drop", "reroute"]))
    policy = draw(st.sampled_from(["topk_softmax", "softmax_topk"]))
    logits = draw(arrays(np.float32, (t, e), elements=st.floats(-6, 6, width=32)))
    return t, e, k, factor, overflow, policy, logits


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(capacity_cases())
def test_no_expert_over_capacity(case) -> None:
    t, e, k, factor, overflow, policy, logits = case
    spec = RoutingSpec(policy=policy, top_k=k, capacity_factor=factor, overflow=overflow)
    a = route(GateInput(torch.from_numpy(logits)), spec)
    cap = math.ceil(factor * t * k / e)
    load = torch.bincount(a.expert_N, minlength=e)
    assert int(load.max()) <= cap
    # conservation: every one of the T*k choices is kept or dropped
    assert a.token_N.numel() + a.dropped == t * k
    if overflow == "drop":
        assert a.rerouted == 0
    # no token gets an expert twice, all weights positive
    pairs = set(zip(a.token_N.tolist(), a.expert_N.tolist()))
    assert len(pairs) == a.token_N.numel()
    assert bool((a.weight_N > 0).all())
    if overflow == "reroute":
        # an assignment is dropped only when no expert the token does not already use has room
        final = [set() for _ in range(t)]
        for tok, ex in pairs:
            final[tok].add(ex)
        full = {ex for ex in range(e) if int(load[ex]) == cap}
        for tok in range(t):
            if len(final[tok]) < k:
                assert set(range(e)) - final[tok] <= full, (tok, final[tok], load.tolist(), cap)


@pytest.mark.parametrize("seed", range(4))
def test_drop_gives_first_choices_priority_under_group_limited_routing(seed: int) -> None:
    """sigmoid_group_topk lists a token's experts unsorted (as the reference does): the capacity
    limit still takes every token's best expert (by its selection score) before any second choice,
    so an expert drops a token's best choice only when more best choices than its capacity name it."""
    gen = torch.Generator().manual_seed(seed)
    t, e, cap_factor = 64, 16, 1.0
    spec = RoutingSpec(policy="sigmoid_group_topk", top_k=4, num_groups=4, topk_groups=2, score_function="sigmoid",
                       correction_bias=True, capacity_factor=cap_factor, overflow="drop")
    logits, bias = torch.randn(t, e, generator=gen), torch.randn(e, generator=gen) * 0.1
    a = route(GateInput(logits_TE=logits, correction_bias_E=bias), spec)
    capacity = capacity_for(t, spec, e)
    dropless = route(GateInput(logits_TE=logits, correction_bias_E=bias), dataclasses.replace(spec, overflow="dropless"))
    chosen = torch.full((t, e), float("-inf"))
    chosen[dropless.token_N, dropless.expert_N] = (torch.sigmoid(logits) + bias)[dropless.token_N, dropless.expert_N]
    best_T = chosen.argmax(dim=1)
    kept = set(zip(a.token_N.tolist(), a.expert_N.tolist()))
    wanted_E = torch.bincount(best_T, minlength=e)
    kept_best_E = torch.bincount(torch.tensor([int(b) for i, b in enumerate(best_T.tolist()) if (i, b) in kept], dtype=torch.int64), minlength=e)
    assert torch.equal(kept_best_E, wanted_E.clamp(max=capacity)), (wanted_E.tolist(), kept_best_E.tolist(), capacity)
