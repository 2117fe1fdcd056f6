"""Expert FFN compute: one dense FFN, and the experts of a group as one grouped computation.

Legend: N rows (token-expert assignments, sorted by expert), D hidden, I expert width,
E_l experts held by this computation (local slots).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from expert_workers.errors import ConfigError
from expert_workers.weights import ExpertWeights

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}
GROUPED_IMPLS = ("auto", "loop", "onednn", "grouped_mm")
# dtypes oneDNN's prepacked linear serves on CPU (float16 needs CPU features most machines lack).
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# below this many rows per expert the down projection's input is passed transposed (see _forward_loop).
_SKINNY_ROWS = 32
# from this many rows per expert (below _SKINNY_ROWS) the down projection runs as a^T @ W_out^T.
_DOWN_ROWMAJOR_MIN = 4


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(field="activation", value=name, expected=f"one of {tuple(_ACTIVATIONS)}") from None


def onednn_available(dtype: torch.dtype) -> bool:
    """torch was built with oneDNN and serves this dtype through its prepacked linear."""
    return (dtype in _ONEDNN_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_pack(w_OK: torch.Tensor) -> torch.Tensor:
    """A (out, in) weight reordered once into oneDNN's blocked layout (no batch-size hint: fastest from 1 row up)."""
    return torch.ops.mkldnn._reorder_linear_weight(w_OK.contiguous(), None)


def onednn_linear(x_nK: torch.Tensor, packed_OK: torch.Tensor) -> torch.Tensor:
    """x (n, K) @ W^T with W prepacked by `onednn_pack` -> (n, O)."""
    return torch.ops.mkldnn._linear_pointwise(x_nK.contiguous(), packed_OK, None, "none", [], "")


def _aligned(w: ExpertWeights) -> bool:
    """grouped_mm needs every row stride to be a multiple of 16 bytes."""
    size = w.w_in.element_size()
    return all((dim * size) % 16 == 0 for dim in w.w_out.shape)


def _mlp_tail(h: torch.Tensor, act: Callable, gated: bool) -> torch.Tensor:
    """h (N, 2I) = [x W_gate^T, x W_up^T] -> (N, I); or h (N, I) -> act(h) when ungated."""
    if not gated:
        return act(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def ffn(x_ND: torch.Tensor, w: ExpertWeights, *, activation: str, gated: bool) -> torch.Tensor:
    """One FFN. x (N, D) -> (N, D)."""
    h = F.linear(x_ND, w.w_in)
    return F.linear(_mlp_tail(h, activation_fn(activation), gated), w.w_out)


class GroupedExperts:
    """The experts of one group, stacked, run over rows sorted by expert.

    Three implementations behind `impl`, all over one contiguous slice per expert:
    `loop` runs one MKL GEMM per expert with a non-empty slice (the readable reference);
    `onednn` runs the same loop on weights prepacked once for oneDNN's blocked GEMM
    (CPU, float32/bfloat16): 1.4-3.6x faster than MKL here at every row count (1 row:
    2.7 vs 4.7 ms, 8 rows: 3.8 vs 13.9 ms, 1024 rows: 208 vs 520 ms for 4 Mixtral-shaped
    up projections on one thread, bench/local_engine.py); `grouped_mm` runs torch's
    grouped GEMM kernel in one call (CUDA). `auto` picks `grouped_mm` on CUDA,
    `onednn` on CPU where torch has it, else `loop`.
    """

    def __init__(
        self,
        experts: Sequence[ExpertWeights],
        *,
        activation: str,
        gated: bool,
        impl: str = "auto",
    ) -> None:
        if impl not in GROUPED_IMPLS:
            raise ConfigError(field="impl", value=impl, expected=f"one of {GROUPED_IMPLS}")
        if not experts:
            raise ConfigError(field="experts", value=[], expected="at least one expert")
        self.act = activation_fn(activation)
        self.gated = gated
        w = experts[0].w_in
        self._num, self._device, self._dtype = len(experts), w.device, w.dtype
        if impl == "auto":
            if w.is_cuda:
                impl = "grouped_mm" if hasattr(F, "grouped_mm") and _aligned(experts[0]) else "loop"
            else:
                impl = "onednn" if onednn_available(w.dtype) else "loop"
        if impl == "onednn":
            if w.is_cuda or not onednn_available(w.dtype):
                raise ConfigError(field="impl", value=impl, expected=f"'onednn' only on CPU with torch's oneDNN and dtype in {_ONEDNN_DTYPES}")
            # NOTE: only the packed copies are kept: the dense stacks would double the group's memory.
            self._packed = [(onednn_pack(e.w_in), onednn_pack(e.w_out)) for e in experts]
        else:
            self.w_in_EFD = torch.stack([e.w_in for e in experts])  # (E_l, 2I or I, D)
            self.w_out_EDI = torch.stack([e.w_out for e in experts])  # (E_l, D, I)
        self.impl = impl

    @property
    def num_experts(self) -> int:
        return self._num

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, x_ND: torch.Tensor, counts_E: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Rows of x sorted by local expert, `counts_E[e]` rows for expert e -> (N, D).

        NOTE: counts must be host integers for the loop (one host sync per batch);
        sum(counts) must equal N or rows would be read out of bounds.
        """
        counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else list(counts_E)
        if len(counts) != self.num_experts or sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts {counts} do not cover {x_ND.shape[0]} rows over {self.num_experts} experts")
        if self.impl == "grouped_mm":
            return self._forward_grouped_mm(x_ND, counts)
        if self.impl == "onednn":
            return self._forward_onednn(x_ND, counts)
        return self._forward_loop(x_ND, counts)

    def _forward_onednn(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out_ND = x_ND.new_empty(x_ND.shape)
        start = 0
        for (w_in, w_out), n in zip(self._packed, counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            h_nF = onednn_linear(x_ND[rows], w_in)
            out_ND[rows] = onednn_linear(_mlp_tail(h_nF, self.act, self.gated), w_out)
            start += n
        return out_ND

    def _forward_loop(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # NOTE: computed transposed, h^T = W @ B^T with B row-major (n, K) passed as its
        # transposed view. With few rows per expert (decode) MKL's SGEMM streams the
        # weight at memory speed only in this form; x @ W^T, or a contiguous (K, n) B,
        # ran 2-4x slower for n in 2..12 (bench/local_engine.py, docs/architecture.md).
        out_ND = x_ND.new_empty(x_ND.shape)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            h_Fn = torch.mm(self.w_in_EFD[e], x_ND[rows].t())
            if self.gated:
                gate, up = h_Fn.chunk(2, dim=0)
                a_In = self.act(gate).mul_(up)
            else:
                a_In = self.act(h_Fn)
            if _DOWN_ROWMAJOR_MIN <= n < _SKINNY_ROWS:
                # NOTE: the down projection (D x I, long K) in the transposed-view form falls to
                # 6-8 GB/s from 4 rows up on MKL; a^T (n, I) @ W_out^T streams at 10-12 GB/s there.
                torch.mm(a_In.t(), self.w_out_EDI[e].t(), out=out_ND[rows])
            else:
                if n < _SKINNY_ROWS:
                    a_In = a_In.t().contiguous().t()  # (I, n) as a transposed view: see NOTE
                out_ND[rows] = torch.mm(self.w_out_EDI[e], a_In).t()
            start += n
        return out_ND

    def _forward_grouped_mm(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        offs = torch.tensor(counts, device=x_ND.device).cumsum(0).to(torch.int32)
        h = F.grouped_mm(x_ND, self.w_in_EFD.transpose(-2, -1), offs=offs)
        a = _mlp_tail(h, self.act, self.gated)
        return F.grouped_mm(a, self.w_out_EDI.transpose(-2, -1), offs=offs)
