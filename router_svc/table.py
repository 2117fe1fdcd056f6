"""The routing table a Router is handed: where every (layer, expert) slot lives. Versioned, immutable.

Legend: E experts; index E of the per-layer lookups stands for the shared slot (expert id -1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from expert_workers.group import SHARED, local_order


@dataclass(frozen=True)
class GroupRef:
    name: str
    grpc_address: str
    node_id: str = ""


@dataclass(frozen=True)
class RoutingTable:
    """`placement[g]` lists group g's slots; a slot's local index is its position in the group's layer order."""

    version: int
    num_experts: int
    groups: tuple[GroupRef, ...]
    placement: tuple[tuple[tuple[int, int], ...], ...]
    _lookup: dict[tuple[int, frozenset[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, version: int, num_experts: int, groups: Sequence[GroupRef], placement: Sequence[Sequence[tuple[int, int]]]) -> "RoutingTable":
        return cls(
            version=version,
            num_experts=num_experts,
            groups=tuple(groups),
            placement=tuple(tuple((int(l), int(e)) for l, e in slots) for slots in placement),
        )

    def replicas(self, layer: int, expert: int) -> list[tuple[int, int]]:
        """(group, local index) of every copy of a slot (expert -1: the shared slot)."""
        group, local, count = self.lookup_alive(layer)
        row = self.num_experts if expert == SHARED else expert
        return [(int(group[row, j]), int(local[row, j])) for j in range(int(count[row]))]

    def lookup_alive(self, layer: int, dead: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Live replicas per slot: (group_ER, local_ER, count_E) with R = most replicas of any slot.

        Row E stands for the shared slot. count_E[e] = 0 when no live group hosts slot e.
        """
        key = (layer, dead)
        if key not in self._lookup:
            hosts: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts + 1)]
            for g, slots in enumerate(self.placement):
                if g in dead:
                    continue
                order = local_order([e for l, e in slots if l == layer])
                for i, e in enumerate(order):
                    hosts[self.num_experts if e == SHARED else e].append((g, i))
            r = max(1, max(len(h) for h in hosts))
            group = torch.full((self.num_experts + 1, r), -1, dtype=torch.int64)
            local = torch.full((self.num_experts + 1, r), -1, dtype=torch.int64)
            for e, h in enumerate(hosts):
                for j, (g, i) in enumerate(h):
                    group[e, j], local[e, j] = g, i
            count = torch.tensor([len(h) for h in hosts], dtype=torch.int64)
            self._lookup[key] = (group, local, count)
        return self._lookup[key]

    def lookup(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(group_of, local_of), each (E+1,) int64; -1 where a slot has no host. First replica wins."""
        group, local, _ = self.lookup_alive(layer)
        return group[:, 0], local[:, 0]


def layer_orders(table: RoutingTable, layer: int) -> list[list[int]]:
    """Per group, the expert ids of `layer` in the group's slot order (shared slot as -1, last)."""
    return [local_order([e for l, e in slots if l == layer]) for slots in table.placement]
