"""The expert MLP's activation with the routing prob, one elementwise pass each way (Triton + torch only).

    forward:  hp = act(pre[:, :F]) * pre[:, F:] * p      (gated; not gated: act(pre) * p), [R, F]
    backward: from dhp = dL/d(hp) [R, F]:
              d_pre = act'(gate) * up * dhp * p  |  act(gate) * dhp * p     [R, 2F] (gated) or [R, F]
              grad_p = rowsum(dhp * act(gate) * up)                          [R], fp32, fixed order

The fused kernels do this in their GEMM epilogues; the reference path (grouped GEMMs) runs it between its
GEMMs. In PyTorch ops the same sums take ~8 passes over [R, F] tensors (silu, two products, the prob scale,
their backward products, a concatenation of the two gated halves), e.g. ~2 ms of a Mixtral-8x7B layer call at
2048 tokens on an H100 (docs/BENCHMARKS.md); these take one read of their inputs and one write of their
outputs, in fp32 with one rounding at the end. The backward is `dispatch_gemm.activation_backward` (the
separate activation pass of the fused layer 0) reading dhp from its own tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch_gemm import ACTIVATIONS, _act, activation_backward
from .launch import launch

FORWARD_ROWS = 32  # rows x columns per program of the forward pass
FORWARD_COLS = 128


@triton.jit
def _act_forward_kernel(pre_ptr, stride_pre, prob_ptr, out_ptr, stride_out, n_rows, FFN: tl.constexpr,
                        ACT: tl.constexpr, GATED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Grid (cdiv(R, BR), cdiv(F, BC)): out[rows, cols] = act(gate) (* up) * p, computed in fp32."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < n_rows
    m = rmask[:, None] & (cols < FFN)[None, :]
    pre_rows = pre_ptr + rows.to(tl.int64)[:, None] * stride_pre
    gate = tl.load(pre_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
    h = _act(gate, ACT)
    if GATED:
        up = tl.load(pre_rows + FFN + cols[None, :], mask=m, other=0.0).to(tl.float32)
        h = h * up
    p = tl.load(prob_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    h = h * p[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], h.to(out_ptr.dtype.element_ty),
             mask=m)


def _check(pre: torch.Tensor, prob: torch.Tensor, activation: str, gated: bool) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: the kernels implement {', '.join(ACTIVATIONS)}")
    if pre.dim() != 2 or pre.stride(-1) != 1:
        raise ValueError(f"pre must be a 2-D tensor with contiguous rows, got shape {tuple(pre.shape)} "
                         f"strides {pre.stride()}")
    if prob.shape != (pre.shape[0],):
        raise ValueError(f"prob must hold one value per row of pre: shape {tuple(prob.shape)} for "
                         f"{pre.shape[0]} rows")
    if gated and pre.shape[1] % 2:
        raise ValueError(f"gated activation: pre has {pre.shape[1]} columns, not an even number")
    return pre.shape[1] // 2 if gated else pre.shape[1]


def activation_forward(pre: torch.Tensor, prob: torch.Tensor, *, activation: str = "silu", gated: bool = True,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """hp = act(pre[:, :F]) * pre[:, F:] * prob[:, None] (gated) or act(pre) * prob[:, None]: [R, F] in
    pre's dtype (or into `out`)."""
    ffn = _check(pre, prob, activation, gated)
    n_rows = pre.shape[0]
    if out is None:
        out = torch.empty(n_rows, ffn, dtype=pre.dtype, device=pre.device)
    elif out.shape != (n_rows, ffn) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{n_rows}, {ffn}] with contiguous rows, got {tuple(out.shape)}")
    if n_rows and ffn:
        launch(_act_forward_kernel, (triton.cdiv(n_rows, FORWARD_ROWS), triton.cdiv(ffn, FORWARD_COLS)),
               pre, pre.stride(0), prob, out, out.stride(0), n_rows, FFN=ffn, ACT=ACTIVATIONS[activation],
               GATED=gated, BR=FORWARD_ROWS, BC=FORWARD_COLS, num_warps=4)
    return out


def activation_prob_backward(dhp: torch.Tensor, pre: torch.Tensor, prob: torch.Tensor, *, activation: str = "silu",
                             gated: bool = True, d_pre: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_pre [R, 2F or F] in pre's dtype, grad_prob [R] fp32) of `activation_forward`, from dhp [R, F]."""
    ffn = _check(pre, prob, activation, gated)
    n_rows = pre.shape[0]
    if dhp.shape != (n_rows, ffn) or dhp.stride(-1) != 1:
        raise ValueError(f"dhp must be [{n_rows}, {ffn}] with contiguous rows, got {tuple(dhp.shape)}")
    if d_pre is None:
        d_pre = torch.empty_like(pre, memory_format=torch.contiguous_format)
    elif d_pre.shape != pre.shape or d_pre.stride(-1) != 1:
        raise ValueError(f"d_pre must be shaped like pre {tuple(pre.shape)} with contiguous rows")
    if not ffn:
        d_pre.zero_()
        return d_pre, torch.zeros(n_rows, dtype=torch.float32, device=pre.device)
    parts = activation_backward(d_pre, pre, prob, ffn=ffn, activation=activation, gated=gated, dhp=dhp)
    return d_pre, parts.sum(1)
