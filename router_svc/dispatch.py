"""Plan and combine: sort assignments into one contiguous batch per expert, and back.

Legend: T tokens, D hidden, E experts, N assignments. No per-token Python loops:
the plan is one stable sort (a permutation) and the combine one index_add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router_svc.gate.policies import Assignments


@dataclass(frozen=True)
class ExpertPlan:
    """Assignments sorted by expert.

    token_N: source token of each sorted row; expert_N/weight_N: its expert and
    weight; counts_E: rows per expert (rows of expert e are contiguous, in order).
    """

    token_N: torch.Tensor
    expert_N: torch.Tensor
    weight_N: torch.Tensor
    counts_E: torch.Tensor


def plan_by_expert(a: Assignments, num_experts: int) -> ExpertPlan:
    expert_N, order = torch.sort(a.expert_N, stable=True)
    return ExpertPlan(
        token_N=a.token_N[order],
        expert_N=expert_N,
        weight_N=a.weight_N[order],
        counts_E=torch.bincount(expert_N, minlength=num_experts),
    )


def gather_rows(x_TD: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """The sorted batch: (T, D) -> (N, D)."""
    return x_TD.index_select(0, plan.token_N)


def combine(y_ND: torch.Tensor, plan: ExpertPlan, tokens: int) -> torch.Tensor:
    """Weighted sum of expert outputs per token: (N, D) -> (T, D).

    Tokens with no assignment (dropped) get zero; the caller's residual carries them.
    """
    out_TD = y_ND.new_zeros((tokens, y_ND.shape[1]))
    weighted = y_ND * plan.weight_N.to(y_ND.dtype)[:, None]
    return out_TD.index_add_(0, plan.token_N, weighted)
