"""Layer 1 at world size 1 on Hopper: the expert grouped GEMM in Gluon, its epilogue hidden behind the next tile.

Triton's `tl.dot` loops pipeline the loads of ONE tile's K loop; between two tiles of a persistent program the
epilogue (prob scale, rounding, stores) runs with the tensor cores idle and the next tile's first loads not
yet issued. On Qwen2-MoE's layer 1 (K = 1408: 22 K steps per tile) that epilogue is ~10-15% of the kernel
(docs/BENCHMARKS.md, ninth session). `tl.range(flatten=True)` pipelines across tiles but lost 2-3x, and
Triton's warp specialisation is Blackwell-only. Gluon (Triton's lower-level language, in the stock wheel)
lets the kernel place the operations itself:

- a ring of `NB` shared-memory stages filled by TMA loads, one wgmma in flight;
- the NEXT tile's first `NB - 1` loads are issued before the current tile's epilogue, so they land while it runs;
- full tiles leave through an asynchronous TMA store that is waited one tile later (the registers go back
  to the tensor cores at once); the ragged last tile of an expert is stored with masked stores.

It writes the scaled rows in receive order (`stage[r] = p_r * a[r] @ W[e(r)]`); at world size 1 every receive
row belongs to this rank, so each token's sum is then one gather pass (`local_combine`), no combine region,
no signals. Hopper only (wgmma); the interpreter cannot run Gluon: `gluon_supported` says when it applies, and
every other case keeps the Triton kernel.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .launch import launch

try:  # Gluon ships with Triton >= 3.4; without it every caller keeps the Triton kernels
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BLOCK_M, BLOCK_K = 128, 64  # wgmma with 8 warps: 128-row tiles; 64-deep K steps (128-byte swizzle)
NUM_WARPS = 8
# `gluon_layer1=None` (auto) takes the Gluon kernel up to this K: its gain is the epilogue hidden behind the next
# tile, which matters when a tile has few K steps. H100, bench kernels --world 1 (docs/BENCHMARKS.md, ninth
# session): Qwen2-MoE (K 1408 forward / 2816 backward) at 8192 tokens 1.08x / 1.04x faster than gemm_combine +
# combine_reduce (2048: 0.98x / 0.98x); Phi-3.5-MoE (6400 / 12800) 0.97-0.99x; Mixtral (14336 / 28672) 0.93-0.99x.
AUTO_MAX_K = 4096
SMEM_BYTES = 232448 - 1024  # an H100 block's shared memory, less the barriers' and the compiler's share


def gluon_supported(a: torch.Tensor, w: torch.Tensor, block_m: int, block_n: int, *, trace: bool = False) -> str | None:
    """None when `grouped_gemm_rows` can run a @ w (a: [R, K] rows, w: [El, K, N]), else why not (kept for the
    caller's choice and the tests). Off with COMET_KERNELS_GLUON=0."""
    if trace:
        return "trace mode times the Triton kernel's items"
    if a.dtype not in (torch.bfloat16, torch.float16) or w.dtype != a.dtype:
        return f"16-bit operands only (got {a.dtype} x {w.dtype})"
    if a.dim() != 2 or w.dim() != 3 or a.shape[1] != w.shape[1]:
        return f"rows [R, K] and weights [El, K, N] expected, got {tuple(a.shape)} and {tuple(w.shape)}"
    k_dim, n_dim = w.shape[1], w.shape[2]
    if block_m != BLOCK_M or block_n not in (64, 128, 256):
        return f"tiles {block_m} x {block_n}: the Gluon kernel runs {BLOCK_M} x (64 | 128 | 256)"
    if k_dim % BLOCK_K or k_dim // BLOCK_K < 2 or n_dim % block_n:
        return f"K = {k_dim} must be a multiple of {BLOCK_K} (>= 2 steps) and N = {n_dim} one of {block_n}"
    if a.stride(1) != 1 or (a.stride(0) * a.element_size()) % 16 or a.data_ptr() % 16:
        return "rows must be contiguous in K with 16-byte aligned rows (TMA)"
    if not (w.stride(1) == 1 or w.stride(2) == 1) or w.data_ptr() % 16 or any(
            st != 1 and st * w.element_size() % 16 for st in w.stride()):
        return "weights must have K or N contiguous and 16-byte aligned strides (TMA)"
    return gluon_unavailable(a.device)


def gluon_unavailable(device) -> str | None:
    """None when the Gluon kernels can run on `device` at all, else why not: COMET_KERNELS_GLUON=0, a Triton
    without Gluon, no CUDA device, the interpreter, not Hopper."""
    if os.environ.get("COMET_KERNELS_GLUON", "auto") == "0":
        return "COMET_KERNELS_GLUON=0"
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "Gluon needs a compiled CUDA kernel (no interpreter)"
    if _capability_major(device) != 9:
        return "the Gluon kernel uses Hopper's wgmma (compute capability 9.x)"
    return None


@functools.lru_cache(maxsize=16)
def _capability_major(device: torch.device) -> int:
    """The device's compute capability (major), asked once per device (host time of every Gluon call's check)."""
    return torch.cuda.get_device_capability(device)[0]


if HAVE_GLUON:

    @gluon.constexpr_function
    def _acc_layout(bm, bn, num_warps):
        """wgmma accumulator layout: warps stacked along M (16 rows each) first, the widest N instruction."""
        warps = [4, 1]
        while warps[0] * warps[1] != num_warps:
            if bm > 16 * warps[0]:
                warps[0] *= 2
            else:
                warps[1] *= 2
        max_n = max(bn // triton.cdiv(num_warps, triton.cdiv(bm, 16)), 8)
        n = 256
        while n > max_n or bn % n != 0:
            n -= 8
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])

    @gluon.jit
    def _item(w, num_tiles, n_chunks: gl.constexpr, GROUP_N: gl.constexpr):
        """Work item -> (tile, column chunk), in gemm_combine's chunk-major order (`_combine_item`)."""
        per_super = gl.maximum(num_tiles, 1) * GROUP_N
        first_chunk = (w // per_super) * GROUP_N
        chunks_here = gl.minimum(n_chunks - first_chunk, GROUP_N)
        r = w % per_super
        return r // chunks_here, first_chunk + r % chunks_here

    @gluon.jit
    def _tile(w, total, num_tiles, tile_expert_ptr, tile_start_ptr, tile_end_ptr, N_DIM: gl.constexpr,
              BN: gl.constexpr, GROUP_N: gl.constexpr, EL: gl.constexpr, W_REV: gl.constexpr):
        """(first row, end row, weight index, first column) of item w (clamped to a live item)."""
        q, chunk = _item(gl.minimum(w, gl.maximum(total - 1, 0)), num_tiles, N_DIM // BN, GROUP_N)
        e = gl.load(tile_expert_ptr + q)
        if W_REV:
            e = EL - 1 - e
        return gl.load(tile_start_ptr + q), gl.load(tile_end_ptr + q), e, chunk * BN

    @gluon.jit
    def _load(producer, a_desc, w_desc, row0, e, n0, k, bars, a_bufs, w_bufs, NB: gl.constexpr,
              W_K_MAJOR: gl.constexpr, pred):
        s = producer % NB
        bar = bars.index(s)
        mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [row0, k], bar, a_bufs.index(s), pred)
        if W_K_MAJOR:
            tma.async_copy_global_to_shared(w_desc, [e, n0, k], bar, w_bufs.index(s), pred)
        else:
            tma.async_copy_global_to_shared(w_desc, [e, k, n0], bar, w_bufs.index(s), pred)
        return producer + 1

    @gluon.jit
    def _mma(consumer, acc, use_acc, bars, a_bufs, w_bufs, NB: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
             W_K_MAJOR: gl.constexpr, LAG: gl.constexpr):
        s = consumer % NB
        mbarrier.wait(bars.index(s), (consumer // NB) & 1)
        # at most LAG earlier wgmmas still running: the stages they read are not refilled before they finish
        # (the loads run NB - 2 - LAG steps ahead)
        acc = warpgroup_mma_wait(LAG, (acc,))
        if W_K_MAJOR:
            b = w_bufs.index(s).reshape([BN, BK]).permute((1, 0))
        else:
            b = w_bufs.index(s).reshape([BK, BN])
        acc = warpgroup_mma(a_bufs.index(s), b, acc, is_async=True, use_acc=use_acc)
        return consumer + 1, acc

    @gluon.jit
    def _grouped_rows_kernel(a_desc, w_desc, c_desc, out_ptr, prob_ptr, tile_expert_ptr, tile_start_ptr,
                             tile_end_ptr, num_tiles_ptr, K_DIM: gl.constexpr, N_DIM: gl.constexpr,
                             GROUP_N: gl.constexpr, NB: gl.constexpr, SCALE: gl.constexpr, EL: gl.constexpr,
                             W_REV: gl.constexpr, W_K_MAJOR: gl.constexpr, LAG: gl.constexpr,
                             num_warps: gl.constexpr):
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        dtype: gl.constexpr = a_desc.dtype
        gl.static_assert(K_DIM % BK == 0)
        AHEAD: gl.constexpr = NB - 1 - LAG  # loads in flight when a tile's first wgmma is issued
        gl.static_assert(AHEAD >= 1)
        gl.static_assert(K_DIM // BK >= AHEAD)
        gl.static_assert(N_DIM % BN == 0)
        layout: gl.constexpr = _acc_layout(BM, BN, num_warps)
        row_l: gl.constexpr = gl.SliceLayout(1, layout)
        col_l: gl.constexpr = gl.SliceLayout(0, layout)
        a_bufs = gl.allocate_shared_memory(dtype, [NB] + a_desc.block_type.shape, a_desc.layout)
        w_bufs = gl.allocate_shared_memory(dtype, [NB] + w_desc.block_type.shape, w_desc.layout)
        c_smem = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NB):
            mbarrier.init(bars.index(i), count=1)

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        num_tiles = gl.load(num_tiles_ptr)
        total = num_tiles * (N_DIM // BN)
        mine = gl.cdiv(gl.maximum(total - pid, 0), nprog)
        producer = 0
        consumer = 0
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        r0, r1, e, n0 = _tile(pid, total, num_tiles, tile_expert_ptr, tile_start_ptr, tile_end_ptr, N_DIM, BN,
                              GROUP_N, EL, W_REV)
        for ki in gl.static_range(AHEAD):
            producer = _load(producer, a_desc, w_desc, r0, e, n0, ki * BK, bars, a_bufs, w_bufs, NB, W_K_MAJOR,
                             mine > 0)
        for i in range(mine):
            rows = r0 + gl.arange(0, BM, layout=row_l)
            if SCALE:  # read now, used after the K loop: its latency hides behind the loop
                prob = gl.load(prob_ptr + rows, mask=rows < r1, other=0.0)
            consumer, acc = _mma(consumer, acc, False, bars, a_bufs, w_bufs, NB, BN, BK, W_K_MAJOR, LAG)
            for k in range(BK * AHEAD, K_DIM, BK):
                producer = _load(producer, a_desc, w_desc, r0, e, n0, k, bars, a_bufs, w_bufs, NB, W_K_MAJOR, True)
                consumer, acc = _mma(consumer, acc, True, bars, a_bufs, w_bufs, NB, BN, BK, W_K_MAJOR, LAG)
            t_r0 = r0
            t_r1 = r1
            t_n0 = n0
            more = i + 1 < mine
            # The next tile's first loads go out before this tile's last wgmmas and its epilogue.
            r0, r1, e, n0 = _tile(pid + (i + 1) * nprog, total, num_tiles, tile_expert_ptr, tile_start_ptr,
                                  tile_end_ptr, N_DIM, BN, GROUP_N, EL, W_REV)
            for ki in gl.static_range(AHEAD - 1):
                producer = _load(producer, a_desc, w_desc, r0, e, n0, ki * BK, bars, a_bufs, w_bufs, NB, W_K_MAJOR,
                                 more)
                consumer, acc = _mma(consumer, acc, True, bars, a_bufs, w_bufs, NB, BN, BK, W_K_MAJOR, LAG)
            producer = _load(producer, a_desc, w_desc, r0, e, n0, (AHEAD - 1) * BK, bars, a_bufs, w_bufs, NB,
                             W_K_MAJOR, more)
            acc = warpgroup_mma_wait(0, (acc,))
            if SCALE:
                y = (acc * prob[:, None]).to(dtype)
            else:
                y = acc.to(dtype)
            if t_r0 + BM <= t_r1:
                tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                c_smem.store(y)
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [t_r0, t_n0], c_smem)
            else:  # an expert's ragged last tile: the rows past it belong to the next expert's tile
                cols = t_n0 + gl.arange(0, BN, layout=col_l)
                gl.store(out_ptr + rows.to(gl.int64)[:, None] * N_DIM + cols[None, :], y,
                         mask=(rows < t_r1)[:, None])
        tma.store_wait(pendings=0)
        for i in gl.static_range(NB):
            mbarrier.invalidate(bars.index(i))


def _gl_dtype(dtype: torch.dtype):
    """Gluon's type for a 16-bit or fp32 torch dtype (refuses others rather than mislabel them)."""
    types = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}
    if dtype not in types:
        raise ValueError(f"no Gluon shared-memory type for {dtype}: bf16, fp16 or fp32")
    return types[dtype]


def grouped_gemm_rows(a: torch.Tensor, w: torch.Tensor, layout, num_rows: int, *, prob: torch.Tensor | None = None,
                      block_n: int = 256, group_n: int = 8, num_stages: int = 3, reversed_experts: bool = False,
                      out: torch.Tensor | None = None, block_k: int = BLOCK_K, mma_lag: int = 0) -> torch.Tensor:
    """stage [num_rows, N]: stage[r] = (prob[r] *) a[r] @ w[e] for the receive rows r of each tile of `layout`
    (a ReceiveLayout: tile tables, block_m = 128), in receive order. a: [>= num_rows, K]; w: [El, K, N] with K
    or N contiguous (`reversed_experts`: w[i] is expert El-1-i's); `out`: the [>= num_rows, N] buffer to write
    (contiguous). Check `gluon_supported` first. num_stages: shared-memory stages (capped by what fits next to
    the epilogue tile); mma_lag: wgmmas left running when the next is issued (0 or 1; 1 needs 4 stages)."""
    el, k_dim, n_dim = w.shape
    gdt = _gl_dtype(a.dtype)
    if out is None:
        stage = torch.empty(max(num_rows, 1), n_dim, dtype=a.dtype, device=a.device)
    elif out.dtype != a.dtype or out.dim() != 2 or out.shape[0] < num_rows or out.shape[1] != n_dim \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [>= {num_rows}, {n_dim}] {a.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    else:
        stage = out
    if num_rows == 0:
        return stage[:num_rows]
    if mma_lag not in (0, 1) or block_k not in (32, 64) or k_dim % block_k:
        raise ValueError(f"mma_lag={mma_lag}, block_k={block_k}: lag 0 or 1, K blocks of 32 or 64 dividing K={k_dim}")
    stage_bytes = (BLOCK_M + block_n) * block_k * a.element_size()
    fit = (SMEM_BYTES - BLOCK_M * block_n * a.element_size()) // stage_bytes  # next to the epilogue tile
    nb = min(num_stages, fit, k_dim // block_k + 1 + mma_lag)
    if nb < 2 + mma_lag:
        raise ValueError(f"num_stages={num_stages} (fits {fit}): the Gluon layer-1 kernel needs >= {2 + mma_lag}")
    a_desc = GluonDescriptor.from_tensor(a, [BLOCK_M, block_k],
                                         gl.NVMMASharedLayout.get_default_for([BLOCK_M, block_k], gdt))
    k_major = w.stride(1) == 1
    if k_major:  # memory [El, N, K]
        mem, block = w.transpose(1, 2), [1, block_n, block_k]
    else:
        mem, block = w, [1, block_k, block_n]
    w_desc = GluonDescriptor(mem, list(mem.shape), list(mem.stride()), block,
                             gl.NVMMASharedLayout.get_default_for(block, gdt))
    c_desc = GluonDescriptor.from_tensor(stage, [BLOCK_M, block_n],
                                         gl.NVMMASharedLayout.get_default_for([BLOCK_M, block_n], gdt))
    items = layout.max_tiles * (n_dim // block_n)
    grid = (max(1, min(torch.cuda.get_device_properties(a.device).multi_processor_count, items)),)
    launch(_grouped_rows_kernel, grid,
        a_desc, w_desc, c_desc, stage, prob if prob is not None else stage, layout.tile_expert,
        layout.tile_row_start, layout.tile_row_end, layout.num_tiles,
        K_DIM=k_dim, N_DIM=n_dim, GROUP_N=group_n, NB=nb, SCALE=prob is not None, EL=el,
        W_REV=bool(reversed_experts), W_K_MAJOR=k_major, LAG=mma_lag, num_warps=NUM_WARPS)
    return stage[:num_rows]
