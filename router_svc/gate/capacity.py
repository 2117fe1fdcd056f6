"""Capacity limits and overflow policies for token-choice routing.

Legend: T tokens, E experts, K top-k, P = K*T assignments in priority order.

capacity = ceil(capacity_factor * T * K / E) assignments per expert.
Priority: all first choices (in token order), then all second choices, and so on,
as in GShard. Assignments past an expert's capacity overflow:
- `drop`: the assignment is removed; the token gets zero from that expert (the
  caller's residual carries it); the other weights are left as they were.
- `reroute`: the assignment moves to the token's next-best expert (by the
  policy's ranking) that still has room and that the token does not already use.
  Original choices always keep priority over reroutes. The token's weights are
  then those the policy gives its expert set after rerouting. With no room
  anywhere the assignment is dropped; a dropped assignment keeps its place in
  that set (it contributes zero, as under `drop`), so dropping never inflates
  the weights of a token's other experts.
- `dropless`: no limit.
"""

from __future__ import annotations

import torch

from expert_workers.spec import RoutingSpec
from router_svc.gate.policies import Assignments, GateDecision, ceil_capacity


def capacity_for(tokens: int, spec: RoutingSpec, num_experts: int) -> int | None:
    """Assignments each expert may take for a request of `tokens` tokens; None = unlimited."""
    if spec.overflow == "dropless" or spec.capacity_factor is None:
        return None
    return ceil_capacity(spec.capacity_factor, tokens * spec.top_k, num_experts)


def _positions(experts_P: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each entry, how many earlier entries name the same expert: (P,) -> (P,)."""
    sorted_e, perm = torch.sort(experts_P, stable=True)
    counts = torch.bincount(sorted_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(experts_P.numel(), device=experts_P.device) - starts[sorted_e]
    return torch.empty_like(pos_sorted).scatter_(0, perm, pos_sorted)


def apply_capacity(dec: GateDecision, logits_TE: torch.Tensor, spec: RoutingSpec) -> Assignments:
    """GateDecision (T, K) -> final Assignments after the capacity limit and overflow policy."""
    t, k = dec.topk_ids_TK.shape
    e = dec.select_scores_TE.shape[1]
    ids_TK, weights_TK = dec.topk_ids_TK, dec.topk_weights_TK
    capacity = capacity_for(t, spec, e)
    if capacity is None:
        # NOTE: dropless keeps every choice, in (token, rank) order as the masked path below would;
        # a few torch ops instead of a dozen (the router runs them cache-cold between batches).
        return Assignments(
            token_N=torch.arange(t, device=ids_TK.device).repeat_interleave(k),
            expert_N=ids_TK.reshape(-1),
            weight_N=weights_TK.reshape(-1),
            probs_TE=dec.probs_TE,
            logits_TE=logits_TE,
            dropped=0,
            rerouted=0,
        )
    if k > 1:
        # NOTE: priority needs each token's choices best first; a policy may list them unsorted
        # (sigmoid_group_topk keeps the reference's unsorted top-k; its dropless output is unchanged).
        order_TK = dec.select_scores_TE.gather(1, ids_TK).argsort(dim=1, descending=True, stable=True)
        ids_TK, weights_TK = ids_TK.gather(1, order_TK), weights_TK.gather(1, order_TK)
    kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    rerouted_TK = torch.zeros_like(kept_TK)
    if t > 0:
        ids_P = ids_TK.t().reshape(-1)  # K-major: first choices first
        kept_TK = (_positions(ids_P, e) < capacity).view(k, t).t()
        if spec.overflow == "reroute" and not bool(kept_TK.all()):
            ids_TK, rerouted_TK = _reroute(dec, ids_TK, kept_TK, capacity)
            kept_TK = kept_TK | rerouted_TK
            rows = rerouted_TK.any(dim=1)
            weights_TK = torch.where(rows[:, None], dec.reweight(ids_TK), weights_TK)
    tokens_TK = torch.arange(t, device=ids_TK.device)[:, None].expand(t, k)
    return Assignments(
        token_N=tokens_TK[kept_TK],
        expert_N=ids_TK[kept_TK],
        weight_N=weights_TK[kept_TK],
        probs_TE=dec.probs_TE,
        logits_TE=logits_TE,
        dropped=int((~kept_TK).sum()),
        rerouted=int(rerouted_TK.sum()),
    )


def _reroute(
    dec: GateDecision, ids_TK: torch.Tensor, kept_TK: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move overflowed assignments to next-best experts with room. Returns (ids, rerouted) (T, K).

    Rounds per choice rank: every pending assignment proposes its best allowed
    expert with room; each expert accepts proposals in token order up to its room.
    A rejected proposal means that expert is now full, so every round fills an
    expert or settles every proposal: at most E rounds per rank.
    """
    t, k = ids_TK.shape
    e = dec.select_scores_TE.shape[1]
    ids_TK = ids_TK.clone()
    rerouted_TK = torch.zeros_like(kept_TK)
    room_E = capacity - torch.bincount(ids_TK[kept_TK], minlength=e)
    used_TE = torch.zeros((t, e), dtype=torch.bool, device=ids_TK.device).scatter_(1, ids_TK, True)
    allowed_TE = torch.isfinite(dec.select_scores_TE)
    for rank in range(k):
        pending = torch.nonzero(~kept_TK[:, rank]).flatten()
        for _ in range(e + 1):
            if pending.numel() == 0:
                break
            blocked = used_TE[pending] | ~allowed_TE[pending] | (room_E <= 0)[None, :]
            scores = dec.select_scores_TE[pending].masked_fill(blocked, float("-inf"))
            best_val, best_e = scores.max(dim=1)
            has_option = best_val > float("-inf")
            pending, best_e = pending[has_option], best_e[has_option]
            accept = _positions(best_e, e) < room_E[best_e]
            won, won_e = pending[accept], best_e[accept]
            ids_TK[won, rank] = won_e
            rerouted_TK[won, rank] = True
            used_TE[won, won_e] = True
            room_E -= torch.bincount(won_e, minlength=e)
            pending = pending[~accept]
    return ids_TK, rerouted_TK
