"""Where a process gets its weights: a checkpoint path or a seeded random spec, as plain data.

A `SourceSpec` crosses process boundaries (Ray actor arguments); `open_source` turns it
into a `WeightSource` in the process that loads slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from expert_workers.checkpoint import HFCheckpoint
from expert_workers.spec import MoESpec
from expert_workers.weights import RandomWeights, WeightSource


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """Exactly one of `path` (HF checkpoint directory) or `random` (a spec, with `seed`)."""

    path: str | None = None
    random: MoESpec | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "random": None if self.random is None else self.random.to_dict(), "seed": self.seed}


def open_source(src: SourceSpec) -> WeightSource:
    if src.path is not None:
        return HFCheckpoint(src.path)
    assert src.random is not None, "SourceSpec needs a path or a random spec"
    return RandomWeights(src.random, seed=src.seed)
