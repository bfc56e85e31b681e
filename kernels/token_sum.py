"""Sum each token's routed rows, in a fixed order, without atomics (Triton + torch only).

The reference path's combine adds every expert output row into its token (`out[token[r]] += rows[r]`) and the
backward of its dispatch gather does the same with gradients. As a PyTorch `index_add` that is a bf16 atomic
scatter: ~0.56 ms for Qwen2-MoE's 32768 rows x 2048 at 8192 tokens on an H100 (docs/BENCHMARKS.md), and the
order in which a token's rows are added varies from run to run. Here each program owns one token and a block
of columns and adds that token's rows in send order (expert ascending) in fp32, rounding once: one read of the
rows and one write of the tokens, bitwise reproducible.

    order, starts = token_row_order(token, num_tokens)   # once per routing (torch ops, no host sync)
    out = sum_rows_by_token(rows, order, starts)          # out[t] = sum of rows[order[starts[t]:starts[t+1]]]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

BLOCK_COLUMNS = 1024  # columns per program (2 KB of a bf16 row)


@triton.jit
def _sum_rows_kernel(rows_ptr, stride_rows, order_ptr, starts_ptr, out_ptr, stride_out, n_cols,
                     BH: tl.constexpr):
    """Grid (tokens, cdiv(H, BH)): out[t, cols] = sum_j rows[order[j], cols], j in [starts[t], starts[t + 1])."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    m = cols < n_cols
    first = tl.load(starts_ptr + t)
    last = tl.load(starts_ptr + t + 1)
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in range(first, last):
        r = tl.load(order_ptr + j).to(tl.int64)
        acc += tl.load(rows_ptr + r * stride_rows + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def token_row_order(token: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [R] int64, starts [num_tokens + 1] int64) of rows whose token ids are `token` [R]: the rows of
    token t are order[starts[t]:starts[t + 1]], in their original order (a stable sort). No host sync."""
    if token.dim() != 1:
        raise ValueError(f"token must be 1-D, got shape {tuple(token.shape)}")
    sorted_token, order = torch.sort(token, stable=True)
    bounds = torch.arange(num_tokens + 1, device=token.device, dtype=sorted_token.dtype)
    starts = torch.searchsorted(sorted_token, bounds)
    return order, starts


def sum_rows_by_token(rows: torch.Tensor, order: torch.Tensor, starts: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """out [num_tokens, H] (num_tokens = starts.numel() - 1) in rows' dtype: out[t] = the sum, in fp32 and in
    order, of rows[order[j]] for j in [starts[t], starts[t + 1]); a token without rows gets zeros."""
    if rows.dim() != 2 or rows.stride(-1) != 1:
        raise ValueError(f"rows must be 2-D with contiguous rows, got shape {tuple(rows.shape)} "
                         f"strides {rows.stride()}")
    if order.numel() != rows.shape[0]:
        raise ValueError(f"order has {order.numel()} entries for {rows.shape[0]} rows")
    num_tokens, n_cols = starts.numel() - 1, rows.shape[1]
    if out is None:
        out = torch.empty(num_tokens, n_cols, dtype=rows.dtype, device=rows.device)
    elif out.shape != (num_tokens, n_cols) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{num_tokens}, {n_cols}] with contiguous rows, got {tuple(out.shape)}")
    if num_tokens and n_cols:
        block = min(BLOCK_COLUMNS, triton.next_power_of_2(n_cols))
        launch(_sum_rows_kernel, (num_tokens, triton.cdiv(n_cols, block)), rows, rows.stride(0), order, starts,
               out, out.stride(0), n_cols, BH=block, num_warps=4)
    return out
