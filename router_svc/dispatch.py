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


@dataclass(frozen=True)
class GroupPlan:
    """Assignments sorted by (group, local slot): rows of group g are contiguous, its slots in order.

    token_N/weight_N: per sorted row; parts: (group, start, end, experts, counts) per group with rows.
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    parts: tuple  # tuple[transports.base.Part, ...]; typed loosely to keep this module transport-free


def plan_by_group(token_N: torch.Tensor, expert_N: torch.Tensor, weight_N: torch.Tensor, *,
                  group_of: torch.Tensor, local_of: torch.Tensor, orders: list[list[int]],
                  part_type: type) -> GroupPlan:
    """Map each assignment's expert (index num_experts = the shared slot) to its (group, local slot) and sort.

    One stable sort and one bincount; the only host sync is reading the per-slot counts.
    """
    g_N = group_of[expert_N]
    if bool((g_N < 0).any()):
        missing = sorted({int(e) for e in expert_N[g_N < 0].tolist()})
        raise LookupError(f"no expert group hosts experts {missing}")
    return plan_rows(token_N, weight_N, g_N, local_of[expert_N], orders=orders, part_type=part_type)


def plan_rows(token_N: torch.Tensor, weight_N: torch.Tensor, g_N: torch.Tensor, l_N: torch.Tensor, *,
              orders: list[list[int]], part_type: type) -> GroupPlan:
    """Sort assignments already mapped to (group g_N, local slot l_N) into one contiguous part per group."""
    local_of = l_N if l_N.numel() else torch.zeros(1, dtype=torch.int64)
    # NOTE: rows are sized by the longest slot order, which replicas can make longer than any index in use.
    slots = max(max((len(o) for o in orders), default=1), int(local_of.max()) + 1)
    key_N = g_N * slots + l_N
    key_sorted, order = torch.sort(key_N, stable=True)
    counts_GS = torch.bincount(key_sorted, minlength=len(orders) * slots).view(len(orders), slots).tolist()
    parts, start = [], 0
    for g, row in enumerate(counts_GS):
        n = sum(row)
        if n == 0:
            continue
        experts = tuple(e for i, e in enumerate(orders[g]) if row[i])
        counts = tuple(c for c in row if c)
        parts.append(part_type(group=g, start=start, end=start + n, experts=experts, counts=counts))
        start += n
    return GroupPlan(token_N=token_N[order], weight_N=weight_N[order], parts=tuple(parts))
