"""Placement: which expert group hosts which (layer, expert) slot. Pure functions, no Ray."""

from __future__ import annotations

from typing import Sequence

from expert_workers.group import SHARED
from expert_workers.spec import MoESpec

Slot = tuple[int, int]  # (layer, expert); expert SHARED: the layer's shared experts


def as_slots(raw: Sequence[Sequence[int]]) -> list[Slot]:
    """Slots from their saved form (msgpack lists)."""
    return [(int(l), int(e)) for l, e in raw]


def all_slots(spec: MoESpec, *, shared_as_slot: bool) -> list[tuple[int, int]]:
    """Every slot of the model, layer-major; a layer's shared experts are one slot (expert -1) if hosted."""
    slots = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]
    if shared_as_slot and spec.shared_experts.count:
        slots += [(layer, SHARED) for layer in spec.moe_layers]
    return slots


def spread_replicated(slots: Sequence[tuple[int, int]], num_groups: int, replicas: int,
                      nodes: Sequence[str] | None = None) -> list[list[tuple[int, int]]]:
    """Like `spread`, with `replicas` copies of every slot on distinct groups.

    Copy r of slot i goes to group (i + r) mod G, or, when `nodes` (the node of each group) puts
    that group on a node already holding a copy, to the next group round from there on a node
    without one (losing one node never loses every copy when there are enough nodes).
    """
    if not 1 <= replicas <= num_groups:
        raise ValueError(f"replicas must be in [1, num_groups={num_groups}], got {replicas}")
    if nodes is not None and len(nodes) != num_groups:
        raise ValueError(f"nodes names {len(nodes)} groups, expected {num_groups}")
    groups: list[list[tuple[int, int]]] = [[] for _ in range(num_groups)]
    for i, slot in enumerate(slots):
        held: list[int] = []
        for r in range(replicas):
            ring = [(i + r + k) % num_groups for k in range(num_groups)]
            free = [g for g in ring if g not in held]
            used_nodes = {nodes[g] for g in held} if nodes is not None else set()
            fresh = [g for g in free if nodes is None or nodes[g] not in used_nodes]
            g = (fresh or free)[0]
            held.append(g)
            groups[g].append(slot)
    return groups


def spread(slots: Sequence[tuple[int, int]], num_groups: int) -> list[list[tuple[int, int]]]:
    """Deal slots round-robin so group sizes differ by at most one and each layer spans the groups.

    Slot i goes to group i mod G over the layer-major list, so consecutive experts of one
    layer land on different groups (a layer's tokens fan out over all groups) and every
    group gets a fair share of every layer.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    groups: list[list[tuple[int, int]]] = [[] for _ in range(num_groups)]
    for i, slot in enumerate(slots):
        groups[i % num_groups].append(slot)
    return groups
