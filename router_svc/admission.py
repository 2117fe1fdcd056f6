"""Admission: validate a forward request before any work is done.

Every check raises `InvalidRequestError` naming the field and what is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from expert_workers.errors import InvalidRequestError
from expert_workers.spec import MoESpec

ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_tensor(hidden_states: object) -> torch.Tensor:
    """A torch tensor or numpy array -> torch tensor (numpy shares memory)."""
    if isinstance(hidden_states, torch.Tensor):
        return hidden_states
    if isinstance(hidden_states, np.ndarray):
        if hidden_states.dtype not in (np.float32, np.float16):
            raise InvalidRequestError(
                field="hidden_states", problem=f"dtype {hidden_states.dtype} not supported; use float32 or float16",
            )
        return torch.from_numpy(np.ascontiguousarray(hidden_states))
    raise InvalidRequestError(field="hidden_states", problem=f"expected a torch.Tensor or numpy.ndarray, got {type(hidden_states).__name__}")


def check_layer(layer: object, spec: MoESpec) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise InvalidRequestError(field="layer", problem=f"expected an integer layer index, got {layer!r}")
    layer = int(layer)
    if not 0 <= layer < spec.num_layers:
        raise InvalidRequestError(field="layer", problem=f"layer {layer} out of range [0, {spec.num_layers})")
    if layer not in spec.is_moe_layer:
        raise InvalidRequestError(field="layer", problem=f"layer {layer} is not an MoE layer; MoE layers: {list(spec.moe_layers)}")
    return layer


def check_hidden(x: torch.Tensor, spec: MoESpec) -> None:
    if x.dtype not in ACCEPTED_DTYPES:
        raise InvalidRequestError(field="hidden_states", problem=f"dtype {x.dtype} not supported; use float32, float16 or bfloat16")
    if x.dim() not in (2, 3):
        raise InvalidRequestError(field="hidden_states", problem=f"rank {x.dim()} (shape {tuple(x.shape)}); expected [tokens, hidden] or [batch, seq, hidden]")
    if x.shape[-1] != spec.hidden_size:
        raise InvalidRequestError(field="hidden_states", problem=f"hidden size {x.shape[-1]} != model hidden size {spec.hidden_size}")
    # NOTE: a finite sum proves every value finite (a NaN or an infinity makes the sum NaN or infinite);
    # only a sum that is not (NaN/Inf present, or finite values overflowing it) needs the full test,
    # which costs ten times the sum on a small request.
    if not math.isfinite(float(x.sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
        raise InvalidRequestError(field="hidden_states", problem="contains NaN or Inf")


def check_token_ids(token_ids: object, x: torch.Tensor, spec: MoESpec) -> torch.Tensor | None:
    """token ids (one per token, [tokens] or [batch, seq]) -> (T,) int64, or None."""
    if token_ids is None:
        if spec.routing.policy == "hash":
            raise InvalidRequestError(field="token_ids", problem="routing policy 'hash' needs token ids, one per token")
        return None
    ids = torch.as_tensor(np.asarray(token_ids)) if not isinstance(token_ids, torch.Tensor) else token_ids
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise InvalidRequestError(field="token_ids", problem=f"expected integers, got dtype {ids.dtype}")
    tokens = x.numel() // x.shape[-1]
    if ids.numel() != tokens or (ids.dim() > 1 and tuple(ids.shape) != tuple(x.shape[:-1])):
        raise InvalidRequestError(field="token_ids", problem=f"{ids.numel()} ids (shape {tuple(ids.shape)}) for {tokens} tokens (shape {tuple(x.shape[:-1])})")
    return ids.reshape(-1).to(device=x.device, dtype=torch.int64)
