"""routing_stats on hand-built Assignments: every number computed by hand with math."""

from __future__ import annotations

import math

import pytest
import torch

from expert_workers.spec import RoutingSpec
from router_svc.gate import Assignments, GateInput, route, routing_stats

pytestmark = pytest.mark.unit


def softmax_rows(rows: list[list[float]]) -> list[list[float]]:
    out = []
    for row in rows:
        z = sum(math.exp(v) for v in row)
        out.append([math.exp(v) / z for v in row])
    return out


def lse(row: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in row))


def make(tokens: list[int], experts: list[int], logits: list[list[float]], probs=None, dropped=0, rerouted=0) -> Assignments:
    if probs is None:
        probs = softmax_rows(logits)
    return Assignments(
        token_N=torch.tensor(tokens, dtype=torch.int64),
        expert_N=torch.tensor(experts, dtype=torch.int64),
        weight_N=torch.ones(len(tokens)),
        probs_TE=torch.tensor(probs, dtype=torch.float32),
        logits_TE=torch.tensor(logits, dtype=torch.float32),
        dropped=dropped,
        rerouted=rerouted,
    )


# T=4, E=4 logits used by several cases.
LOGITS = [
    [1.0, 0.0, -1.0, 0.5],
    [0.0, 2.0, 0.0, 0.0],
    [-0.5, 0.5, 1.5, 0.0],
    [0.3, 0.3, 0.3, 2.0],
]


def test_perfectly_even_load() -> None:
    a = make([0, 1, 2, 3], [0, 1, 2, 3], LOGITS)
    s = routing_stats(a, 4)
    assert s.tokens_per_expert == (1, 1, 1, 1)
    assert s.utilisation_entropy == pytest.approx(1.0, abs=1e-12)
    assert s.max_over_mean_load == pytest.approx(1.0, abs=1e-12)


def test_all_on_one_expert() -> None:
    a = make([0, 1, 2, 3], [2, 2, 2, 2], LOGITS)
    s = routing_stats(a, 4)
    assert s.tokens_per_expert == (0, 0, 4, 0)
    assert s.utilisation_entropy == pytest.approx(0.0, abs=1e-12)
    # busiest load 4 over mean load (4 / 4 = 1) = 4
    assert s.max_over_mean_load == pytest.approx(4.0)


def test_uneven_load_entropy_and_max_over_mean() -> None:
    # counts (2, 1, 1, 0) of 4: fractions (1/2, 1/4, 1/4, 0)
    # H = -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2;  H / ln 4 = 0.75
    a = make([0, 1, 2, 3], [0, 0, 1, 2], LOGITS)
    s = routing_stats(a, 4)
    assert s.tokens_per_expert == (2, 1, 1, 0)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert s.utilisation_entropy == pytest.approx(h / math.log(4), rel=1e-12)
    assert s.utilisation_entropy == pytest.approx(0.75, rel=1e-12)
    assert s.max_over_mean_load == pytest.approx(2.0 / 1.0)


def test_load_balancing_loss_hand_computed() -> None:
    # k = 2, T = 4: assignments (token, expert)
    tokens = [0, 0, 1, 1, 2, 2, 3, 3]
    experts = [0, 3, 1, 0, 2, 1, 3, 0]
    a = make(tokens, experts, LOGITS)
    probs = softmax_rows(LOGITS)
    f = [3 / 8, 2 / 8, 1 / 8, 2 / 8]  # fractions of assignments per expert
    p = [sum(probs[t][i] for t in range(4)) / 4 for i in range(4)]  # mean router probability
    expected = 4 * sum(fi * pi for fi, pi in zip(f, p))
    s = routing_stats(a, 4)
    assert s.tokens_per_expert == (3, 2, 1, 2)
    assert s.load_balancing_loss == pytest.approx(expected, rel=1e-6)


def test_load_balancing_loss_is_one_when_balanced() -> None:
    probs = [[0.25] * 4] * 4
    a = make([0, 1, 2, 3], [3, 2, 1, 0], [[0.0] * 4] * 4, probs=probs)
    assert routing_stats(a, 4).load_balancing_loss == pytest.approx(1.0, rel=1e-12)


def test_load_balancing_loss_with_explicit_probs() -> None:
    # probs given directly (not a softmax of the logits), to pin which tensor is used.
    probs = [[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]
    a = make([0, 1], [0, 0], [[0.0] * 4] * 2, probs=probs)
    # f = (1, 0, 0, 0); P_0 = (0.7 + 0.4) / 2 = 0.55; loss = 4 * 0.55 = 2.2
    assert routing_stats(a, 4).load_balancing_loss == pytest.approx(2.2, rel=1e-6)


def test_z_loss_is_mean_squared_logsumexp() -> None:
    a = make([0, 1, 2, 3], [0, 1, 2, 3], LOGITS)
    expected = sum(lse(row) ** 2 for row in LOGITS) / len(LOGITS)
    assert routing_stats(a, 4).z_loss == pytest.approx(expected, rel=1e-6)


def test_z_loss_zero_logits() -> None:
    # logsumexp of E zeros = ln E
    a = make([0, 1], [0, 1], [[0.0] * 8] * 2)
    assert routing_stats(a, 8).z_loss == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_dropped_and_rerouted_pass_through() -> None:
    a = make([0, 1], [1, 1], LOGITS[:2], dropped=3, rerouted=2)
    s = routing_stats(a, 4)
    assert (s.dropped, s.rerouted) == (3, 2)
    assert s.tokens_per_expert == (0, 2, 0, 0)


def test_stats_from_route_with_drops() -> None:
    # 4 tokens all wanting e0, E=2, k=1, factor 0.5: capacity ceil(0.5 * 4 / 2) = 1.
    logits = torch.tensor([[1.0, 0.0]] * 4)
    spec = RoutingSpec(policy="topk_softmax", top_k=1, capacity_factor=0.5, overflow="drop")
    s = routing_stats(route(GateInput(logits), spec), 2)
    assert s.tokens_per_expert == (1, 0)
    assert s.dropped == 3
    assert s.utilisation_entropy == pytest.approx(0.0, abs=1e-12)
    # f = (1, 0), P_0 = e / (e + 1): loss = 2 * e / (e + 1)
    assert s.load_balancing_loss == pytest.approx(2 * math.e / (math.e + 1), rel=1e-6)
    assert s.max_over_mean_load == pytest.approx(2.0)


def test_no_assignments_gives_zeros() -> None:
    a = make([], [], [[0.0, 1.0, 2.0]])
    s = routing_stats(a, 3)
    assert s.tokens_per_expert == (0, 0, 0)
    assert (s.utilisation_entropy, s.load_balancing_loss, s.z_loss, s.max_over_mean_load) == (0.0, 0.0, 0.0, 0.0)


def test_single_expert_entropy_is_one() -> None:
    a = make([0, 1], [0, 0], [[0.0], [1.0]])
    s = routing_stats(a, 1)
    assert s.tokens_per_expert == (2,)
    assert s.utilisation_entropy == pytest.approx(1.0)
    assert s.load_balancing_loss == pytest.approx(1.0)
