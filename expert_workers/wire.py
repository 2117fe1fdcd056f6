"""Tensors on the wire: a dtype name, a shape and raw little-endian bytes; no pickle.

float32 / float16 travel as numpy arrays (zero-copy out of Ray's object store);
bfloat16, which numpy lacks, travels as its int16 bit pattern with the name "bfloat16".
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from expert_workers.errors import InvalidRequestError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_NUMPY: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<i2")}
# NOTE: read-only buffers (object store, gRPC messages) are never written to: every consumer copies
# or reads. The filter names this module, so torch's warning about them stays on for other code;
# set once here, not per call (a catch_warnings block per tensor cost more than the conversion).
warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning, module=__name__)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAMES[dtype]
    except KeyError:
        raise InvalidRequestError(field="dtype", problem=f"{dtype} not supported; use one of {sorted(DTYPES)}") from None


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU tensor -> (array sharing its memory where possible, dtype name)."""
    name = dtype_name(t.dtype)
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if name == "bfloat16":
        t = t.view(torch.int16)
    return t.numpy(), name


def from_numpy(arr: np.ndarray, name: str) -> torch.Tensor:
    """(array, dtype name) -> tensor sharing the array's memory (arrays from the object store are read-only)."""
    if name not in DTYPES:
        raise InvalidRequestError(field="dtype", problem=f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def to_bytes(t: torch.Tensor) -> tuple[bytes | memoryview, str, tuple[int, ...]]:
    arr, name = to_numpy(t)
    return memoryview(arr.reshape(-1)).cast("B"), name, tuple(arr.shape)


def from_bytes(data: bytes | memoryview, name: str, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Raw little-endian bytes -> tensor; the byte count must equal prod(shape) * itemsize."""
    if name not in DTYPES:
        raise InvalidRequestError(field="dtype", problem=f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InvalidRequestError(field="shape", problem=f"negative dimension in {shape}")
    np_dtype = _NUMPY[name]
    # NOTE: exact integer product: np.prod wraps at 2^63, and a wrapped count can match the data length.
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidRequestError(field="data", problem=f"{len(data)} bytes for shape {list(shape)} of {name} ({expected} expected)")
    arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    return from_numpy(arr, name)
