"""Expert-parallel load balancing (after DeepSeek's EPLB): pure functions over load tensors.

Legend: E logical experts of one layer, P physical slots (P >= E), G groups, S = P / G slots per group.

1. `replicate_experts`: give the P - E redundant slots, one at a time, to the expert whose
   per-replica load is highest now (load / replicas), never more replicas than groups.
2. `balanced_packing`: deal the P physical experts, heaviest first, each to the lightest
   group that still has room and does not already hold a copy of the same expert (so a
   group's loss never takes every replica of an expert).
3. `rebalance`: both, for one layer, over every replica budget -> which experts each group hosts.

No actors, no I/O: the supervisor calls these with observed loads. Worked example in
docs/eplb.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def replicate_experts(load_E: torch.Tensor, num_physical: int, max_replicas: int | None = None) -> torch.Tensor:
    """Replica count per expert: (E,) load -> (E,) int64 counts summing to `num_physical`.

    Each redundant slot goes to the expert with the highest load per replica; ties go to
    the lower expert id. `max_replicas` caps any expert's copies (at most the group count).
    """
    e = load_E.numel()
    if num_physical < e:
        raise ValueError(f"num_physical={num_physical} < experts={e}: every expert needs a slot")
    cap = max_replicas if max_replicas is not None else num_physical
    counts = torch.ones(e, dtype=torch.int64)
    load = load_E.to(torch.float64).clamp_min(0)
    for _ in range(num_physical - e):
        per_replica = (load / counts).masked_fill(counts >= cap, float("-inf"))
        if torch.isinf(per_replica).all():
            raise ValueError(f"cannot place {num_physical} slots with at most {cap} replicas of {e} experts")
        counts[int(torch.argmax(per_replica))] += 1
    return counts


@dataclass(frozen=True)
class Packing:
    """groups[g] lists the logical experts group g hosts; group_load[g] is the load it carries."""

    groups: tuple[tuple[int, ...], ...]
    group_load: tuple[float, ...]

    @property
    def max_over_mean(self) -> float:
        mean = sum(self.group_load) / len(self.group_load)
        return max(self.group_load) / mean if mean > 0 else 1.0


def balanced_packing(load_E: torch.Tensor, counts_E: torch.Tensor, num_groups: int) -> Packing:
    """Pack every replica (carrying load / count of its expert) into `num_groups` groups of equal size.

    Heaviest replica first, into the lightest group with room that holds no copy of the
    same expert. Group capacity = ceil(P / G).
    """
    total = int(counts_E.sum())
    per_group = -(-total // num_groups)
    if int(counts_E.max()) > num_groups:
        raise ValueError(f"an expert has {int(counts_E.max())} replicas but there are only {num_groups} groups")
    share = load_E.to(torch.float64).clamp_min(0) / counts_E
    items = sorted(((float(share[x]), x) for x in range(load_E.numel()) for _ in range(int(counts_E[x]))),
                   key=lambda t: (-t[0], t[1]))
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    loads = [0.0] * num_groups
    for w, x in items:
        open_groups = [g for g in range(num_groups) if len(groups[g]) < per_group and x not in groups[g]]
        if not open_groups:  # only when distinctness and equal sizes conflict; relax the size
            open_groups = [g for g in range(num_groups) if x not in groups[g]]
        g = min(open_groups, key=lambda g: (loads[g], len(groups[g]), g))
        groups[g].append(x)
        loads[g] += w
    return Packing(groups=tuple(tuple(sorted(gr)) for gr in groups), group_load=tuple(loads))


def rebalance(load_E: torch.Tensor, num_groups: int, slots_per_group: int) -> Packing:
    """One layer: replicate hot experts into spare slots, then pack them over the groups.

    NOTE: a replica must share a group with other experts, so one more replica can raise
    the busiest group's load (greedy packing is no oracle). Every replica budget from 0
    to all spare slots is packed and the lowest max load wins; ties go to fewer replicas,
    which copy fewer weights.
    """
    e = load_E.numel()
    num_physical = num_groups * slots_per_group
    if num_physical < e:
        raise ValueError(f"{num_groups} groups x {slots_per_group} slots cannot host {e} experts")
    best: Packing | None = None
    for spare in range(num_physical - e + 1):
        if e + spare > e * num_groups:
            break
        counts = replicate_experts(load_E, e + spare, max_replicas=num_groups)
        p = balanced_packing(load_E, counts, num_groups)
        if best is None or max(p.group_load) < max(best.group_load) - 1e-12:
            best = p
    assert best is not None
    return best
