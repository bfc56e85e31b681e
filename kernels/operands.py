"""GEMM operand loads shared by the fused kernels: tensor-memory-accelerator (TMA) descriptors where the
hardware has them, masked pointer loads elsewhere.

The expert weights are dense `[El, K, N]` tensors (any of the two inner dims contiguous) that no program
writes during a launch, and the activation operand of `gemm_combine` was written by an earlier launch:
both may be read through TMA descriptors (`TensorDescriptor`, built on the host, 3-D for the weights so
that the K and N bounds of ONE expert zero-fill the out-of-range part of a block). The receive buffer of
`dispatch_gemm` is filled by communication programs of the same launch with ordinary stores, which the
TMA (async proxy) would need a proxy fence to observe: it stays on pointer loads.

`use_tma(t)`: Hopper or newer, compiled (not the interpreter). The interpreter understands descriptors
too, so tests can force them on (`force=True`) to check the index arithmetic on the CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def use_tma(t: torch.Tensor) -> bool:
    """True where descriptor loads are the fast path: a CUDA device of compute capability >= 9, compiled."""
    if os.environ.get("COMET_KERNELS_TMA", "auto") == "0":
        return False
    if not t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA's constraints: 16-byte aligned base and non-unit strides, unit innermost stride."""
    if t.data_ptr() % 16 or t.stride(-1) != 1 or t.numel() == 0:
        return False
    return all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def weight_descriptor(w: torch.Tensor, block_k: int, block_n: int, force: bool | None = None):
    """(descriptor, k_major) for the `[El, K, N]` weight operand `w`, or (None, False) when it cannot
    (or should not) be read through TMA. k_major: K is the contiguous dim (memory [El, N, K])."""
    if not (use_tma(w) if force is None else force):
        return None, False
    if w.stride(1) == 1:  # K contiguous: describe the [El, N, K] view
        mem = w.transpose(1, 2)
        k_major, block = True, [1, block_n, block_k]
    elif w.stride(2) == 1:
        mem, k_major, block = w, False, [1, block_k, block_n]
    else:
        return None, False
    if not _tma_ok(mem):
        return None, False
    return TensorDescriptor(mem, list(mem.shape), list(mem.stride()), block), k_major


def rows_descriptor(a: torch.Tensor, block_m: int, block_k: int, force: bool | None = None):
    """Descriptor of a row-major `[R, K]` activation operand, or None."""
    if not (use_tma(a) if force is None else force):
        return None
    if a.dim() != 2 or a.shape[0] == 0 or not _tma_ok(a):
        return None
    return TensorDescriptor(a, list(a.shape), list(a.stride()), [block_m, block_k])


@triton.jit
def load_weight_block(desc, w_j, j, k0, n0, ks, cols, kmask, cmask, stride_wk, stride_wn,
                      USE_DESC: tl.constexpr, K_MAJOR: tl.constexpr, EVEN_K: tl.constexpr,
                      BK: tl.constexpr, BN: tl.constexpr):
    """[BK, BN] block of expert j's weight at (k0, n0): TMA (zero fill past the expert's K and N) or
    pointer loads (`w_j` = the expert's base pointer, `ks`/`cols` the block's indices and masks)."""
    if USE_DESC:
        if K_MAJOR:
            b = tl.trans(desc.load([j, n0, k0]).reshape(BN, BK))
        else:
            b = desc.load([j, k0, n0]).reshape(BK, BN)
    else:
        ptrs = w_j + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        if EVEN_K:
            b = tl.load(ptrs, mask=cmask[None, :], other=0.0)
        else:
            b = tl.load(ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
    return b


@triton.jit
def load_rows_block(desc, a_rows, r0, k0, ks, rmask, kmask, USE_DESC: tl.constexpr, EVEN_K: tl.constexpr):
    """[BM, BK] block of activation rows starting at row r0 (TMA: rows past the tile belong to other
    tiles or are zero-filled past the tensor; the caller masks them at the store) or pointer loads."""
    if USE_DESC:
        a = desc.load([r0, k0])
    else:
        if EVEN_K:
            a = tl.load(a_rows[:, None] + ks[None, :], mask=rmask[:, None], other=0.0)
        else:
            a = tl.load(a_rows[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    return a


@triton.jit
def column_halves(t, BM: tl.constexpr, W: tl.constexpr):
    """[BM, W] -> its column halves [BM, W/2], [BM, W/2] (a register shuffle, no memory round trip): lets an
    epilogue work on column sub-blocks, with fewer registers live at once."""
    return tl.split(tl.permute(tl.reshape(t, (BM, 2, W // 2)), (0, 2, 1)))
