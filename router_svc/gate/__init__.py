"""The gate: router logits -> policy -> capacity -> final (token, expert, weight) assignments."""

from __future__ import annotations

import torch

from expert_workers.spec import RoutingSpec
from router_svc.gate.capacity import apply_capacity, capacity_for
from router_svc.gate.policies import POLICIES, Assignments, GateDecision, GateInput
from router_svc.gate.stats import RoutingStats, routing_stats

__all__ = [
    "POLICIES", "Assignments", "GateDecision", "GateInput", "RoutingStats",
    "apply_capacity", "capacity_for", "route", "routing_stats",
]


def route(inp: GateInput, spec: RoutingSpec) -> Assignments:
    """Run the configured policy and, for token-choice policies, the capacity limit.

    inp.logits_TE (T, E) must be float32; the result's triples hold N assignments.
    """
    decision = POLICIES[spec.policy](inp, spec)
    if isinstance(decision, Assignments):
        return decision
    return apply_capacity(decision, inp.logits_TE, spec)
