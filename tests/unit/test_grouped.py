"""GroupedExperts ('loop', 'onednn' and 'grouped_mm') against a plain per-row reference.

The reference walks the rows one at a time, finds each row's expert from the
counts, and computes act(x W_gate^T) * (x W_up^T) W_down^T (or act(x W_in^T)
W_down^T ungated) with activations written out from their formulas.
NOTE: torch's grouped GEMM needs 16-byte aligned strides, so D and I are multiples of 8.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from expert_workers.errors import ConfigError
from expert_workers.ffn import GroupedExperts, ffn, onednn_available
from expert_workers.weights import ExpertWeights

pytestmark = pytest.mark.unit

D, I = 16, 8
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
IMPLS = ("loop", "onednn", "grouped_mm")
COUNTS = [
    [3, 0, 2, 0, 4],   # zero-row experts in the middle and at the end
    [0, 5, 0, 0, 1],   # zero-row expert first
    [0, 0, 0, 0, 7],   # all rows on the last expert
    [1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0],   # no rows at all
]


def act_ref(name: str, v: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return v / (1.0 + torch.exp(-v))
    if name == "gelu":
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if name == "relu":
        return torch.where(v > 0, v, torch.zeros_like(v))
    raise AssertionError(name)


def reference(x: torch.Tensor, experts: list[ExpertWeights], counts: list[int], activation: str, gated: bool) -> torch.Tensor:
    """Row by row, in float64 from the given (float32) tensors."""
    owner = [e for e, n in enumerate(counts) for _ in range(n)]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for row, e in enumerate(owner):
        xr = x[row].double()
        w_in = experts[e].w_in.double()
        w_out = experts[e].w_out.double()
        if gated:
            width = w_in.shape[0] // 2
            gate = w_in[:width] @ xr
            up = w_in[width:] @ xr
            h = act_ref(activation, gate) * up
        else:
            h = act_ref(activation, w_in @ xr)
        out[row] = w_out @ h
    return out


def make_experts(n: int, gated: bool, seed: int) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * I if gated else I
    return [
        ExpertWeights(
            w_in=torch.randn(rows, D, generator=g) * D**-0.5,
            w_out=torch.randn(D, I, generator=g) * I**-0.5,
        )
        for _ in range(n)
    ]


def make_x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1000 + seed))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("ci", range(len(COUNTS)))
def test_float32_matches_per_row_reference(impl: str, gated: bool, activation: str, ci: int) -> None:
    counts = COUNTS[ci]
    experts = make_experts(len(counts), gated, seed=ci)
    x = make_x(sum(counts), seed=ci)
    g = GroupedExperts(experts, activation=activation, gated=gated, impl=impl)
    assert g.impl == impl
    y = g.forward(x, counts)
    assert y.shape == x.shape and y.dtype == torch.float32
    ref = reference(x, experts, counts, activation, gated)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 6e-3)])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_low_precision_close_to_float32_reference(impl: str, dtype: torch.dtype, tol: float, gated: bool, activation: str) -> None:
    counts = [6, 0, 9, 0, 5, 12]
    experts = make_experts(len(counts), gated, seed=7)
    x = make_x(sum(counts), seed=7)
    if impl == "onednn" and not onednn_available(dtype):
        with pytest.raises(ConfigError, match="'impl'"):
            GroupedExperts([e.to(dtype=dtype) for e in experts], activation=activation, gated=gated, impl=impl)
        return
    g = GroupedExperts([e.to(dtype=dtype) for e in experts], activation=activation, gated=gated, impl=impl)
    assert g.dtype == dtype
    y = g.forward(x.to(dtype), counts)
    assert y.dtype == dtype
    ref = reference(x, experts, counts, activation, gated)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_as_tensor(impl: str) -> None:
    counts = [2, 0, 3]
    experts = make_experts(3, True, seed=3)
    x = make_x(5, seed=3)
    g = GroupedExperts(experts, activation="silu", gated=True, impl=impl)
    y = g.forward(x, torch.tensor(counts))
    torch.testing.assert_close(y.double(), reference(x, experts, counts, "silu", True), rtol=1e-5, atol=1e-5)


def test_single_expert_equals_dense_ffn_reference() -> None:
    experts = make_experts(1, True, seed=5)
    x = make_x(4, seed=5)
    ref = reference(x, experts, [4], "gelu", True)
    torch.testing.assert_close(ffn(x, experts[0], activation="gelu", gated=True).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts,rows", [([2, 2, 2], 5), ([2, 2, 2], 7), ([3, 3], 6), ([1, 1, 1, 0], 3), ([], 0)])
def test_counts_must_cover_the_rows(impl: str, counts: list[int], rows: int) -> None:
    g = GroupedExperts(make_experts(3, True, seed=0), activation="silu", gated=True, impl=impl)
    with pytest.raises(ValueError, match="counts"):
        g.forward(make_x(rows, seed=0), counts)


def test_unknown_impl_and_activation_are_config_errors() -> None:
    experts = make_experts(2, True, seed=0)
    with pytest.raises(ConfigError, match="'impl'"):
        GroupedExperts(experts, activation="silu", gated=True, impl="triton")
    with pytest.raises(ConfigError, match="'activation'"):
        GroupedExperts(experts, activation="tanh", gated=True)
    with pytest.raises(ConfigError, match="'experts'"):
        GroupedExperts([], activation="silu", gated=True)


def test_auto_picks_onednn_on_cpu_where_torch_has_it() -> None:
    experts = make_experts(2, True, seed=0)
    g = GroupedExperts(experts, activation="silu", gated=True, impl="auto")
    assert g.impl == ("onednn" if onednn_available(torch.float32) else "loop")
    assert (g.num_experts, g.device, g.dtype) == (2, torch.device("cpu"), torch.float32)
    if not onednn_available(torch.float16):
        g16 = GroupedExperts([e.to(dtype=torch.float16) for e in experts], activation="silu", gated=True, impl="auto")
        assert g16.impl == "loop"


@pytest.mark.skipif(not onednn_available(torch.float32), reason="torch built without oneDNN")
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 17, 64, 333])
def test_onednn_equals_the_reference_at_realistic_sizes(rows: int) -> None:
    """Blocked-layout edge cases: widths that are not multiples of the blocks, every row count class."""
    g = torch.Generator().manual_seed(rows)
    d, i = 200, 352
    experts = [ExpertWeights(w_in=torch.randn(2 * i, d, generator=g) * d**-0.5, w_out=torch.randn(d, i, generator=g) * i**-0.5)
               for _ in range(3)]
    counts = [rows, 0, rows // 2 + 1]
    x = torch.randn(sum(counts), d, generator=g)
    y = GroupedExperts(experts, activation="silu", gated=True, impl="onednn").forward(x, counts)
    ref = torch.cat([
        (F.silu(x[s].double() @ e.w_in[:i].double().T) * (x[s].double() @ e.w_in[i:].double().T)) @ e.w_out.double().T
        for s, e in [(slice(0, rows), experts[0]), (slice(rows, sum(counts)), experts[2])]])
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6
