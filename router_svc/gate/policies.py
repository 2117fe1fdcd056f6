"""Routing policies: small pure functions from router logits to expert choices.

Legend: T tokens, E experts, K top-k, N (token, expert) assignments.

A token-choice policy returns a `GateDecision` (K experts per token, before any
capacity limit) with the ranking it used, so overflow handling can reroute a
token to its next-best expert and re-weigh it the way the policy would have.
`expert_choice` returns final `Assignments` directly: each expert picks tokens.
Policies are looked up by name in `POLICIES`; routing always runs in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

from expert_workers.errors import InvalidRequestError
from expert_workers.spec import RoutingSpec


@dataclass(frozen=True)
class GateInput:
    """logits (T, E) float32; correction bias (E,) or None; token ids (T,) int64 or None."""

    logits_TE: torch.Tensor
    correction_bias_E: torch.Tensor | None = None
    token_ids_T: torch.Tensor | None = None


@dataclass(frozen=True)
class GateDecision:
    """Token choice before capacity. ids/weights (T, K); select_scores/probs (T, E).

    select_scores ranks experts per token (higher is better; -inf = not allowed).
    probs is the router's probability per expert (rows sum to 1), for statistics.
    reweight maps any (T, K) expert set to the weights the policy gives it.
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    select_scores_TE: torch.Tensor
    probs_TE: torch.Tensor
    reweight: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Assignments:
    """Final routing as N triples plus per-request counts. probs (T, E) for statistics."""

    token_N: torch.Tensor
    expert_N: torch.Tensor
    weight_N: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    dropped: int = 0
    rerouted: int = 0


def _renorm(w_TK: torch.Tensor) -> torch.Tensor:
    return w_TK / w_TK.sum(dim=-1, keepdim=True)


def softmax_topk(inp: GateInput, spec: RoutingSpec) -> GateDecision:
    """Mixtral: the top-k experts by logit, weights softmax over those k logits.

    NOTE: computed as softmax over all E, top-k, renormalise: the same numbers, in the
    order `transformers` computes them, so ties break identically.
    """
    probs = torch.softmax(inp.logits_TE, dim=-1)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    scale = spec.routed_scaling_factor
    return GateDecision(
        topk_ids_TK=ids,
        topk_weights_TK=_renorm(weights) * scale,
        select_scores_TE=probs,
        probs_TE=probs,
        reweight=lambda ids_TK: _renorm(probs.gather(1, ids_TK)) * scale,
    )


def topk_softmax(inp: GateInput, spec: RoutingSpec) -> GateDecision:
    """Switch / Qwen / OLMoE: softmax over E, top-k; renormalise if `normalize_topk`."""
    probs = torch.softmax(inp.logits_TE, dim=-1)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    scale = spec.routed_scaling_factor
    norm = _renorm if spec.normalize_topk else (lambda w: w)
    return GateDecision(
        topk_ids_TK=ids,
        topk_weights_TK=norm(weights) * scale,
        select_scores_TE=probs,
        probs_TE=probs,
        reweight=lambda ids_TK: norm(probs.gather(1, ids_TK)) * scale,
    )


def _scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    return torch.sigmoid(logits_TE) if score_function == "sigmoid" else torch.softmax(logits_TE, dim=-1)


def sigmoid_group_topk(inp: GateInput, spec: RoutingSpec) -> GateDecision:
    """DeepSeek-V3: sigmoid scores; the correction bias is added for selection only.

    Experts form `num_groups` groups; a group scores the sum of its best two
    biased scores; a token picks among the experts of its `topk_groups` best
    groups. Weights are the unbiased scores of the chosen experts, renormalised
    if `normalize_topk`, times `routed_scaling_factor`.
    """
    t, e = inp.logits_TE.shape
    scores = _scores(inp.logits_TE, spec.score_function)
    choice = scores if inp.correction_bias_E is None else scores + inp.correction_bias_E.float()
    if spec.num_groups > 1:
        per_group = e // spec.num_groups
        grouped = choice.view(t, spec.num_groups, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # (T, G)
        group_idx = torch.topk(group_scores, spec.topk_groups, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand(t, spec.num_groups, per_group).reshape(t, e)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, spec.top_k, dim=-1, sorted=False).indices
    scale = spec.routed_scaling_factor

    def weigh(ids_TK: torch.Tensor) -> torch.Tensor:
        w = scores.gather(1, ids_TK)
        if spec.normalize_topk:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * scale

    return GateDecision(
        topk_ids_TK=ids,
        topk_weights_TK=weigh(ids),
        select_scores_TE=choice,
        probs_TE=scores / scores.sum(dim=-1, keepdim=True),
        reweight=weigh,
    )


def noisy_topk(inp: GateInput, spec: RoutingSpec) -> GateDecision:
    """Shazeer et al. 2017: top-k of (logits + noise), softmax over the k.

    Noise N(0, noise_std^2) is added only when `spec.noisy` (training-style
    exploration; off at inference). A `noise_seed` makes it reproducible.
    """
    logits = inp.logits_TE
    if spec.noisy and spec.noise_std > 0:
        gen = None
        if spec.noise_seed is not None:
            gen = torch.Generator(device=logits.device).manual_seed(spec.noise_seed)
        noise = torch.randn(logits.shape, generator=gen, device=logits.device, dtype=logits.dtype)
        logits = logits + noise * spec.noise_std
    return softmax_topk(GateInput(logits_TE=logits), spec)


_HASH_MASK = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (no overflow: operands stay < 2^59)."""
    x = x & _HASH_MASK
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _HASH_MASK
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _HASH_MASK
    return (x >> 16) ^ x


def hash_scores(token_ids_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A fixed pseudo-random ranking of experts per token id: (T,) -> (T, E) in [0, 1)."""
    experts = torch.arange(num_experts, device=token_ids_T.device, dtype=torch.int64)
    keys = _mix32(token_ids_T.to(torch.int64))[:, None] * 0x9E3779B1 + experts[None, :]
    return _mix32(keys).to(torch.float64).div(2.0**32).to(torch.float32)


def hash_routing(inp: GateInput, spec: RoutingSpec) -> GateDecision:
    """Hash layers (Roller et al. 2021): experts fixed by token id, equal weights 1/k."""
    if inp.token_ids_T is None:
        raise InvalidRequestError(field="token_ids", problem="routing policy 'hash' needs token ids, one per token")
    t, e = inp.logits_TE.shape
    ranking = hash_scores(inp.token_ids_T, e)
    ids = torch.topk(ranking, spec.top_k, dim=-1).indices
    uniform = lambda ids_TK: torch.full(ids_TK.shape, spec.routed_scaling_factor / spec.top_k, device=ids_TK.device)
    return GateDecision(
        topk_ids_TK=ids,
        topk_weights_TK=uniform(ids),
        select_scores_TE=ranking,
        probs_TE=torch.softmax(inp.logits_TE, dim=-1),
        reweight=uniform,
    )


def ceil_capacity(factor: float, assignments: int, num_experts: int) -> int:
    """ceil(factor * assignments / num_experts), with the factor taken as the decimal it was written
    as: in floats 1.1 * 400 / 8 is 55.000000000000007 and would give 56, not 55."""
    return math.ceil(Fraction(str(factor)) * assignments / num_experts)


def expert_choice_capacity(tokens: int, spec: RoutingSpec, num_experts: int) -> int:
    """Tokens each expert takes: ceil(C * T * k / E), C = capacity_factor (default 1), at most T."""
    factor = spec.capacity_factor if spec.capacity_factor is not None else 1.0
    return min(tokens, ceil_capacity(factor, tokens * spec.top_k, num_experts))


def expert_choice(inp: GateInput, spec: RoutingSpec) -> Assignments:
    """Zhou et al. 2022: each expert takes its top-c tokens by softmax score; weight = score.

    A token may get any number of experts (zero included); never one expert twice.
    """
    t, e = inp.logits_TE.shape
    probs = torch.softmax(inp.logits_TE, dim=-1)
    c = expert_choice_capacity(t, spec, e)
    vals_EC, tokens_EC = torch.topk(probs.t(), c, dim=-1)
    experts_EC = torch.arange(e, device=probs.device)[:, None].expand(e, c)
    return Assignments(
        token_N=tokens_EC.reshape(-1),
        expert_N=experts_EC.reshape(-1),
        weight_N=vals_EC.reshape(-1) * spec.routed_scaling_factor,
        probs_TE=probs,
        logits_TE=inp.logits_TE,
    )


Policy = Callable[[GateInput, RoutingSpec], "GateDecision | Assignments"]
POLICIES: dict[str, Policy] = {
    "softmax_topk": softmax_topk,
    "topk_softmax": topk_softmax,
    "sigmoid_group_topk": sigmoid_group_topk,
    "noisy_topk": noisy_topk,
    "hash": hash_routing,
    "expert_choice": expert_choice,
}
