"""Weight containers and the seeded random weight source.

Shapes: D hidden, I expert width, E experts. A gated FFN stores its input
projection fused as `w_in` = [W_gate; W_up] of shape (2I, D), the layout
`transformers` uses in memory; an ungated one stores (I, D). `w_out` is (D, I).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch

from expert_workers.spec import MoESpec


@dataclass(frozen=True)
class ExpertWeights:
    """One FFN: w_in (2I or I, D), w_out (D, I)."""

    w_in: torch.Tensor
    w_out: torch.Tensor

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "ExpertWeights":
        return ExpertWeights(w_in=self.w_in.to(device=device, dtype=dtype), w_out=self.w_out.to(device=device, dtype=dtype))

    @property
    def nbytes(self) -> int:
        return self.w_in.numel() * self.w_in.element_size() + self.w_out.numel() * self.w_out.element_size()


@dataclass(frozen=True)
class RouterWeights:
    """The gate of one layer: weight (E, D); correction bias (E,) or None (selection only)."""

    weight: torch.Tensor
    correction_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class SharedWeights:
    """Shared experts of one layer, fused into one FFN; gate (1, D) when sigmoid-gated."""

    ffn: ExpertWeights
    gate: torch.Tensor | None = None


class WeightSource(Protocol):
    """Where a layer's MoE tensors come from. Every method loads only what it names."""

    spec: MoESpec

    def router(self, layer: int) -> RouterWeights: ...

    def expert(self, layer: int, expert: int) -> ExpertWeights: ...

    def shared(self, layer: int) -> SharedWeights | None: ...


def _stable_seed(*parts: object) -> int:
    # NOTE: Python's hash() of str is salted per process; Ray workers must agree on
    # the weights of a slot, so the seed is derived from a cryptographic digest.
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _normal(shape: tuple[int, ...], std: float, *parts: object) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_stable_seed(*parts))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


class RandomWeights:
    """Seeded random weights from a spec alone; any (layer, expert) is reproducible in any process."""

    def __init__(self, spec: MoESpec, seed: int = 0) -> None:
        self.spec = spec
        self.seed = int(seed)

    def _ffn(self, width: int, *tag: object) -> ExpertWeights:
        d = self.spec.hidden_size
        rows = 2 * width if self.spec.gated else width
        return ExpertWeights(
            w_in=_normal((rows, d), d ** -0.5, self.seed, *tag, "w_in"),
            w_out=_normal((d, width), width ** -0.5, self.seed, *tag, "w_out"),
        )

    def router(self, layer: int) -> RouterWeights:
        s = self.spec
        weight = _normal((s.num_experts, s.hidden_size), s.hidden_size ** -0.5, self.seed, layer, "router")
        bias = _normal((s.num_experts,), 0.1, self.seed, layer, "bias") if s.routing.correction_bias else None
        return RouterWeights(weight=weight, correction_bias=bias)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        return self._ffn(self.spec.intermediate_size, layer, expert)

    def shared(self, layer: int) -> SharedWeights | None:
        sh = self.spec.shared_experts
        if sh.count == 0:
            return None
        ffn = self._ffn(sh.count * sh.intermediate_size, layer, "shared")
        gate = None
        if sh.sigmoid_gate:
            gate = _normal((1, self.spec.hidden_size), self.spec.hidden_size ** -0.5, self.seed, layer, "shared_gate")
        return SharedWeights(ffn=ffn, gate=gate)
