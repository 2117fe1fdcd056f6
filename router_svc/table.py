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
    # shares[g][j]: the fraction of slot placement[g][j]'s tokens that copy takes (empty: even split).
    shares: tuple[tuple[float, ...], ...] = ()
    _lookup: dict[tuple, object] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, version: int, num_experts: int, groups: Sequence[GroupRef], placement: Sequence[Sequence[tuple[int, int]]],
              shares: Sequence[Sequence[float]] | None = None) -> "RoutingTable":
        placed = tuple(tuple((int(l), int(e)) for l, e in slots) for slots in placement)
        if shares is not None and [len(s) for s in shares] != [len(s) for s in placed]:
            raise ValueError("shares must have one entry per placed slot")
        return cls(
            version=version,
            num_experts=num_experts,
            groups=tuple(groups),
            placement=placed,
            shares=() if shares is None else tuple(tuple(float(x) for x in s) for s in shares),
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

    def live_everywhere(self, layer: int, dead: frozenset[int] = frozenset()) -> tuple[bool, bool]:
        """(every routed expert of the layer has a live copy, its shared slot has one): when both hold, or
        the first and no shared slot is routed, no assignment can lack a host."""
        key = ("everywhere", layer, dead)
        if key not in self._lookup:
            count = self.lookup_alive(layer, dead)[2]
            self._lookup[key] = (bool((count[: self.num_experts] > 0).all()), bool(count[self.num_experts] > 0))  # type: ignore[assignment]
        return self._lookup[key]  # type: ignore[return-value]

    def split_alive(self, layer: int, dead: frozenset[int] = frozenset()) -> torch.Tensor:
        """(E+1, R) cumulative token shares of the live copies, in `lookup_alive`'s order, ending at 1.

        With every copy in use, a router sends an expert's tokens of rank r (of n) to the first copy
        whose cumulative share exceeds (r + 0.5) / n; a few rows go to fewer copies (see
        dispatch.split_copies). Without shares, or when a slot's live copies have none, the split is even.
        """
        key = ("split", layer, dead)
        if key not in self._lookup:
            group, _, count = self.lookup_alive(layer, dead)
            share = torch.zeros(group.shape, dtype=torch.float64)
            pos: dict[tuple[int, int], float] = {}
            if self.shares:
                for g, slots in enumerate(self.placement):
                    for (l, e), w in zip(slots, self.shares[g]):
                        if l == layer:
                            pos[(g, self.num_experts if e == SHARED else e)] = w
            for e in range(group.shape[0]):
                n = int(count[e])
                if n == 0:
                    continue
                w = torch.tensor([pos.get((int(group[e, j]), e), 0.0) for j in range(n)], dtype=torch.float64)
                share[e, :n] = w / w.sum() if float(w.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
            cum = share.cumsum(1)
            for e in range(group.shape[0]):
                n = int(count[e])
                if n:
                    cum[e, n - 1:] = 1.0
            self._lookup[key] = cum  # type: ignore[index]
        return self._lookup[key]  # type: ignore[index]

    def lookup(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(group_of, local_of), each (E+1,) int64; -1 where a slot has no host. First replica wins."""
        group, local, _ = self.lookup_alive(layer)
        return group[:, 0], local[:, 0]


def layer_orders(table: RoutingTable, layer: int) -> list[list[int]]:
    """Per group, the expert ids of `layer` in the group's slot order (shared slot as -1, last)."""
    return [local_order([e for l, e in slots if l == layer]) for slots in table.placement]
