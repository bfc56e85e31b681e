"""Expert weight gradients as grouped GEMMs over receive rows: dW[e] = a[rows_e]^T @ b[rows_e].

They have no consumer on the critical path of the backward pass, so they are a separate call that a
caller may defer (Megatron's `backward_dw` / `--delay-wgrad-compute`) to overlap other communication.

Backends: "triton" (`_grouped_wgrad_kernel`, grid (El, cdiv(M, BM) * cdiv(N, BN)), one output tile per
program, K loop over the expert's rows; no waits), "grouped_mm" (CUDA `torch._grouped_mm` with offsets,
bf16), "loop" (a torch loop over experts; the CPU fallback). "auto" = triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import dot_precision
from .launch import launch


@triton.jit
def _grouped_wgrad_kernel(a_ptr, stride_a, b_ptr, stride_b, c_ptr, offsets_ptr, m_dim, n_dim,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    j = tl.program_id(0)
    n_tiles_n = tl.cdiv(n_dim, BN)
    mcols = (tl.program_id(1) // n_tiles_n) * BM + tl.arange(0, BM)
    ncols = (tl.program_id(1) % n_tiles_n) * BN + tl.arange(0, BN)
    mmask = mcols < m_dim
    nmask = ncols < n_dim
    start = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    r0 = start
    while r0 < end:  # bounds from device memory: a while loop (the interpreter cannot range() over them)
        rows = r0 + tl.arange(0, BK)
        rmask = rows < end
        # a^T tile loaded directly as [BM, BK]
        a_t = tl.load(a_ptr + rows.to(tl.int64)[None, :] * stride_a + mcols[:, None],
                      mask=mmask[:, None] & rmask[None, :], other=0.0)
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_b + ncols[None, :],
                    mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a_t, b, acc, input_precision=DOT_PRECISION)
        r0 += BK
    c_rows = c_ptr + j.to(tl.int64) * m_dim * n_dim + mcols[:, None].to(tl.int64) * n_dim
    tl.store(c_rows + ncols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor, *, backend: str = "auto",
                  out_dtype: torch.dtype | None = None, block_m: int = 64, block_n: int = 64,
                  block_k: int = 32) -> torch.Tensor:
    """C[e] = a[off[e]:off[e+1]]^T @ b[off[e]:off[e+1]] for every local expert e.

    a: [R, M], b: [R, N] (row-major rows in receive order); expert_offsets: [El+1] int32 device tensor
    (`ReceiveLayout.expert_offsets`). Returns [El, M, N] in `out_dtype` (default a.dtype); experts
    without rows get zeros.
    """
    num_experts = expert_offsets.numel() - 1
    (rows, m_dim), n_dim = a.shape, b.shape[1]
    out_dtype = out_dtype or a.dtype
    if backend == "auto":
        # cuBLAS's grouped GEMM (K split by expert) on Hopper in bf16; the Triton kernel elsewhere
        backend = "grouped_mm" if (a.is_cuda and a.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                                   and torch.cuda.get_device_capability(a.device)[0] >= 9) else "triton"
    if backend == "loop":
        offs = expert_offsets.tolist()
        return torch.stack([
            (a[offs[e]:offs[e + 1]].float().t() @ b[offs[e]:offs[e + 1]].float()).to(out_dtype)
            for e in range(num_experts)
        ])
    if backend == "grouped_mm":
        if not a.is_cuda:
            raise ValueError("backend='grouped_mm' needs CUDA tensors")
        return torch._grouped_mm(a.t(), b, offs=expert_offsets[1:].contiguous()).to(out_dtype)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}")
    a, b = a.contiguous(), b.contiguous()
    if rows == 0:  # Triton needs real allocations; every expert is empty anyway
        return torch.zeros(num_experts, m_dim, n_dim, dtype=out_dtype, device=a.device)
    out = torch.empty(num_experts, m_dim, n_dim, dtype=out_dtype, device=a.device)
    grid = (num_experts, triton.cdiv(m_dim, block_m) * triton.cdiv(n_dim, block_n))
    launch(_grouped_wgrad_kernel, grid, a, a.stride(0), b, b.stride(0), out, expert_offsets, m_dim, n_dim,
                                BM=block_m, BN=block_n, BK=block_k, DOT_PRECISION=dot_precision(a.dtype))
    return out
