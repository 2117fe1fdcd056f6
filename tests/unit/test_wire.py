"""Tensors on the wire (expert_workers.wire): exact round trips and rejected inputs.

Expectations are computed independently of the module: bit patterns come from
`struct` (IEEE little-endian) and from torch's own int views of the tensors.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch

from expert_workers import wire
from expert_workers.errors import InvalidRequestError

pytestmark = pytest.mark.unit

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# an integer dtype of the same width, to compare tensors bit for bit (NaN payloads, -0.0 included).
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values plus the awkward ones (+-0, +-inf, nan, tiny, huge) where there is room."""
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen) * 100).to(dtype)
    flat = t.reshape(-1)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -6.0e4, 3.0e38]).to(dtype)
    n = min(flat.numel(), special.numel())
    flat[:n] = special[:n]
    return t


SHAPES = [(5,), (3, 4), (2, 3, 4), (1, 1, 1), (), (0,)]


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_round_trip_is_bit_exact(name: str, shape: tuple[int, ...]) -> None:
    t = sample(shape, DTYPES[name], seed=len(shape))
    arr, got_name = wire.to_numpy(t)
    assert got_name == name
    assert arr.shape == shape
    back = wire.from_numpy(arr, got_name)
    assert back.dtype == DTYPES[name]
    assert tuple(back.shape) == shape
    assert torch.equal(bits(back), bits(t))


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_round_trip_is_bit_exact(name: str, shape: tuple[int, ...]) -> None:
    t = sample(shape, DTYPES[name], seed=7 + len(shape))
    data, got_name, got_shape = wire.to_bytes(t)
    assert got_name == name
    assert got_shape == shape
    assert len(data) == t.numel() * ITEMSIZE[name]
    back = wire.from_bytes(bytes(data), got_name, list(got_shape))
    assert back.dtype == DTYPES[name]
    assert tuple(back.shape) == shape
    assert torch.equal(bits(back), bits(t))


@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 4)], ids=str)
def test_bytes_round_trip_of_zero_size_multidim_tensor(shape: tuple[int, ...]) -> None:
    """An empty (0, D) batch must travel like any other.

    BUG (expert_workers/wire.py, to_bytes): `memoryview(arr).cast("B")` raises
    TypeError "cannot cast view with zeros in shape or strides" for any
    multi-dimensional array with a zero dimension, e.g. torch.zeros(0, 3).
    """
    for name, dtype in DTYPES.items():
        t = torch.zeros(shape, dtype=dtype)
        data, got_name, got_shape = wire.to_bytes(t)
        assert (len(data), got_name, got_shape) == (0, name, shape)
        back = wire.from_bytes(data, got_name, got_shape)
        assert tuple(back.shape) == shape and back.dtype == dtype


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 4), (0,)], ids=str)
def test_from_bytes_accepts_empty_payload_for_zero_size_shape(name: str, shape: tuple[int, ...]) -> None:
    back = wire.from_bytes(b"", name, shape)
    assert tuple(back.shape) == shape
    assert back.dtype == DTYPES[name]
    assert back.numel() == 0


def test_float32_bytes_are_ieee_little_endian() -> None:
    values = [1.0, -2.5, 0.15625, 2.0**100]
    data, name, shape = wire.to_bytes(torch.tensor(values, dtype=torch.float32))
    assert bytes(data) == struct.pack("<4f", *values)
    assert (name, shape) == ("float32", (4,))
    back = wire.from_bytes(struct.pack("<4f", *values), "float32", [4])
    assert back.tolist() == values


def test_float16_bytes_are_ieee_half_little_endian() -> None:
    values = [1.0, -2.0, 0.5, 65504.0]
    data, _, _ = wire.to_bytes(torch.tensor(values, dtype=torch.float16))
    assert bytes(data) == struct.pack("<4e", *values)


def test_bfloat16_travels_as_its_int16_bit_pattern() -> None:
    # bfloat16 is the top half of a float32: these values are exact in both.
    values = [1.0, -2.0, 0.5, 3.0, -0.0]
    expected_bits = [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in values]
    t = torch.tensor(values, dtype=torch.bfloat16)
    arr, name = wire.to_numpy(t)
    assert name == "bfloat16"
    assert arr.dtype == np.dtype("<i2")
    assert (arr.astype(np.int64) & 0xFFFF).tolist() == expected_bits
    data, _, _ = wire.to_bytes(t)
    assert bytes(data) == struct.pack("<5H", *expected_bits)
    back = wire.from_bytes(struct.pack("<5H", *expected_bits), "bfloat16", (5,))
    assert back.dtype == torch.bfloat16
    assert back.float().tolist() == values


def test_to_bytes_of_a_non_contiguous_tensor_sends_its_logical_order() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()  # (4, 3), not contiguous
    data, name, shape = wire.to_bytes(t)
    assert shape == (4, 3)
    expected = [float(base[j, i]) for i in range(4) for j in range(3)]
    assert bytes(data) == struct.pack("<12f", *expected)


def test_from_numpy_accepts_a_read_only_array() -> None:
    arr = np.arange(6, dtype="<f4").reshape(2, 3)
    arr.setflags(write=False)
    t = wire.from_numpy(arr, "float32")
    assert t.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize(
    "name, shape, nbytes",
    [
        ("float32", (2, 3), 23),
        ("float32", (2, 3), 25),
        ("float16", (4,), 4),
        ("bfloat16", (2, 2), 0),
        ("float32", (0, 3), 4),
        ("float16", (), 4),
    ],
)
def test_from_bytes_rejects_a_byte_count_that_does_not_match_the_shape(name: str, shape: tuple[int, ...], nbytes: int) -> None:
    expected = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[name]
    msg = re.escape(f"invalid request field 'data': {nbytes} bytes for shape {list(shape)} of {name} ({expected} expected)")
    with pytest.raises(InvalidRequestError, match=msg) as info:
        wire.from_bytes(b"\x00" * nbytes, name, shape)
    assert info.value.field == "data"


@pytest.mark.parametrize("name", ["float64", "int8", "bf16", "", "Float32"])
def test_from_bytes_rejects_unknown_dtype_names(name: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(f"invalid request field 'dtype': unknown dtype {name!r}")) as info:
        wire.from_bytes(b"\x00" * 8, name, (2,))
    assert info.value.field == "dtype"


@pytest.mark.parametrize("name", ["float64", "int16"])
def test_from_numpy_rejects_unknown_dtype_names(name: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(f"unknown dtype {name!r}")):
        wire.from_numpy(np.zeros(2, dtype="<f4"), name)


@pytest.mark.parametrize("shape", [(-1,), (2, -1), (-2, -3), (3, 0, -1)], ids=str)
def test_from_bytes_rejects_negative_dimensions(shape: tuple[int, ...]) -> None:
    # (-2, -3) has a positive product (6 * 4 = 24 bytes): the sign check must not rely on the byte count.
    nbytes = abs(int(np.prod(shape))) * 4
    with pytest.raises(InvalidRequestError, match=re.escape(f"invalid request field 'shape': negative dimension in {shape}")) as info:
        wire.from_bytes(b"\x00" * nbytes, "float32", list(shape))
    assert info.value.field == "shape"


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int16, torch.bool])
def test_to_numpy_rejects_unsupported_tensor_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(f"invalid request field 'dtype': {dtype} not supported")):
        wire.to_numpy(torch.zeros(2, dtype=dtype))
