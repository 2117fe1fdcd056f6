"""Expert-parallel load balancing (after DeepSeek's EPLB): pure functions over load tensors.

Legend: E logical experts of one layer, P physical slots (P >= E), G groups, S = P / G slots per group.

1. `replicate_experts`: give the P - E redundant slots, one at a time, to the expert whose
   per-replica load is highest now (load / replicas), never more replicas than groups.
2. `balanced_packing`: deal the P physical experts, heaviest first, each to the lightest
   group that still has room and does not already hold a copy of the same expert (so a
   group's loss never takes every replica of an expert), skipping a group that would leave
   too little room for the experts still to come (groups never exceed ceil(P / G)).
3. `rebalance`: both, for one layer, over every replica budget -> which experts each group hosts.

Online (the supervisor, every tick, with observed per-slot rates): `desired_replicas` (hot
experts up, cooled ones down with hysteresis), `place_replica` / `pick_removal` (the packing
step for one redundant copy: a node without a copy first, then the lightest group) and
`replica_shares` (how routers split an expert's tokens over its copies, by load).

No actors, no I/O: the supervisor calls these with observed loads. Worked example in
docs/eplb.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    same expert. Group capacity = ceil(P / G); no group ever exceeds it.

    NOTE: the copies of one expert weigh the same, so they are dealt together, each to a
    distinct group. Lightest-first alone can paint itself into a corner (the groups left
    with room too few for a later expert's copies), so a group is taken only when the
    experts still to come can be packed into what room is left (`_packable`); a packing
    always exists when no expert has more copies than there are groups.
    """
    e = load_E.numel()
    total = int(counts_E.sum())
    per_group = -(-total // num_groups)
    if int(counts_E.max()) > num_groups:
        raise ValueError(f"an expert has {int(counts_E.max())} replicas but there are only {num_groups} groups")
    share = load_E.to(torch.float64).clamp_min(0) / counts_E
    order = sorted(range(e), key=lambda x: (-float(share[x]), x))
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    loads = [0.0] * num_groups
    # spread[m]: how many copies the experts not dealt yet can put in m groups (one per group each)
    spread = [sum(min(int(c), m) for c in counts_E.tolist()) for m in range(num_groups + 1)]
    for x in order:
        copies = int(counts_E[x])
        spread = [f - min(copies, m) for m, f in enumerate(spread)]
        room = [per_group - len(gr) for gr in groups]
        chosen: list[int] = []
        for g in sorted(range(num_groups), key=lambda g: (loads[g], len(groups[g]), g)):
            if len(chosen) == copies:
                break
            if room[g] > 0 and _packable(room, chosen + [g], copies, spread):
                chosen.append(g)
        assert len(chosen) == copies, "a packing exists whenever every expert has at most num_groups copies"
        for g in chosen:
            groups[g].append(x)
            loads[g] += float(share[x])
    return Packing(groups=tuple(tuple(sorted(gr)) for gr in groups), group_load=tuple(loads))


def _packable(room: Sequence[int], taken: Sequence[int], copies: int, spread: Sequence[int]) -> bool:
    """Can one expert's `copies` go to distinct groups including `taken`, and the experts after it
    still be packed into the room left? `spread[m]` = sum(min(c, m)) over their copy counts c.

    The expert's other copies go to the roomiest groups (that choice leaves the most options).
    The rest fit iff, for every k, the k smallest rooms plus spread[G - k] cover spread[G] (all
    their copies): the min-cut condition of the experts x groups flow network in which an
    expert puts at most one copy in a group.
    """
    left = list(room)
    for g in taken:
        left[g] -= 1
    others = sorted((g for g in range(len(left)) if g not in taken and left[g] > 0), key=lambda g: -left[g])
    if len(others) < copies - len(taken):
        return False
    for g in others[:copies - len(taken)]:
        left[g] -= 1
    left.sort()
    g_count = len(left)
    cut = 0
    for k in range(g_count + 1):
        if cut + spread[g_count - k] < spread[g_count]:
            return False
        if k < g_count:
            cut += left[k]
    return True


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


# -- online replication: what the supervisor does with observed rates -------------------------

@dataclass(frozen=True)
class ReplicaPolicy:
    """When an expert gets more copies, and when it gives them back.

    Up: an expert whose rate exceeds `hot_threshold` x its layer's mean (and `min_rate`)
    wants ceil(rate / mean) copies, at most `max_replicas`. Down (hysteresis): an extra copy
    may go once the expert's rate per copy would stay below max(mean, `min_rate`) without
    it and its rate is below `down_fraction` x the hot line (so a rate wobbling around the
    hot line never adds and removes the same copy); the supervisor removes it only after
    that held for its down delay.
    """

    hot_threshold: float = 2.0
    max_replicas: int = 2
    min_rate: float = 1.0
    down_fraction: float = 0.75


def desired_replicas(rate_E: torch.Tensor, current_E: torch.Tensor, base_E: torch.Tensor,
                     policy: ReplicaPolicy) -> torch.Tensor:
    """(E,) rates, current and starting copy counts -> wanted copies per expert (one step down at most)."""
    rate = rate_E.to(torch.float64).clamp_min(0)
    cur = current_E.to(torch.int64)
    base = base_E.to(torch.int64)
    mean = float(rate.mean()) if rate.numel() else 0.0
    want = cur.clone()
    hot = (rate > policy.hot_threshold * mean) & (rate > policy.min_rate)
    up = torch.ceil(rate / max(mean, 1e-12)).to(torch.int64).clamp(max=max(policy.max_replicas, 1))
    want[hot] = torch.maximum(cur[hot], torch.maximum(up[hot], base[hot]))
    floor = max(mean, policy.min_rate)
    cool = ~hot & (cur > base) & (rate / (cur - 1).clamp_min(1) < floor) & \
        (rate < max(policy.down_fraction * policy.hot_threshold * mean, policy.min_rate))
    want[cool] = cur[cool] - 1
    return want


def group_loads(placement: Sequence[Sequence[tuple[int, int]]], rate: dict[tuple[int, int], float],
                shares: Sequence[Sequence[float]] | None = None) -> list[float]:
    """Tokens/s each group carries: a slot's rate split over its copies (by `shares`, else evenly)."""
    copies: dict[tuple[int, int], int] = {}
    for slots in placement:
        for s in slots:
            copies[tuple(s)] = copies.get(tuple(s), 0) + 1
    loads = []
    for g, slots in enumerate(placement):
        total = 0.0
        for j, s in enumerate(slots):
            frac = shares[g][j] if shares is not None else 1.0 / copies[tuple(s)]
            total += rate.get(tuple(s), 0.0) * frac
        loads.append(total)
    return loads


def place_replica(placement: Sequence[Sequence[tuple[int, int]]], slot: tuple[int, int], loads: Sequence[float],
                  nodes: Sequence[str], usable: Sequence[int]) -> int | None:
    """The group for one more copy of `slot` (EPLB's packing step for a redundant slot).

    Among `usable` groups that hold no copy of the slot: first those on a node without a copy
    (losing one node never loses every copy), then the lightest, then the fewest slots.
    """
    holders = [g for g, slots in enumerate(placement) if tuple(slot) in {tuple(s) for s in slots}]
    held_nodes = {nodes[g] for g in holders}
    options = [g for g in usable if g not in holders]
    if not options:
        return None
    return min(options, key=lambda g: (nodes[g] in held_nodes, loads[g], len(placement[g]), g))


def pick_removal(placement: Sequence[Sequence[tuple[int, int]]], base: Sequence[Sequence[tuple[int, int]]],
                 slot: tuple[int, int], loads: Sequence[float], nodes: Sequence[str]) -> int | None:
    """The group whose extra copy of `slot` goes: never a starting copy; prefer a node that keeps
    another copy, then the busiest group."""
    extra = [g for g, slots in enumerate(placement)
             if tuple(slot) in {tuple(s) for s in slots} and tuple(slot) not in {tuple(s) for s in base[g]}]
    if not extra:
        return None
    holders = [g for g, slots in enumerate(placement) if tuple(slot) in {tuple(s) for s in slots}]

    def node_keeps_copy(g: int) -> bool:
        return any(nodes[h] == nodes[g] for h in holders if h != g)

    return max(extra, key=lambda g: (node_keeps_copy(g), loads[g], g))


def replica_shares(placement: Sequence[Sequence[tuple[int, int]]], rate: dict[tuple[int, int], float],
                   alive: Sequence[bool] | None = None, quanta: int = 32) -> list[list[float]]:
    """Per placed copy, the fraction of its slot's tokens it takes, so group loads even out.

    Single-copy slots load their group fully; each replicated slot's rate is cut in `quanta`
    pieces dealt, heaviest slot first, to the currently lightest live group holding a copy
    (water filling). A slot with no observed load is split evenly. Dead groups get 0.
    """
    alive = list(alive) if alive is not None else [True] * len(placement)
    hosts: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for g, slots in enumerate(placement):
        for j, s in enumerate(slots):
            if alive[g]:
                hosts.setdefault(tuple(s), []).append((g, j))
    shares = [[0.0] * len(slots) for slots in placement]
    loads = [0.0] * len(placement)
    multi = []
    for s, hs in hosts.items():
        if len(hs) == 1:
            g, j = hs[0]
            shares[g][j] = 1.0
            loads[g] += rate.get(s, 0.0)
        else:
            multi.append(s)
    for s in sorted(multi, key=lambda s: (-rate.get(s, 0.0), s)):
        hs = hosts[s]
        r = rate.get(s, 0.0)
        if r <= 0:
            for g, j in hs:
                shares[g][j] = 1.0 / len(hs)
            continue
        got = [0] * len(hs)
        for _ in range(quanta):
            i = min(range(len(hs)), key=lambda i: (loads[hs[i][0]], i))
            got[i] += 1
            loads[hs[i][0]] += r / quanta
        for (g, j), n in zip(hs, got):
            shares[g][j] = n / quanta
    return shares
