"""The gate: router logits -> policy -> capacity -> final (token, expert, weight) assignments."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expert_workers.spec import RoutingSpec
from router_svc.gate.capacity import apply_capacity, capacity_for
from router_svc.gate.policies import POLICIES, Assignments, GateDecision, GateInput
from router_svc.gate.stats import RoutingStats, routing_stats

__all__ = [
    "POLICIES", "Assignments", "GateDecision", "GateInput", "RoutingStats",
    "apply_capacity", "capacity_for", "route", "router_logits", "routing_stats",
]


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """(T, D) hidden states -> (T, E) float32 logits, computed in the dtype the family's reference
    computes them in (`spec.logits_dtype`): in half precision that decides which experts a token
    gets near a tie, so it follows the reference, not the more precise choice."""
    if spec.logits_dtype == "compute":
        return F.linear(x_TD, weight_ED.to(x_TD.dtype)).float()
    return F.linear(x_TD.float(), weight_ED.float())


def route(inp: GateInput, spec: RoutingSpec) -> Assignments:
    """Run the configured policy and, for token-choice policies, the capacity limit.

    inp.logits_TE (T, E) must be float32; the result's triples hold N assignments.
    """
    decision = POLICIES[spec.policy](inp, spec)
    if isinstance(decision, Assignments):
        return decision
    return apply_capacity(decision, inp.logits_TE, spec)
