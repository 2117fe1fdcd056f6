"""Per-batch routing statistics, cheap enough for every batch (one host sync).

Legend: T tokens, E experts, N assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from router_svc.gate.policies import Assignments


@dataclass(frozen=True)
class RoutingStats:
    """What one batch's routing looked like.

    tokens_per_expert: assignments each expert received (after capacity).
    utilisation_entropy: entropy of that load distribution / log(E), in [0, 1];
        1 = perfectly even.
    load_balancing_loss: Switch's E * sum_i f_i * P_i, f_i the fraction of
        assignments to expert i, P_i its mean router probability; 1 when balanced.
    z_loss: ST-MoE's router z-loss, mean over tokens of logsumexp(logits)^2.
    max_over_mean_load: busiest expert's load over the mean load (1 = even).
    """

    tokens_per_expert: tuple[int, ...]
    dropped: int
    rerouted: int
    utilisation_entropy: float
    load_balancing_loss: float
    z_loss: float
    max_over_mean_load: float


def routing_stats(a: Assignments, num_experts: int) -> RoutingStats:
    counts_E = torch.bincount(a.expert_N, minlength=num_experts).to(torch.float64)
    total = counts_E.sum()
    if a.logits_TE.shape[0] == 0 or total == 0:
        return RoutingStats(
            tokens_per_expert=tuple(int(c) for c in counts_E.tolist()), dropped=a.dropped, rerouted=a.rerouted,
            utilisation_entropy=0.0, load_balancing_loss=0.0, z_loss=0.0, max_over_mean_load=0.0,
        )
    frac_E = counts_E / total
    nz = frac_E[frac_E > 0]
    entropy = -(nz * nz.log()).sum() / math.log(num_experts) if num_experts > 1 else torch.tensor(1.0)
    mean_prob_E = a.probs_TE.to(torch.float64).mean(dim=0)
    lb_loss = num_experts * (frac_E * mean_prob_E).sum()
    z = torch.logsumexp(a.logits_TE.to(torch.float64), dim=-1).square().mean()
    max_over_mean = counts_E.max() / counts_E.mean()
    vals = torch.stack([entropy.to(torch.float64), lb_loss, z, max_over_mean]).tolist()
    return RoutingStats(
        tokens_per_expert=tuple(int(c) for c in counts_E.tolist()),
        dropped=a.dropped,
        rerouted=a.rerouted,
        utilisation_entropy=vals[0],
        load_balancing_loss=vals[1],
        z_loss=vals[2],
        max_over_mean_load=vals[3],
    )
