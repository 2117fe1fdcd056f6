"""A router's plan for one batch: gate each request on its own, then merge the requests' assignments
into one contiguous, sorted run of rows per expert group.

Legend: T tokens, D hidden, E experts (row E of the per-layer lookups: the shared slot), R most
copies of any slot, N assignments.

NOTE: isolation. Gate, capacity and expert choice run per request (`assign`), before requests are
merged; merging (`plan`) only concatenates rows. A request's output never depends on what it was
batched with; which copy of an expert computes a row never changes the row.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from expert_workers.spec import MoESpec
from expert_workers.weights import RouterWeights
from router_svc.config import DataPlaneConfig
from router_svc.dispatch import GroupPlan, copy_credit, plan_rows, reroute_lost, split_copies
from router_svc.gate import Assignments, GateInput, route, router_logits
from router_svc.table import RoutingTable, layer_orders
from router_svc.transports.base import Batch, Part


class NoLiveReplica(Exception):
    """Requests of a batch need experts with no live replica: request index -> the first such expert
    (-1 for the shared slot)."""

    def __init__(self, experts: dict[int, int]) -> None:
        super().__init__(experts)
        self.experts = experts


class Planned(NamedTuple):
    batch: Batch  # the sorted rows, one part per group, with the table's groups and addresses
    plan: GroupPlan  # what `dispatch.combine` needs to put the answers back
    offsets: list[int]  # request i's tokens are rows offsets[i]:offsets[i + 1] of the merged batch
    degraded: list[int]  # merged-token indices answered without one of their experts (failover drop/reroute)


class Planner:
    """Gates and plans for one router. Holds, per layer, the rows owed to each live copy of an
    expert (see dispatch.split_copies), counted afresh with each table or set of dead groups."""

    def __init__(self, spec: MoESpec, config: DataPlaneConfig, gates: dict[int, RouterWeights],
                 shared_gates: dict[int, torch.Tensor]) -> None:
        self.spec, self.config, self.gates, self.shared_gates = spec, config, gates, shared_gates
        self._credits: dict[int, tuple[tuple[int, frozenset[int]], torch.Tensor]] = {}

    def assign(self, layer: int, x_TD: torch.Tensor, ids: torch.Tensor | None) -> Assignments:
        """One request's gate, capacity and expert choice."""
        gate = self.gates[layer]
        logits = router_logits(x_TD, gate.weight, self.spec.routing)
        return route(GateInput(logits_TE=logits, correction_bias_E=gate.correction_bias, token_ids_T=ids), self.spec.routing)

    def plan(self, layer: int, assignments: list[Assignments], x_all: torch.Tensor, request_ids: Sequence[str],
             table: RoutingTable, dead: frozenset[int], groups: Sequence[Any], addresses: Sequence[str]) -> Planned:
        """Merge per-request assignments (token indices offset), add shared-slot rows, pick a live copy
        for each, sort by (group, slot). An assignment whose expert has no live copy: failover 'wait' or
        'fail' raise NoLiveReplica (naming the requests that need one); 'drop' and 'reroute' answer
        without it (reported degraded)."""
        sizes, tokens, experts, weights = [0], [], [], []
        for a in assignments:
            n = int(a.logits_TE.shape[0])
            tokens.append(a.token_N + sizes[-1] if sizes[-1] else a.token_N)
            experts.append(a.expert_N)
            weights.append(a.weight_N)
            sizes.append(sizes[-1] + n)
        total = sizes[-1]
        if self.config.shared_experts == "slot" and self.spec.shared_experts.count:
            all_tokens = torch.arange(total)
            gate = self.shared_gates.get(layer)
            # NOTE: the gate as SharedExperts runs it (in the compute dtype), so both placements agree.
            w = torch.ones(total) if gate is None else torch.sigmoid(F.linear(x_all, gate)).squeeze(-1)
            tokens.append(all_tokens)
            experts.append(torch.full((total,), self.spec.num_experts, dtype=torch.int64))
            weights.append(w)
        # NOTE: a lone request's tensors as they are: a cat of one, like every op here, costs more than
        # its arithmetic on a router's small batches.
        token_N, expert_N, weight_N = (t[0] if len(t) == 1 else torch.cat(t) for t in (tokens, experts, weights))
        weight_N = weight_N.float()
        group_ER, local_ER, count_E = table.lookup_alive(layer, dead)
        degraded: list[int] = []
        routed_live, shared_live = table.live_everywhere(layer, dead)
        if not (routed_live and (shared_live or len(tokens) == len(assignments))) and bool((count_E[expert_N] == 0).any()):
            lost = count_E[expert_N] == 0
            if self.config.failover in ("wait", "fail"):
                # NOTE: per request: those that need none of the lost experts are served all the same.
                request_N = torch.searchsorted(torch.tensor(sizes[1:]), token_N[lost], right=True)
                lacking: dict[int, int] = {}
                for i, e in zip(request_N.tolist(), expert_N[lost].tolist()):
                    lacking.setdefault(i, -1 if e == self.spec.num_experts else e)
                raise NoLiveReplica(lacking)
            degraded = sorted(set(token_N[lost].tolist()))
            if self.config.failover == "reroute":
                logits_TE = torch.cat([a.logits_TE.float() for a in assignments])
                expert_N, lost = reroute_lost(token_N, expert_N, lost, logits_TE, count_E[: self.spec.num_experts] > 0)
            keep = ~lost
            token_N, expert_N, weight_N = token_N[keep], expert_N[keep], weight_N[keep]
        cum_ER = table.split_alive(layer, dead)
        pick_N = split_copies(expert_N, cum_ER, self.config.replica_min_rows, self._credit(layer, table, dead, cum_ER))
        g_N, l_N = group_ER[expert_N, pick_N], local_ER[expert_N, pick_N]
        plan = plan_rows(token_N, weight_N, g_N, l_N, orders=layer_orders(table, layer), part_type=Part)
        x_sorted = x_all.index_select(0, plan.token_N)
        batch = Batch(layer=layer, x_ND=x_sorted, parts=plan.parts, groups=groups, addresses=addresses, request_ids=tuple(request_ids))
        return Planned(batch, plan, sizes, degraded)

    def _credit(self, layer: int, table: RoutingTable, dead: frozenset[int], cum_ER: torch.Tensor) -> torch.Tensor:
        """The layer's rows owed to each live copy, afresh with each table or set of dead groups (the
        copies it counts for change with them)."""
        key = (table.version, dead)
        held = self._credits.get(layer)
        if held is None or held[0] != key:
            held = self._credits[layer] = (key, copy_credit(cum_ER))
        return held[1]
