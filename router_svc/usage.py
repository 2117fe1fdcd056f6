"""Where tokens go, per layer: tokens per expert, which experts are chosen together (co-activation),
and, for requests that carry token ids, the ids each expert sees most (specialisation).

Legend: T tokens, E experts, N assignments. Counts are cumulative since the router started.
"""

from __future__ import annotations

from collections import Counter

import torch

from router_svc.gate import Assignments

# distinct token ids remembered per expert; past it the rarer half is forgotten (heavy hitters stay)
MAX_IDS_PER_EXPERT = 4096


class Usage:
    def __init__(self, layers: list[int], num_experts: int) -> None:
        self.num_experts = num_experts
        self.tokens = {layer: torch.zeros(num_experts, dtype=torch.int64) for layer in layers}
        self.coactivation = {layer: torch.zeros((num_experts, num_experts), dtype=torch.int64) for layer in layers}
        self.ids: dict[int, list[Counter]] = {layer: [Counter() for _ in range(num_experts)] for layer in layers}
        # sums of the router probabilities per expert and tokens seen (the load-balancing loss's P_e)
        self.prob_sums = {layer: torch.zeros(num_experts, dtype=torch.float64) for layer in layers}
        self.seen = {layer: 0 for layer in layers}

    def record(self, layer: int, a: Assignments, token_ids: torch.Tensor | None = None) -> None:
        """One request's assignments (`a.token_N`, `a.expert_N`)."""
        e = self.num_experts
        self.tokens[layer] += torch.bincount(a.expert_N, minlength=e)
        t = int(a.logits_TE.shape[0])
        if a.probs_TE is not None and t:
            self.prob_sums[layer] += a.probs_TE.to(torch.float64).sum(0)
        self.seen[layer] += t
        if t == 0 or a.expert_N.numel() == 0:
            return
        onehot_TE = torch.zeros((t, e), dtype=torch.float32)
        onehot_TE[a.token_N, a.expert_N] = 1.0
        # tokens that chose both i and j (the diagonal: tokens that chose i)
        self.coactivation[layer] += (onehot_TE.t() @ onehot_TE).round().to(torch.int64)
        if token_ids is not None:
            ids = token_ids.reshape(-1)[a.token_N].tolist()
            for tok, ex in zip(ids, a.expert_N.tolist()):
                c = self.ids[layer][ex]
                c[tok] += 1
                if len(c) > MAX_IDS_PER_EXPERT:
                    for k, _ in c.most_common()[MAX_IDS_PER_EXPERT // 2:]:
                        del c[k]

    def top_ids(self, layer: int, n: int = 10) -> list[list[tuple[int, int]]]:
        """Per expert, its `n` most frequent token ids with counts."""
        return [c.most_common(n) for c in self.ids[layer]]

    def snapshot(self, top: int = 10) -> dict[str, dict[int, list]]:
        return {"expert_tokens": {l: v.tolist() for l, v in self.tokens.items()},
                "coactivation": {l: v.tolist() for l, v in self.coactivation.items()},
                "top_token_ids": {l: [[list(p) for p in row] for row in self.top_ids(l, top)] for l in self.tokens}}
