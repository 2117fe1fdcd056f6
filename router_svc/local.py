"""LocalMoE: the in-process engine, the one-machine mode and the reference for every other path.

Legend: T tokens, D hidden, E experts, N assignments.

forward = admit -> gate (float32 logits) -> policy + capacity -> plan (sort by
expert) -> grouped expert compute -> combine (index_add) -> + shared experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from expert_workers.checkpoint import HFCheckpoint
from expert_workers.ffn import GroupedExperts
from expert_workers.spec import MoESpec, RoutingSpec
from expert_workers.weights import RandomWeights, RouterWeights, SharedWeights, WeightSource
from router_svc import admission
from router_svc.dispatch import combine, gather_rows, plan_by_expert
from router_svc.gate import Assignments, GateInput, RoutingStats, route, router_logits, routing_stats


@dataclass(frozen=True)
class RoutingReport:
    """What the gate decided for one request: N triples (token index, expert, weight) and statistics."""

    token_index: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    stats: RoutingStats


class SharedExperts:
    """A layer's shared experts, ready to run on every token: the FFN through the same grouped
    compute as routed experts (prepacked weights on CPU), sigmoid-gated when the model says so."""

    def __init__(self, weights: SharedWeights, spec: MoESpec, *, dtype: torch.dtype, device: torch.device | str,
                 impl: str = "auto") -> None:
        self.ffn = GroupedExperts([weights.ffn.to(dtype=dtype, device=device)], activation=spec.activation,
                                  gated=spec.gated, impl=impl)
        self.gate = None if weights.gate is None else weights.gate.to(device=device, dtype=dtype)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, D)."""
        y = self.ffn.forward(x_TD, [x_TD.shape[0]])
        if self.gate is not None:
            y = torch.sigmoid(F.linear(x_TD, self.gate)) * y
        return y


@dataclass(frozen=True)
class _Layer:
    router: RouterWeights
    experts: GroupedExperts
    shared: SharedExperts | None


class LocalMoE:
    """All experts of all MoE layers in this process.

    `dtype` is the compute dtype of the experts (default: the source's);
    inputs of another float dtype are cast to it and the output cast back.
    Layers load lazily, on first use.
    """

    def __init__(
        self,
        source: WeightSource,
        *,
        routing: RoutingSpec | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        impl: str = "auto",
    ) -> None:
        self.source = source
        self.spec: MoESpec = source.spec if routing is None else replace(source.spec, routing=routing)
        self.dtype = dtype
        self.device = torch.device(device)
        self.impl = impl
        self._layers: dict[int, _Layer] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> "LocalMoE":
        """A Hugging Face checkpoint directory (config.json + safetensors). Names and shapes are checked up front."""
        ckpt = HFCheckpoint(path)
        ckpt.validate()
        return cls(ckpt, **kwargs)

    @classmethod
    def from_config(cls, config: MoESpec | Mapping[str, Any], seed: int = 0, **kwargs: Any) -> "LocalMoE":
        """Seeded random weights for a spec (or its dict form)."""
        spec = config if isinstance(config, MoESpec) else MoESpec.from_dict(config)
        return cls(RandomWeights(spec, seed=seed), **kwargs)

    def layer(self, layer: int) -> _Layer:
        if layer not in self._layers:
            experts = [self.source.expert(layer, e) for e in range(self.spec.num_experts)]
            dtype = self.dtype or experts[0].w_in.dtype
            shared = self.source.shared(layer)
            self._layers[layer] = _Layer(
                router=self.source.router(layer),
                experts=GroupedExperts(
                    [e.to(dtype=dtype, device=self.device) for e in experts],
                    activation=self.spec.activation, gated=self.spec.gated, impl=self.impl,
                ),
                shared=None if shared is None else SharedExperts(shared, self.spec, dtype=dtype, device=self.device, impl=self.impl),
            )
        return self._layers[layer]

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor | np.ndarray,
        layer: int,
        token_ids: Any = None,
        return_routing: bool = False,
    ) -> torch.Tensor | np.ndarray | tuple[Any, RoutingReport]:
        """hidden_states [T, D] or [B, S, D] -> the MoE block's output, same shape, dtype and kind.

        With return_routing=True, returns (output, RoutingReport).
        """
        as_numpy = isinstance(hidden_states, np.ndarray)
        x = admission.as_tensor(hidden_states)
        layer = admission.check_layer(layer, self.spec)
        admission.check_hidden(x, self.spec)
        ids_T = admission.check_token_ids(token_ids, x, self.spec)
        lw = self.layer(layer)
        x_TD = x.reshape(-1, self.spec.hidden_size).to(device=self.device, dtype=lw.experts.dtype)
        out_TD, assignments = self._forward_tokens(x_TD, lw, ids_T)
        out = out_TD.to(dtype=x.dtype, device=x.device).reshape(x.shape)
        if as_numpy:
            out = out.numpy()
        if not return_routing:
            return out
        report = RoutingReport(
            token_index=assignments.token_N,
            expert=assignments.expert_N,
            weight=assignments.weight_N,
            stats=routing_stats(assignments, self.spec.num_experts),
        )
        return out, report

    __call__ = forward

    def _forward_tokens(
        self, x_TD: torch.Tensor, lw: _Layer, ids_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, Assignments]:
        logits_TE = router_logits(x_TD, lw.router.weight.to(x_TD.device), self.spec.routing)
        bias = lw.router.correction_bias
        assignments = route(
            GateInput(
                logits_TE=logits_TE,
                correction_bias_E=None if bias is None else bias.to(x_TD.device),
                token_ids_T=ids_T,
            ),
            self.spec.routing,
        )
        plan = plan_by_expert(assignments, self.spec.num_experts)
        y_ND = lw.experts.forward(gather_rows(x_TD, plan), plan.counts_E)
        out_TD = combine(y_ND, plan, x_TD.shape[0], self.spec.routing.weights_dtype)
        if lw.shared is not None:
            out_TD += lw.shared.forward(x_TD)
        return out_TD, assignments
