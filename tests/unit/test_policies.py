"""Routing policies on small hand-computed cases.

Every expected id below was read off the logits by hand and every expected
weight is written as plain arithmetic (math.exp, 1 / (1 + exp(-x))), never by
calling the torch code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from expert_workers.errors import InvalidRequestError
from expert_workers.spec import RoutingSpec
from router_svc.gate import POLICIES, Assignments, GateDecision, GateInput, route

pytestmark = pytest.mark.unit


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t32(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def as_dict(a: Assignments) -> dict[tuple[int, int], float]:
    """Assignments -> {(token, expert): weight}; fails on a duplicated pair."""
    out: dict[tuple[int, int], float] = {}
    for t, e, w in zip(a.token_N.tolist(), a.expert_N.tolist(), a.weight_N.tolist()):
        assert (t, e) not in out, f"token {t} got expert {e} twice"
        out[(t, e)] = w
    return out


def assert_pairs(a: Assignments, expected: dict[tuple[int, int], float], **tol) -> None:
    got = as_dict(a)
    assert set(got) == set(expected)
    keys = sorted(expected)
    torch.testing.assert_close(
        torch.tensor([got[k] for k in keys], dtype=torch.float64),
        torch.tensor([expected[k] for k in keys], dtype=torch.float64),
        **(tol or {"rtol": 1e-6, "atol": 1e-7}),
    )


def sorted_by_id(dec: GateDecision) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) with each row's experts in ascending id order (for unsorted top-k)."""
    ids, order = torch.sort(dec.topk_ids_TK, dim=-1)
    return ids, dec.topk_weights_TK.gather(1, order)


# T=3 tokens, E=4 experts. Per-row ranking by logit (read off by hand):
#   row 0: e1 (2.0) > e0 (1.0) > e2 (0.5) > e3 (-1.0)
#   row 1: e2 (3.0) > e3 (1.0) > e0 = e1 (0.0)
#   row 2: e3 (2.5) > e1 (1.5) > e2 (1.0) > e0 (-2.0)
LOGITS = [
    [1.0, 2.0, 0.5, -1.0],
    [0.0, 0.0, 3.0, 1.0],
    [-2.0, 1.5, 1.0, 2.5],
]
TOP2_IDS = [[1, 0], [2, 3], [3, 1]]


def _softmax_over(row: list[float], pick: list[int]) -> list[float]:
    z = sum(math.exp(row[i]) for i in pick)
    return [math.exp(row[i]) / z for i in pick]


def _softmax_full(row: list[float], pick: list[int]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(row[i]) / z for i in pick]


# ---------------------------------------------------------------- softmax_topk


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_is_softmax_over_the_k_best_logits(normalize: bool) -> None:
    # Mixtral: the weights are a softmax over the k chosen logits whatever normalize_topk says.
    spec = RoutingSpec(policy="softmax_topk", top_k=2, normalize_topk=normalize)
    dec = POLICIES["softmax_topk"](GateInput(t32(LOGITS)), spec)
    expected_w = [
        [math.exp(2.0) / (math.exp(2.0) + math.exp(1.0)), math.exp(1.0) / (math.exp(2.0) + math.exp(1.0))],
        [math.exp(3.0) / (math.exp(3.0) + math.exp(1.0)), math.exp(1.0) / (math.exp(3.0) + math.exp(1.0))],
        [math.exp(2.5) / (math.exp(2.5) + math.exp(1.5)), math.exp(1.5) / (math.exp(2.5) + math.exp(1.5))],
    ]
    assert dec.topk_ids_TK.tolist() == TOP2_IDS
    torch.testing.assert_close(dec.topk_weights_TK, t32(expected_w))


def test_softmax_topk_k3_and_routed_scaling_factor() -> None:
    spec = RoutingSpec(policy="softmax_topk", top_k=3, routed_scaling_factor=2.5)
    dec = POLICIES["softmax_topk"](GateInput(t32(LOGITS)), spec)
    # Row 1 has a tie for third place (e0 = e1 = 0.0); only rows 0 and 2 are checked for ids.
    assert dec.topk_ids_TK[0].tolist() == [1, 0, 2]
    assert dec.topk_ids_TK[2].tolist() == [3, 1, 2]
    z0 = math.exp(2.0) + math.exp(1.0) + math.exp(0.5)
    z2 = math.exp(2.5) + math.exp(1.5) + math.exp(1.0)
    torch.testing.assert_close(
        dec.topk_weights_TK[[0, 2]],
        t32([
            [2.5 * math.exp(2.0) / z0, 2.5 * math.exp(1.0) / z0, 2.5 * math.exp(0.5) / z0],
            [2.5 * math.exp(2.5) / z2, 2.5 * math.exp(1.5) / z2, 2.5 * math.exp(1.0) / z2],
        ]),
    )
    # The tied row still gets e2, e3 and one of the tied experts, weighted by its logit (0.0).
    assert dec.topk_ids_TK[1, :2].tolist() == [2, 3]
    assert int(dec.topk_ids_TK[1, 2]) in (0, 1)
    z1 = math.exp(3.0) + math.exp(1.0) + math.exp(0.0)
    torch.testing.assert_close(
        dec.topk_weights_TK[1], t32([2.5 * math.exp(3.0) / z1, 2.5 * math.exp(1.0) / z1, 2.5 * 1.0 / z1])
    )


def test_softmax_topk_probs_are_the_full_softmax() -> None:
    spec = RoutingSpec(policy="softmax_topk", top_k=2)
    dec = POLICIES["softmax_topk"](GateInput(t32(LOGITS)), spec)
    expected = [_softmax_full(row, [0, 1, 2, 3]) for row in LOGITS]
    torch.testing.assert_close(dec.probs_TE, t32(expected))


def test_softmax_topk_through_route_gives_k_triples_per_token() -> None:
    spec = RoutingSpec(policy="softmax_topk", top_k=2)
    a = route(GateInput(t32(LOGITS)), spec)
    expected = {}
    for t, ids in enumerate(TOP2_IDS):
        for e, w in zip(ids, _softmax_over(LOGITS[t], ids)):
            expected[(t, e)] = w
    assert_pairs(a, expected)
    assert (a.dropped, a.rerouted) == (0, 0)


# ---------------------------------------------------------------- topk_softmax


def test_topk_softmax_normalized_equals_softmax_over_k() -> None:
    spec = RoutingSpec(policy="topk_softmax", top_k=2, normalize_topk=True)
    dec = POLICIES["topk_softmax"](GateInput(t32(LOGITS)), spec)
    assert dec.topk_ids_TK.tolist() == TOP2_IDS
    torch.testing.assert_close(
        dec.topk_weights_TK, t32([_softmax_over(LOGITS[t], TOP2_IDS[t]) for t in range(3)])
    )


def test_topk_softmax_unnormalized_keeps_full_softmax_probs() -> None:
    # OLMoE: weights are the probabilities over all E experts, not renormalised.
    spec = RoutingSpec(policy="topk_softmax", top_k=2, normalize_topk=False)
    dec = POLICIES["topk_softmax"](GateInput(t32(LOGITS)), spec)
    z0 = math.exp(1.0) + math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)
    z1 = 1.0 + 1.0 + math.exp(3.0) + math.exp(1.0)
    z2 = math.exp(-2.0) + math.exp(1.5) + math.exp(1.0) + math.exp(2.5)
    expected = [
        [math.exp(2.0) / z0, math.exp(1.0) / z0],
        [math.exp(3.0) / z1, math.exp(1.0) / z1],
        [math.exp(2.5) / z2, math.exp(1.5) / z2],
    ]
    assert dec.topk_ids_TK.tolist() == TOP2_IDS
    torch.testing.assert_close(dec.topk_weights_TK, t32(expected))
    # ... and they do not sum to one.
    assert all(abs(sum(r) - 1.0) > 0.05 for r in expected)


def test_topk_softmax_unnormalized_with_scaling() -> None:
    spec = RoutingSpec(policy="topk_softmax", top_k=1, normalize_topk=False, routed_scaling_factor=3.0)
    dec = POLICIES["topk_softmax"](GateInput(t32(LOGITS)), spec)
    assert dec.topk_ids_TK.tolist() == [[1], [2], [3]]
    expected = [[3.0 * _softmax_full(LOGITS[t], [TOP2_IDS[t][0]])[0]] for t in range(3)]
    torch.testing.assert_close(dec.topk_weights_TK, t32(expected))


def test_topk_softmax_k1_normalized_weight_is_one() -> None:
    spec = RoutingSpec(policy="topk_softmax", top_k=1, normalize_topk=True)
    dec = POLICIES["topk_softmax"](GateInput(t32(LOGITS)), spec)
    assert dec.topk_ids_TK.tolist() == [[1], [2], [3]]
    torch.testing.assert_close(dec.topk_weights_TK, t32([[1.0], [1.0], [1.0]]))


# ---------------------------------------------------------------- sigmoid_group_topk

# One token, E=4: logits 0, 1, 0.5, -0.5. Unbiased sigmoid ranking: e1 > e2 > e0 > e3.
SIG_LOGITS = [[0.0, 1.0, 0.5, -0.5]]
# With the bias, selection scores are sig(x) + b:
#   e0: 0.5 + 0 = 0.5;  e1: 0.731 - 0.5 = 0.231;  e2: 0.622 + 0 = 0.622;  e3: 0.378 + 0.3 = 0.678
# so the biased top-2 is {e2, e3}, not the unbiased {e1, e2}.
SIG_BIAS = [0.0, -0.5, 0.0, 0.3]


def test_sigmoid_topk_without_bias_picks_by_sigmoid_score() -> None:
    spec = RoutingSpec(policy="sigmoid_group_topk", top_k=2, score_function="sigmoid", routed_scaling_factor=1.0)
    ids, w = sorted_by_id(POLICIES["sigmoid_group_topk"](GateInput(t32(SIG_LOGITS)), spec))
    s1, s2 = sig(1.0), sig(0.5)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w, t32([[s1 / (s1 + s2), s2 / (s1 + s2)]]))


@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_correction_bias_selects_but_does_not_weigh(normalize: bool) -> None:
    spec = RoutingSpec(
        policy="sigmoid_group_topk", top_k=2, score_function="sigmoid",
        correction_bias=True, routed_scaling_factor=2.5, normalize_topk=normalize,
    )
    inp = GateInput(t32(SIG_LOGITS), correction_bias_E=t32(SIG_BIAS))
    ids, w = sorted_by_id(POLICIES["sigmoid_group_topk"](inp, spec))
    s2, s3 = sig(0.5), sig(-0.5)  # the UNBIASED scores of the chosen experts
    assert ids.tolist() == [[2, 3]]
    if normalize:
        expected = [[2.5 * s2 / (s2 + s3), 2.5 * s3 / (s2 + s3)]]
    else:
        expected = [[2.5 * s2, 2.5 * s3]]
    torch.testing.assert_close(w, t32(expected))


def test_sigmoid_correction_bias_through_route() -> None:
    spec = RoutingSpec(
        policy="sigmoid_group_topk", top_k=2, score_function="sigmoid", correction_bias=True, routed_scaling_factor=2.5,
    )
    a = route(GateInput(t32(SIG_LOGITS), correction_bias_E=t32(SIG_BIAS)), spec)
    s2, s3 = sig(0.5), sig(-0.5)
    assert_pairs(a, {(0, 2): 2.5 * s2 / (s2 + s3), (0, 3): 2.5 * s3 / (s2 + s3)})
    # Statistics' probs are the unbiased scores normalised to sum to 1.
    s = [sig(v) for v in SIG_LOGITS[0]]
    torch.testing.assert_close(a.probs_TE, t32([[v / sum(s) for v in s]]))


# E=8 in 4 groups of 2, topk_groups=2. Group score = sum of its two sigmoid scores:
#   g0 = sig(5) + sig(-5) = 1.000;  g1 = sig(1.2) + sig(0.9) = 1.479
#   g2 = sig(1.0) + sig(0.6) = 1.377;  g3 = sig(-1) + sig(-1) = 0.538
# Top groups g1, g2; within them the top-2 experts are e2 (sig 1.2) and e4 (sig 1.0).
# Expert e0 has the highest score of all (sig(5)) but lies outside the chosen groups.
GROUP_LOGITS = [
    [5.0, -5.0, 1.2, 0.9, 1.0, 0.6, -1.0, -1.0],
    # second token: g3 = sig(3)+sig(2.5) = 1.876, g0 = sig(2)+sig(-3) = 0.928, g1 = sig(0)+sig(0.5) = 1.122,
    # g2 = sig(-2)+sig(-2) = 0.238 -> groups g3, g1; top-2 experts e6 (3.0), e7 (2.5); e0 (2.0) excluded.
    [2.0, -3.0, 0.0, 0.5, -2.0, -2.0, 3.0, 2.5],
]


def test_group_limited_selection_never_leaves_the_top_groups() -> None:
    spec = RoutingSpec(
        policy="sigmoid_group_topk", top_k=2, num_groups=4, topk_groups=2, score_function="sigmoid",
    )
    dec = POLICIES["sigmoid_group_topk"](GateInput(t32(GROUP_LOGITS)), spec)
    ids, w = sorted_by_id(dec)
    assert ids.tolist() == [[2, 4], [6, 7]]
    a, b = sig(1.2), sig(1.0)
    c, d = sig(3.0), sig(2.5)
    torch.testing.assert_close(w, t32([[a / (a + b), b / (a + b)], [c / (c + d), d / (c + d)]]))
    # experts outside the chosen groups are not selectable at all (select score -inf)
    allowed = torch.isfinite(dec.select_scores_TE)
    assert allowed.tolist() == [
        [False, False, True, True, True, True, False, False],
        [False, False, True, True, False, False, True, True],
    ]


def test_group_limited_k3_takes_the_rest_of_the_groups_not_the_global_best() -> None:
    spec = RoutingSpec(
        policy="sigmoid_group_topk", top_k=3, num_groups=4, topk_groups=2, score_function="sigmoid",
    )
    ids, w = sorted_by_id(POLICIES["sigmoid_group_topk"](GateInput(t32(GROUP_LOGITS[:1])), spec))
    assert ids.tolist() == [[2, 3, 4]]
    s = [sig(1.2), sig(0.9), sig(1.0)]
    torch.testing.assert_close(w, t32([[v / sum(s) for v in s]]))


def test_group_selection_uses_biased_scores() -> None:
    # Without bias token 0 picks groups g1, g2 (see GROUP_LOGITS). A bias of +1.0 on e6 and +0.8
    # on e7 lifts g3 to (sig(-1) + 1.0) + (sig(-1) + 0.8) = 2.338, so the groups are g3 and g1; the
    # biased top-2 inside them is e6 (1.269), e7 (1.069). The weights use the unbiased scores,
    # sig(-1) each, so they are 0.5 / 0.5 (biased scores would give 0.543 / 0.457).
    spec = RoutingSpec(
        policy="sigmoid_group_topk", top_k=2, num_groups=4, topk_groups=2, score_function="sigmoid",
        correction_bias=True,
    )
    bias = t32([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.8])
    ids, w = sorted_by_id(POLICIES["sigmoid_group_topk"](GateInput(t32(GROUP_LOGITS[:1]), correction_bias_E=bias), spec))
    assert ids.tolist() == [[6, 7]]
    torch.testing.assert_close(w, t32([[0.5, 0.5]]))  # sig(-1) / (2 sig(-1))


# ---------------------------------------------------------------- expert_choice

# T=3, E=4. Softmax probabilities per token (hand values):
#   t0 = [2, 0, 1, -1]   -> [0.644, 0.087, 0.237, 0.032]
#   t1 = [0, 2, 1, 0.5]  -> [0.078, 0.579, 0.213, 0.129]
#   t2 = [1, 1, -1, 2]   -> [0.206, 0.206, 0.028, 0.560]
EC_LOGITS = [[2.0, 0.0, 1.0, -1.0], [0.0, 2.0, 1.0, 0.5], [1.0, 1.0, -1.0, 2.0]]


def _ec_prob(t: int, e: int) -> float:
    return _softmax_full(EC_LOGITS[t], [e])[0]


def test_expert_choice_each_expert_takes_its_top_c_tokens() -> None:
    # c = ceil(1.0 * 3 * 2 / 4) = 2. Columns, best first:
    #   e0: t0 .644, t2 .206 | e1: t1 .579, t2 .206 | e2: t0 .237, t1 .213 | e3: t2 .560, t1 .129
    spec = RoutingSpec(policy="expert_choice", top_k=2)
    a = route(GateInput(t32(EC_LOGITS)), spec)
    picks = [(0, 0), (2, 0), (1, 1), (2, 1), (0, 2), (1, 2), (2, 3), (1, 3)]
    assert_pairs(a, {(t, e): _ec_prob(t, e) for t, e in picks})
    # a token may get any number of experts: t0 gets 2, t1 gets 3, t2 gets 3
    assert torch.bincount(a.token_N, minlength=3).tolist() == [2, 3, 3]
    assert torch.bincount(a.expert_N, minlength=4).tolist() == [2, 2, 2, 2]


def test_expert_choice_capacity_factor_and_scaling() -> None:
    # c = ceil(0.5 * 3 * 2 / 4) = ceil(0.75) = 1: each expert takes its single best token.
    spec = RoutingSpec(policy="expert_choice", top_k=2, capacity_factor=0.5, routed_scaling_factor=2.0)
    a = route(GateInput(t32(EC_LOGITS)), spec)
    picks = [(0, 0), (1, 1), (0, 2), (2, 3)]
    assert_pairs(a, {(t, e): 2.0 * _ec_prob(t, e) for t, e in picks})


def test_expert_choice_capacity_is_capped_at_tokens() -> None:
    # ceil(4.0 * 3 * 2 / 4) = 6 > T = 3, so c = 3: every expert takes every token once.
    spec = RoutingSpec(policy="expert_choice", top_k=2, capacity_factor=4.0)
    a = route(GateInput(t32(EC_LOGITS)), spec)
    assert_pairs(a, {(t, e): _ec_prob(t, e) for t in range(3) for e in range(4)})


# ---------------------------------------------------------------- hash


def _hash_dec(token_ids: list[int], k: int, e: int = 8, logits=None, scale: float = 1.0) -> GateDecision:
    spec = RoutingSpec(policy="hash", top_k=k, routed_scaling_factor=scale)
    if logits is None:
        logits = torch.zeros(len(token_ids), e)
    return POLICIES["hash"](GateInput(logits, token_ids_T=torch.tensor(token_ids, dtype=torch.int64)), spec)


def test_hash_same_token_id_same_experts_anywhere() -> None:
    ids = [5, 9, 5, 123456, 9, 5]
    dec = _hash_dec(ids, k=3)
    rows = dec.topk_ids_TK.tolist()
    assert rows[0] == rows[2] == rows[5]
    assert rows[1] == rows[4]
    # independent of position, batch and logits
    alone = _hash_dec([5], k=3, logits=torch.randn(1, 8, generator=torch.Generator().manual_seed(1)))
    assert alone.topk_ids_TK.tolist() == [rows[0]]
    again = _hash_dec([123456, 5], k=3, logits=torch.full((2, 8), 7.0))
    assert again.topk_ids_TK.tolist() == [rows[3], rows[0]]


def test_hash_distinct_experts_and_equal_weights() -> None:
    token_ids = list(range(64))
    for k in (1, 2, 4):
        dec = _hash_dec(token_ids, k=k, e=8)
        for row in dec.topk_ids_TK.tolist():
            assert len(set(row)) == k
            assert all(0 <= e < 8 for e in row)
        torch.testing.assert_close(dec.topk_weights_TK, torch.full((64, k), 1.0 / k))
    # the ranking is not constant over token ids
    dec = _hash_dec(token_ids, k=1, e=8)
    assert len(set(dec.topk_ids_TK.flatten().tolist())) > 1


def test_hash_weights_times_scaling_factor_through_route() -> None:
    spec = RoutingSpec(policy="hash", top_k=2, routed_scaling_factor=3.0)
    a = route(GateInput(torch.zeros(4, 6), token_ids_T=torch.tensor([1, 2, 3, 1])), spec)
    torch.testing.assert_close(a.weight_N, torch.full((8,), 3.0 / 2))
    got = as_dict(a)
    assert {e for (t, e) in got if t == 0} == {e for (t, e) in got if t == 3}


def test_hash_without_token_ids_is_a_clear_error() -> None:
    spec = RoutingSpec(policy="hash", top_k=2)
    with pytest.raises(InvalidRequestError, match="token ids"):
        POLICIES["hash"](GateInput(torch.zeros(3, 4)), spec)
    with pytest.raises(InvalidRequestError, match="token ids"):
        route(GateInput(torch.zeros(3, 4)), spec)


# ---------------------------------------------------------------- noisy_topk


@pytest.mark.parametrize("noisy,std", [(False, 1.0), (False, 100.0), (True, 0.0)])
def test_noisy_topk_without_noise_is_softmax_topk(noisy: bool, std: float) -> None:
    spec = RoutingSpec(policy="noisy_topk", top_k=2, noisy=noisy, noise_std=std, noise_seed=3)
    dec = POLICIES["noisy_topk"](GateInput(t32(LOGITS)), spec)
    assert dec.topk_ids_TK.tolist() == TOP2_IDS
    torch.testing.assert_close(
        dec.topk_weights_TK, t32([_softmax_over(LOGITS[t], TOP2_IDS[t]) for t in range(3)])
    )


def _noisy(seed: int | None, std: float = 100.0) -> GateDecision:
    logits = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1, 0.0]] * 16)
    spec = RoutingSpec(policy="noisy_topk", top_k=2, noisy=True, noise_std=std, noise_seed=seed)
    return POLICIES["noisy_topk"](GateInput(logits), spec)


def test_noisy_topk_reproducible_with_seed() -> None:
    a, b = _noisy(7), _noisy(7)
    assert torch.equal(a.topk_ids_TK, b.topk_ids_TK)
    assert torch.equal(a.topk_weights_TK, b.topk_weights_TK)
    c = _noisy(8)
    assert not torch.equal(a.topk_ids_TK, c.topk_ids_TK)


def test_noisy_topk_with_large_noise_differs_from_clean() -> None:
    # every clean row picks e0, e1 with softmax weights over (0.5, 0.4)
    noisy = _noisy(7)
    assert not bool((noisy.topk_ids_TK == torch.tensor([0, 1])).all())
    # the noisy weights are still a softmax over two values: each row sums to 1
    torch.testing.assert_close(noisy.topk_weights_TK.sum(-1), torch.ones(16))
    clean_w = math.exp(0.5) / (math.exp(0.5) + math.exp(0.4))
    assert (noisy.topk_weights_TK[:, 0] - clean_w).abs().max() > 0.1


def test_noisy_topk_does_not_touch_the_callers_logits() -> None:
    logits = t32(LOGITS)
    before = logits.clone()
    spec = RoutingSpec(policy="noisy_topk", top_k=2, noisy=True, noise_std=5.0, noise_seed=0)
    POLICIES["noisy_topk"](GateInput(logits), spec)
    assert torch.equal(logits, before)


def test_policy_table_names_every_routing_policy() -> None:
    from expert_workers.spec import ROUTING_POLICIES

    assert set(POLICIES) == set(ROUTING_POLICIES)
