"""Admission's value check: a request with any NaN or infinity is refused, every finite one admitted.

The check first sums the values (one op) and runs the element-wise test only when the sum is
not finite; these cases pin that the shortcut never changes the verdict, including finite
values whose sum overflows, and half-precision inputs, whose sums overflow easily.
"""

from __future__ import annotations

import pytest
import torch

from expert_workers.errors import InvalidRequestError
from expert_workers.spec import MoESpec
from router_svc import admission

pytestmark = pytest.mark.unit

D = 8
SPEC = MoESpec(hidden_size=D, intermediate_size=16, num_experts=4, num_layers=1, moe_layers=(0,))
BIG = torch.finfo(torch.float32).max / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, D - 1, 3 * D + 5])
def test_any_nan_or_infinity_is_refused(dtype: torch.dtype, bad: float, where: int) -> None:
    x = torch.randn(4, D).to(dtype)
    x.view(-1)[where] = bad
    with pytest.raises(InvalidRequestError, match="NaN or Inf"):
        admission.check_hidden(x, SPEC)


def test_opposite_infinities_are_refused() -> None:
    x = torch.zeros(2, D)
    x[0, 0], x[1, 3] = float("inf"), float("-inf")  # their sum is NaN, not a number that overflowed
    with pytest.raises(InvalidRequestError, match="NaN or Inf"):
        admission.check_hidden(x, SPEC)


@pytest.mark.parametrize("x", [
    torch.full((4, D), BIG),  # every value finite, the float32 sum overflows to inf
    torch.full((4, D), -BIG),
    torch.tensor([[BIG, BIG, -BIG, -BIG, BIG, BIG, 1.0, 2.0]]),
    torch.full((64, D), 60000.0, dtype=torch.float16),  # a half sum overflows at 65504
    torch.full((64, D), 3e38, dtype=torch.bfloat16),
    torch.zeros(0, D),  # no tokens
], ids=["big", "minus_big", "mixed_big", "half_near_max", "bfloat16_near_max", "empty"])
def test_finite_values_are_admitted_even_when_their_sum_overflows(x: torch.Tensor) -> None:
    assert bool(torch.isfinite(x).all())
    admission.check_hidden(x, SPEC)  # no error
