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


def combine(y_ND: torch.Tensor, plan: "ExpertPlan | GroupPlan", tokens: int, weights_dtype: str = "float32") -> torch.Tensor:
    """Weighted sum of expert outputs per token: (N, D) -> (T, D), rows in the plan's order (by expert
    in LocalMoE, by group in the router).

    Tokens with no assignment (dropped) get zero; the caller's residual carries them.
    """
    out_TD = y_ND.new_zeros((tokens, y_ND.shape[1]))
    return out_TD.index_add_(0, plan.token_N, _weigh(y_ND, plan.weight_N, weights_dtype))


def _weigh(y_ND: torch.Tensor, weight_N: torch.Tensor, weights_dtype: str) -> torch.Tensor:
    """Each expert output row times its weight, in the dtype `RoutingSpec.weights_dtype` names
    (the result in y's dtype); in float32 or wider both are the same product."""
    if weights_dtype == "compute" or y_ND.dtype.itemsize >= 4:
        return y_ND * weight_N.to(y_ND.dtype)[:, None]
    return (y_ND.float() * weight_N.float()[:, None]).to(y_ND.dtype)


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


# -- copies and lost experts (the router's plan over the live routing table) ----------------------

def split_copies(expert_N: torch.Tensor, cum_ER: torch.Tensor, min_rows: int = 1, credit_ER: torch.Tensor | None = None) -> torch.Tensor:
    """Which live copy takes each assignment. An expert's n assignments in this batch go to at most
    ceil(n / min_rows) of its copies (a copy reads all of the expert's weights however few rows it
    gets: at a few rows a second copy only doubles the bytes read). With every copy in use, its
    assignments of rank r (of n, in order) go to the first copy whose cumulative share exceeds
    (r + 0.5) / n (the table's load split). With fewer, the k copies owed the most rows (`credit_ER`)
    are chosen and take blocks of the ranks, at least one row each, more to those owed more (see
    `_blocks`); over such batches each copy gets its share of their rows (the credit carries what a
    batch owed a copy and did not give it).

    `cum_ER`: (E+1, R) cumulative shares of the live copies (RoutingTable.split_alive). `credit_ER`:
    updated in place (see `copy_credit`); None: no memory across batches (every copy in use).
    """
    n = expert_N.numel()
    if n == 0 or cum_ER.shape[1] == 1:
        return torch.zeros_like(expert_N)
    order = torch.argsort(expert_N, stable=True)
    sorted_e = expert_N[order]
    counts = torch.bincount(sorted_e, minlength=cum_ER.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_e]
    share_ER = None if credit_ER is None else _shares(cum_ER)
    cum, narrowed_E = (cum_ER, None) if credit_ER is None else _narrow(cum_ER, share_ER, counts, max(1, int(min_rows)), credit_ER)
    u = ((rank.double() + 0.5) / counts[sorted_e].double()).unsqueeze(1)
    pick_sorted = (cum[sorted_e] <= u).sum(1).clamp_max(cum_ER.shape[1] - 1)
    if narrowed_E is not None:
        # NOTE: only experts that used fewer than all their copies: the rank rule over all of them rounds
        # the same way every batch (the later copy takes an odd row), and a credit kept through a busy
        # spell would then send a quiet one's batches to one copy until that debt was paid.
        given = torch.zeros_like(credit_ER).index_put_((sorted_e, pick_sorted), torch.ones(n, dtype=credit_ER.dtype), accumulate=True)
        due = counts.unsqueeze(1).to(credit_ER.dtype) * share_ER - given
        credit_ER += torch.where(narrowed_E.unsqueeze(1), due, 0.0)
    pick = torch.empty_like(expert_N)
    pick[order] = pick_sorted
    return pick


def copy_credit(cum_ER: torch.Tensor) -> torch.Tensor:
    """A fresh credit for `split_copies` over the live copies of `cum_ER`: expert e first favours its
    copy e mod (its copies), so experts that each fit one copy start out spread over the groups."""
    usable_ER = _shares(cum_ER) > 0
    slot_ER = usable_ER.cumsum(1) - 1  # each usable copy's index among the expert's usable copies
    first_E = torch.arange(cum_ER.shape[0]) % usable_ER.sum(1).clamp_min(1)
    return (usable_ER & (slot_ER == first_E.unsqueeze(1))).to(torch.float64) * 0.5


def _narrow(cum_ER: torch.Tensor, share_ER: torch.Tensor, counts_E: torch.Tensor, min_rows: int,
            credit_ER: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cumulative shares over the copies each expert uses this batch, the ceil(n / min_rows) (at most
    all) usable ones owed the most rows after this batch's due, and which experts of the batch use
    fewer than all. (`cum_ER`, None) when every expert of the batch uses all its copies."""
    usable_ER = share_ER > 0
    copies_E = usable_ER.sum(1)
    k_E = torch.minimum((counts_E + min_rows - 1) // min_rows, copies_E).clamp_min(1)
    narrowed_E = (k_E < copies_E) & (counts_E > 0)
    if not bool(narrowed_E.any()):
        return cum_ER, None
    owed_ER = torch.where(usable_ER, credit_ER + counts_E.unsqueeze(1).to(credit_ER.dtype) * share_ER, -torch.inf)
    chosen_ER = usable_ER & (_places(owed_ER) < k_E.unsqueeze(1))
    narrow_ER = _blocks(torch.where(chosen_ER, owed_ER, 0.0), chosen_ER, counts_E, k_E)
    return torch.where(narrowed_E.unsqueeze(1), narrow_ER, cum_ER), narrowed_E


def _blocks(owed_ER: torch.Tensor, chosen_ER: torch.Tensor, counts_E: torch.Tensor, k_E: torch.Tensor) -> torch.Tensor:
    """Cumulative fractions of each expert's n rows for its k chosen copies: one row each, the other
    n - k by what each copy is owed (largest remainder), so the copy owed most gets most and every
    chosen copy's credit comes down. (By shares alone, a copy with a small one could be chosen and
    get no row, batch after batch, its credit growing for ever; by even blocks, a copy with a large
    one would get less than its due every batch.) Row boundaries are whole rows: the rank rule then
    gives each copy exactly its count."""
    extra_E = (counts_E - k_E).clamp_min(0).to(owed_ER.dtype)
    w_ER = torch.where(chosen_ER, owed_ER.clamp_min(0.0) + 1e-9, 0.0)
    quota_ER = extra_E.unsqueeze(1) * w_ER / w_ER.sum(1, keepdim=True).clamp_min(1e-12)
    base_ER = quota_ER.floor()
    left_E = (extra_E - base_ER.sum(1)).round().to(torch.int64)
    top_ER = _places(torch.where(chosen_ER, quota_ER - base_ER, -1.0)) < left_E.unsqueeze(1)
    rows_ER = torch.where(chosen_ER, 1.0 + base_ER + top_ER.to(owed_ER.dtype), 0.0)
    return _pinned(rows_ER, chosen_ER)


def _shares(cum_ER: torch.Tensor) -> torch.Tensor:
    """Each copy's share, from the cumulative shares."""
    return torch.diff(cum_ER, dim=1, prepend=torch.zeros((cum_ER.shape[0], 1), dtype=cum_ER.dtype))


def _places(score_ER: torch.Tensor) -> torch.Tensor:
    """Each column's place in its row by score, highest first (0 for the highest; ties by column)."""
    by = torch.argsort(score_ER, dim=1, descending=True, stable=True)
    return torch.empty_like(by).scatter_(1, by, torch.arange(score_ER.shape[1]).expand_as(by).contiguous())


def _pinned(share_ER: torch.Tensor, used_ER: torch.Tensor) -> torch.Tensor:
    """Cumulative shares normalised per row, exactly 1.0 from each row's last used copy on (so no
    assignment falls off the end); rows with no used copy all 1.0."""
    total = share_ER.sum(1, keepdim=True)
    cum = share_ER.cumsum(1) / torch.where(total > 0, total, 1.0)
    cols = torch.arange(share_ER.shape[1])
    last_E = torch.where(used_ER, cols, -1).max(1).values
    cum[cols.unsqueeze(0) >= last_E.unsqueeze(1)] = 1.0
    return cum


def reroute_lost(token_N: torch.Tensor, expert_N: torch.Tensor, lost_N: torch.Tensor, logits_TE: torch.Tensor,
                  live_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Failover `reroute`: each assignment to an expert with no live copy moves, with its weight, to
    the token's best live expert by gate logit that the token does not use yet (a token's weights
    keep their sum). Returns the new experts and what is still lost (no live candidate; the shared
    slot). A token losing two experts gets its best and second-best candidates, in assignment order."""
    num_e = logits_TE.shape[1]
    expert_N = expert_N.clone()
    still = lost_N.clone()
    routed = expert_N < num_e
    used_TE = torch.zeros(logits_TE.shape, dtype=torch.bool)
    used_TE[token_N[routed], expert_N[routed]] = True
    todo = torch.nonzero(lost_N & routed).flatten()
    while todo.numel():
        toks = token_N[todo]
        # one row per token per round, so a token's two lost rows never take the same candidate
        first = torch.zeros_like(todo, dtype=torch.bool)
        first[torch.tensor(first_index(toks.tolist()), dtype=torch.int64)] = True
        rows, toks = todo[first], toks[first]
        scores = logits_TE[toks].masked_fill(~live_E.unsqueeze(0) | used_TE[toks], float("-inf"))
        best = scores.argmax(1)
        ok = torch.isfinite(scores.gather(1, best[:, None]).squeeze(1))
        expert_N[rows[ok]] = best[ok]
        still[rows[ok]] = False
        used_TE[toks[ok], best[ok]] = True
        todo = todo[~first]
    return expert_N, still


def first_index(values: list[int]) -> list[int]:
    """Positions of each value's first occurrence."""
    seen: dict[int, int] = {}
    for i, v in enumerate(values):
        seen.setdefault(v, i)
    return list(seen.values())
