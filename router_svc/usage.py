"""Where tokens go, per layer: tokens per expert, which experts are chosen together (co-activation),
and, for requests that carry token ids, the ids each expert sees most (specialisation).

Legend: T tokens, E experts, N assignments. Counts are cumulative since the router started.

NOTE: `record` only queues a request's assignments; they are added up in bulk (one bincount and
one co-activation product over many requests) when anything reads the counts, or once
`FOLD_EVERY` requests (or `FOLD_TOKENS` tokens) are queued. Per request, the eight-odd small tensor ops of adding one
request's counts cost more on a router's path than the request's own gate did.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, NamedTuple

import torch

from router_svc.gate import Assignments

# distinct token ids remembered per expert; past it the rarer half is forgotten (heavy hitters stay)
MAX_IDS_PER_EXPERT = 4096
# a layer's queued requests are added up, reader or not, once this many are queued or they hold
# this many tokens (bounds the co-activation product's rows, tokens x E)
FOLD_EVERY = 64
FOLD_TOKENS = 16384


class _Queued(NamedTuple):
    tokens: int
    token_N: torch.Tensor
    expert_N: torch.Tensor
    prob_sums_E: torch.Tensor | None  # the request's router probabilities summed over tokens (float64)
    token_ids: torch.Tensor | None


class Usage:
    """Thread-safe: the router's loop records, a metrics exporter's thread may read."""

    def __init__(self, layers: list[int], num_experts: int) -> None:
        self.num_experts = num_experts
        self._lock = threading.Lock()
        self._queued: dict[int, list[_Queued]] = {layer: [] for layer in layers}
        self._queued_tokens = {layer: 0 for layer in layers}
        self._tokens = {layer: torch.zeros(num_experts, dtype=torch.int64) for layer in layers}
        self._coactivation = {layer: torch.zeros((num_experts, num_experts), dtype=torch.int64) for layer in layers}
        self._ids: dict[int, list[Counter]] = {layer: [Counter() for _ in range(num_experts)] for layer in layers}
        # sums of the router probabilities per expert and tokens seen (the load-balancing loss's P_e)
        self._prob_sums = {layer: torch.zeros(num_experts, dtype=torch.float64) for layer in layers}
        self._seen = {layer: 0 for layer in layers}

    def record(self, layer: int, a: Assignments, token_ids: torch.Tensor | None = None) -> None:
        """One request's assignments (`a.token_N`, `a.expert_N`); counted by the next read."""
        t = int(a.logits_TE.shape[0])
        # NOTE: summed now, not queued whole: T x E probabilities per request, times the layers of a
        # large model, would be a lot of memory to hold until the next read.
        probs = a.probs_TE.sum(0, dtype=torch.float64) if a.probs_TE is not None and t else None
        q = _Queued(t, a.token_N, a.expert_N, probs, token_ids)
        with self._lock:
            queued = self._queued[layer]
            queued.append(q)
            self._queued_tokens[layer] += q.tokens
            if len(queued) >= FOLD_EVERY or self._queued_tokens[layer] >= FOLD_TOKENS:
                self._fold(layer)

    def _fold(self, layer: int) -> None:
        """Add up the layer's queued requests (caller holds the lock)."""
        queued, self._queued[layer] = self._queued[layer], []
        self._queued_tokens[layer] = 0
        if not queued:
            return
        e = self.num_experts
        self._seen[layer] += sum(q.tokens for q in queued)
        probs = [q.prob_sums_E for q in queued if q.prob_sums_E is not None]
        if probs:
            self._prob_sums[layer] += torch.stack(probs).sum(0)
        queued = [q for q in queued if q.tokens and q.expert_N.numel()]
        if not queued:
            return
        expert_N = torch.cat([q.expert_N for q in queued])
        self._tokens[layer] += torch.bincount(expert_N, minlength=e)
        # every request's tokens get rows of their own: token i of request r is row offset_r + i
        offsets = torch.tensor([0] + [q.tokens for q in queued[:-1]], dtype=torch.int64).cumsum(0)
        rows_N = torch.cat([q.token_N + int(o) for q, o in zip(queued, offsets)])
        onehot_TE = torch.zeros((sum(q.tokens for q in queued), e), dtype=torch.float32)
        onehot_TE[rows_N, expert_N] = 1.0
        # tokens that chose both i and j (the diagonal: tokens that chose i)
        self._coactivation[layer] += (onehot_TE.t() @ onehot_TE).round().to(torch.int64)
        for q in queued:
            if q.token_ids is None:
                continue
            ids = q.token_ids.reshape(-1)[q.token_N].tolist()
            for tok, ex in zip(ids, q.expert_N.tolist()):
                c = self._ids[layer][ex]
                c[tok] += 1
                if len(c) > MAX_IDS_PER_EXPERT:
                    for k, _ in c.most_common()[MAX_IDS_PER_EXPERT // 2:]:
                        del c[k]

    def _folded(self) -> None:
        for layer in self._queued:
            self._fold(layer)

    def _read(self, per_layer: dict[int, Any]) -> dict[int, Any]:
        """A copy of one of the per-layer counts, every queued request added first."""
        with self._lock:
            self._folded()
            return {layer: v.clone() if isinstance(v, torch.Tensor) else v for layer, v in per_layer.items()}

    @property
    def tokens(self) -> dict[int, torch.Tensor]:
        """Per layer, (E,) token-expert assignments per expert."""
        return self._read(self._tokens)

    @property
    def prob_sums(self) -> dict[int, torch.Tensor]:
        return self._read(self._prob_sums)

    @property
    def seen(self) -> dict[int, int]:
        return self._read(self._seen)

    @property
    def coactivation(self) -> dict[int, torch.Tensor]:
        return self._read(self._coactivation)

    def counts(self) -> dict[int, tuple[list[int], list[float], int]]:
        """Per layer, at one instant: (tokens per expert, router probability sums per expert, tokens seen)."""
        with self._lock:
            self._folded()
            return {layer: (self._tokens[layer].tolist(), self._prob_sums[layer].tolist(), self._seen[layer]) for layer in self._tokens}

    def top_ids(self, layer: int, n: int = 10) -> list[list[tuple[int, int]]]:
        """Per expert, its `n` most frequent token ids with counts."""
        with self._lock:
            self._fold(layer)
            return [c.most_common(n) for c in self._ids[layer]]

    def snapshot(self, top: int = 10) -> dict[str, dict[int, list]]:
        with self._lock:
            self._folded()
            out = {"expert_tokens": {l: v.tolist() for l, v in self._tokens.items()},
                   "coactivation": {l: v.tolist() for l, v in self._coactivation.items()},
                   "top_token_ids": {l: [[list(p) for p in c.most_common(top)] for c in self._ids[l]] for l in self._tokens}}
        return out
