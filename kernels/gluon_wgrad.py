"""Expert weight gradients into fp32 `main_grad` on Hopper: a warp-specialised, persistent Gluon kernel.

`C_e (+)= a[rows_e]^T @ b[rows_e]` for every local expert e (the Triton accumulate kernel's job, `wgrad.py`).
With few rows per expert (short K loops) that kernel, like cuBLAS with beta = 1, runs its main loop and then its
epilogue (read the old fp32 tile, add, write it back) one after the other: on Mixtral's shapes at 512 rows per
expert the two add up (~2.2 ms of tensor-core work + ~3.8 ms of `main_grad` traffic against ~6.1 ms measured,
docs/BENCHMARKS.md). Here each program owns one SM and splits the work over groups of warps that run at the
same time:

- a loader warp: TMA loads of a^T and b blocks into a ring of shared-memory stages, running ahead across tiles;
- a tail warp: an expert's last, partial block of rows is loaded whole (the rows past it belong to the next
  expert, or lie past the operands: TMA zero-fills those), so this warp zeroes them in shared memory (both
  operands: an inf there must not reach this expert's sums) before the block is released to the tensor cores;
- the MMA warpgroup(s): wgmma over the ring (a^T read transposed from shared memory), then hand the fp32 tile to
  the epilogue through shared memory and start the next tile;
- the epilogue warps: read the old `main_grad` tile (its first chunk before the tile is ready), add, write it
  back (`OVERWRITE`: write only) while the MMA warpgroup(s) run the next tile's main loop.

Two layouts (`wgrad_ws_plan`): one MMA warpgroup on 64 x 256 tiles (1 KB `main_grad` row segments, one 64 KB
accumulator buffer, an 8-deep ring of 32-row K blocks, 4 epilogue warps), and, from TWO_MMA_MIN_ROWS mean rows
per expert, two MMA warpgroups on 128 x 256 tiles: each owns 64 rows, both read the same b blocks, so the
operand traffic from L2 per FLOP drops by 40% (the one-warpgroup kernel's MMA side had run at 390-490 TFLOP/s
where cuBLAS reaches 500-660; with two it matches cuBLAS writing Mixtral's gradients); their two 64 x 256 parts
pass through the one 64 KB buffer in turn (a barrier pair per warpgroup, see `_mma_partition`) to 2 epilogue
warps working in 8-row chunks (12 warps of 168 registers in all: wgmma's 64 x 256 accumulator needs them).
With `aligned` (the caller's promise that every output starts on a 16-byte boundary) the epilogue's accesses
are 16 bytes wide instead of 4: 1.04-1.15x adding. On an H100 the ring's depth mattered most for the first
layout, then the tile shape; the epilogue traffic alone runs at the copy rate (3.0 TB/s) for any tile shape.
Measured and dropped: two MMA warpgroups taking turns with register epilogues (ping-pong, 0.76-0.81x of
cuBLAS), relaxed vector atomics instead of read-add-write (0.85-0.95x). docs/BENCHMARKS.md, fourteenth and
fifteenth sessions.

Hopper only (wgmma); the interpreter cannot run Gluon. `gluon_wgrad_supported` says when it applies.
"""

from __future__ import annotations

import functools

import torch
import triton

from .gluon_gemm import HAVE_GLUON, SMEM_BYTES, gluon_unavailable
from .launch import launch

if HAVE_GLUON:
    from .gluon_gemm import _acc_layout, _gl_dtype
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.language.nvidia.hopper import tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor


def gluon_wgrad_supported(a: torch.Tensor, b: torch.Tensor, block_n: int = 256, block_m: int = 64) -> str | None:
    """None when `grouped_wgrad_ws` can run with these operands (a: [R, M], b: [R, N]), else why not."""
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        return f"16-bit operands only (got {a.dtype} x {b.dtype})"
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        return f"rows [R, M] and [R, N] expected, got {tuple(a.shape)} and {tuple(b.shape)}"
    for t in (a, b):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "rows must be contiguous with 16-byte aligned rows (TMA)"
    if block_m not in (64, 128) or block_m * block_n > 128 * 256 // 2:
        return f"tiles {block_m} x {block_n}: the accumulator of one warpgroup holds at most 128 x 128 / 64 x 256"
    if block_n not in (64, 128, 256):
        return f"block_n={block_n}: 64, 128 or 256"
    return gluon_unavailable(a.device)


if HAVE_GLUON:

    @gluon.jit
    def _item(w, tiles_m, tiles_n, GROUP_M: gl.constexpr):
        """Work item -> (expert, tile row, tile column): experts in order, GROUP_M-swizzled tiles within one."""
        per_expert = tiles_m * tiles_n
        e = w // per_expert
        t = w % per_expert
        per_group = GROUP_M * tiles_n
        first_m = (t // per_group) * GROUP_M
        size_m = gl.minimum(tiles_m - first_m, GROUP_M)
        tm = first_m + (t % per_group) % size_m
        tn = (t % per_group) // size_m
        return e, tm, tn

    @gluon.jit
    def _work(i, pid, nprog, row_offsets_ptr, tiles_m, tiles_n, GROUP_M: gl.constexpr, BK: gl.constexpr):
        """This program's i-th item: (expert, tile row, tile column, the expert's first and end row, its K blocks)."""
        e, tm, tn = _item(pid + i * nprog, tiles_m, tiles_n, GROUP_M)
        start = gl.load(row_offsets_ptr + e).to(gl.int32)
        end = gl.load(row_offsets_ptr + e + 1).to(gl.int32)
        return e, tm, tn, start, end, gl.cdiv(end - start, BK)

    @gluon.jit
    def _load_partition(a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, tail_bars, pid, nprog, mine,
                        tiles_m, tiles_n, GROUP_M: gl.constexpr, NB: gl.constexpr, NT: gl.constexpr,
                        SPLIT: gl.constexpr):
        BK: gl.constexpr = a_desc.block_type.shape[0]
        BM: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[1]
        nbytes: gl.constexpr = SPLIT * a_desc.block_type.nbytes + b_desc.block_type.nbytes
        producer = 0
        tails = 0
        for i in range(mine):
            e, tm, tn, start, end, nblk = _work(i, pid, nprog, row_offsets_ptr, tiles_m, tiles_n, GROUP_M, BK)
            for k in range(nblk):
                s = producer % NB
                mbarrier.wait(empty.index(s), ((producer // NB) & 1) ^ 1)
                r0 = start + k * BK
                # the partial last block goes to the tail warp (it zeroes the next expert's rows, then releases it)
                tail = r0 + BK > end
                bar_r = ready.index(s)
                bar_t = tail_bars.index(tails % NT)
                mbarrier.expect(bar_r, nbytes, pred=not tail)
                mbarrier.expect(bar_t, nbytes, pred=tail)
                for h in gl.static_range(SPLIT):
                    col = (tm * SPLIT + h) * BM  # warpgroup h's rows of the tile
                    buf = a_bufs.index(s * SPLIT + h)
                    tma.async_copy_global_to_shared(a_desc, [r0, col], bar_r, buf, pred=not tail)
                    tma.async_copy_global_to_shared(a_desc, [r0, col], bar_t, buf, pred=tail)
                tma.async_copy_global_to_shared(b_desc, [r0, tn * BN], bar_r, b_bufs.index(s), pred=not tail)
                tma.async_copy_global_to_shared(b_desc, [r0, tn * BN], bar_t, b_bufs.index(s), pred=tail)
                tails += tail.to(gl.int32)
                producer += 1

    @gluon.jit
    def _zero_rows(buf, valid, ROWS: gl.constexpr, COLS: gl.constexpr):
        """Rows >= valid of a [ROWS, COLS] shared tile set to zero, 8 rows at a time (one warp)."""
        TPW_N: gl.constexpr = COLS // 8 if COLS // 8 < 32 else 32
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [1, 1], [1, 0])
        for c in gl.static_range(ROWS // 8):
            if (c + 1) * 8 > valid:
                chunk = buf.slice(c * 8, 8, dim=0)
                x = chunk.load(layout)
                rows = c * 8 + gl.arange(0, 8, layout=gl.SliceLayout(1, layout))
                x = gl.where((rows < valid)[:, None], x, gl.zeros_like(x))
                chunk.store(x)

    @gluon.jit
    def _tail_partition(a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, tail_bars, pid, nprog, mine,
                        tiles_m, tiles_n, GROUP_M: gl.constexpr, NB: gl.constexpr, NT: gl.constexpr,
                        SPLIT: gl.constexpr):
        BK: gl.constexpr = a_desc.block_type.shape[0]
        BM: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[1]
        producer = 0
        tails = 0
        for i in range(mine):
            e, tm, tn, start, end, nblk = _work(i, pid, nprog, row_offsets_ptr, tiles_m, tiles_n, GROUP_M, BK)
            valid = (end - start) - (nblk - 1) * BK
            if nblk > 0 and valid < BK:
                s = (producer + nblk - 1) % NB
                mbarrier.wait(tail_bars.index(tails % NT), (tails // NT) & 1)
                for h in gl.static_range(SPLIT):
                    _zero_rows(a_bufs.index(s * SPLIT + h), valid, BK, BM)
                _zero_rows(b_bufs.index(s), valid, BK, BN)
                fence_async_shared()
                mbarrier.arrive(ready.index(s), count=1)
                tails += 1
            producer += nblk

    @gluon.jit
    def _epilogue_partition(a_desc, b_desc, row_offsets_ptr, c_ptr, c_offsets_ptr, acc_bufs, acc_ready, acc_empty,
                            pid, nprog, mine, tiles_m, tiles_n, m_dim, n_dim, GROUP_M: gl.constexpr,
                            OVERWRITE: gl.constexpr, PRE: gl.constexpr, EPI_WARPS: gl.constexpr,
                            NACC: gl.constexpr, SPLIT: gl.constexpr, NCH: gl.constexpr,
                            ALIGNED: gl.constexpr, VEC: gl.constexpr, TMA_STORE: gl.constexpr):
        """Each MMA warpgroup's BM x BN part of the tile in NCH chunks of rows: the old main_grad chunk is read PRE
        chunks ahead of the one added and stored (PRE = 2: the first two read before the accumulator is waited for,
        so those reads run while the MMA warpgroup finishes the tile; PRE = 1 fewer registers). The parts come
        through the NACC buffers in order, tile by tile, warpgroup by warpgroup."""
        BM: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[1]
        CH: gl.constexpr = BM // NCH
        TPW_N: gl.constexpr = BN // VEC if BN // VEC < 32 else 32
        layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_N, TPW_N], [EPI_WARPS, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, layout)
        cols_l: gl.constexpr = gl.SliceLayout(0, layout)
        for i in range(0 if TMA_STORE else mine):  # TMA_STORE: the MMA warpgroups store their own parts
            e, tm, tn = _item(pid + i * nprog, tiles_m, tiles_n, GROUP_M)
            nrows = gl.load(row_offsets_ptr + e + 1) - gl.load(row_offsets_ptr + e)
            live = nrows > 0
            if OVERWRITE:
                live = True
            offset = gl.load(c_offsets_ptr + e)
            if ALIGNED:  # every output starts on a 16-byte boundary (checked on the host): 16-byte accesses
                offset = gl.multiple_of(offset, 128 // c_ptr.dtype.element_ty.primitive_bitwidth)
            base = c_ptr + offset
            cols = tn * BN + gl.arange(0, BN, layout=cols_l)
            cmask = (cols < n_dim)[None, :] & live
            for h in gl.static_range(SPLIT):
                rows = (tm * SPLIT + h) * BM + gl.arange(0, CH, layout=rows_l)
                ptrs = base + rows.to(gl.int64)[:, None] * n_dim + cols[None, :]
                if not OVERWRITE:
                    old0 = gl.load(ptrs, mask=(rows < m_dim)[:, None] & cmask, other=0.0)
                    if PRE == 2 and NCH > 1:
                        old1 = gl.load(ptrs + CH * n_dim, mask=(rows + CH < m_dim)[:, None] & cmask, other=0.0)
                # which buffer and barrier pair: see _mma_partition
                if SPLIT == 1:
                    j = i % NACC
                    bar = j
                    phase = (i // NACC) & 1
                else:
                    j = h % NACC
                    bar = h
                    phase = i & 1
                mbarrier.wait(acc_ready.index(bar), phase)
                for c in gl.static_range(NCH):
                    x = acc_bufs.index(j).slice(c * CH, CH, dim=0).load(layout)
                    if c == NCH - 1:
                        mbarrier.arrive(acc_empty.index(bar), count=1)
                    if not OVERWRITE:
                        if c + PRE < NCH:  # the read PRE chunks ahead goes out before this chunk's store
                            nxt = gl.load(ptrs + (c + PRE) * CH * n_dim,
                                          mask=(rows + (c + PRE) * CH < m_dim)[:, None] & cmask, other=0.0)
                        x += old0
                        if PRE == 2:
                            if c + 1 < NCH:
                                old0 = old1
                            if c + PRE < NCH:
                                old1 = nxt
                        elif c + PRE < NCH:
                            old0 = nxt
                    gl.store(ptrs + c * CH * n_dim, x.to(c_ptr.dtype.element_ty),
                             mask=(rows + c * CH < m_dim)[:, None] & cmask)

    @gluon.jit
    def _mma_partition(a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, acc_bufs, acc_ready,
                       acc_empty, pid, nprog, mine, tiles_m, tiles_n, c_desc, c_rows_ptr, m_dim,
                       GROUP_M: gl.constexpr, NB: gl.constexpr, NACC: gl.constexpr, SPLIT: gl.constexpr,
                       H: gl.constexpr, TMA_STORE: gl.constexpr):
        """One warpgroup's BM rows of each tile: the H-th of SPLIT warpgroups sharing the ring's b blocks.
        TMA_STORE: the part is rounded to the output's type in the warpgroup's own staging buffer and
        leaves through an asynchronous TMA store (waited before the next part is staged) instead of going to the
        epilogue warps."""
        BK: gl.constexpr = a_desc.block_type.shape[0]
        BM: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[1]
        layout: gl.constexpr = _acc_layout(BM, BN, 4)  # one warpgroup: 64-row wgmma stacked along M
        consumer = 0
        for i in range(mine):
            e, tm, tn, start, end, nblk = _work(i, pid, nprog, row_offsets_ptr, tiles_m, tiles_n, GROUP_M, BK)
            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
            for k in range(nblk):
                s = consumer % NB
                mbarrier.wait(ready.index(s), (consumer // NB) & 1)
                acc = warpgroup_mma(a_bufs.index(s * SPLIT + H).permute((1, 0)), b_bufs.index(s), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(1, (acc,))
                # the previous block's wgmma has finished: its stage goes back to the loader (once every
                # warpgroup has said so)
                mbarrier.arrive(empty.index((consumer + NB - 1) % NB), count=1, pred=k > 0)
                consumer += 1
            acc = warpgroup_mma_wait(0, (acc,))
            mbarrier.arrive(empty.index((consumer + NB - 1) % NB), count=1, pred=nblk > 0)
            if TMA_STORE:
                row0 = (tm * SPLIT + H) * BM
                tma.store_wait(pendings=0)  # this warpgroup's previous part has left the staging buffer
                acc_bufs.index(H).store(acc.to(c_desc.dtype))
                fence_async_shared()
                if row0 < m_dim:  # (M is a multiple of BM: a part is wholly inside its expert or past it)
                    c_row = gl.load(c_rows_ptr + e) + row0
                    tma.async_copy_shared_to_global(c_desc, [c_row, tn * BN], acc_bufs.index(H))
            # The hand-off: one barrier pair per buffer (SPLIT = 1: tiles take the NACC buffers in turn), or per
            # warpgroup (SPLIT = 2). With two warpgroups and one buffer, warpgroup 0 waits until the epilogue has
            # read warpgroup 1's part of the previous tile and warpgroup 1 until it has read warpgroup 0's part
            # of this one: each waits for a phase at most one ahead of the barrier's, so the wait's parity
            # cannot alias (a shared barrier pair would let warpgroup 0 run two hand-offs ahead and hang).
            if TMA_STORE:
                pass
            elif SPLIT == 1:
                j = i % NACC
                mbarrier.wait(acc_empty.index(j), ((i // NACC) & 1) ^ 1)
                bar = j
            elif NACC == 2:
                j = H
                mbarrier.wait(acc_empty.index(H), (i & 1) ^ 1)
                bar = H
            else:
                j = 0
                if H == 0:
                    mbarrier.wait(acc_empty.index(1), (i & 1) ^ 1)
                else:
                    mbarrier.wait(acc_empty.index(0), i & 1)
                bar = H
            if not TMA_STORE:
                acc_bufs.index(j).store(acc)  # read back by the epilogue warps' generic loads: no proxy fence
                mbarrier.arrive(acc_ready.index(bar), count=1)
        if TMA_STORE:
            tma.store_wait(pendings=0)

    @gluon.jit
    def _wgrad_ws_kernel(a_desc, b_desc, row_offsets_ptr, c_ptr, c_offsets_ptr, m_dim, n_dim, num_experts, c_desc,
                         c_rows_ptr,
                         GROUP_M: gl.constexpr, NB: gl.constexpr, OVERWRITE: gl.constexpr, PRE: gl.constexpr,
                         EPI_WARPS: gl.constexpr, EPI_REGS: gl.constexpr, LOAD_REGS: gl.constexpr, NACC: gl.constexpr,
                         SPLIT: gl.constexpr, MMA_REGS: gl.constexpr, NCH: gl.constexpr,
                         ALIGNED: gl.constexpr, VEC: gl.constexpr, TMA_STORE: gl.constexpr,
                         num_warps: gl.constexpr):
        BK: gl.constexpr = a_desc.block_type.shape[0]
        BM: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[1]
        NT: gl.constexpr = NB  # tails in flight <= stages (each holds one)
        gl.static_assert(BM == 64 or BM == 128)
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NB * SPLIT] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NB] + b_desc.block_type.shape, b_desc.layout)
        if TMA_STORE:  # one 16-bit staging buffer per MMA warpgroup, in the output descriptor's layout
            acc_bufs = gl.allocate_shared_memory(c_desc.dtype, [SPLIT] + c_desc.block_type.shape, c_desc.layout)
        else:  # the fp32 parts handed to the epilogue warps
            acc_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BN], gl.float32)
            acc_bufs = gl.allocate_shared_memory(gl.float32, [NACC, BM, BN], acc_smem_layout)
        ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        tail_bars = gl.allocate_shared_memory(gl.int64, [NT, 1], mbarrier.MBarrierLayout())
        NBAR: gl.constexpr = NACC if NACC > SPLIT else SPLIT  # hand-off barrier pairs (see _mma_partition)
        acc_ready = gl.allocate_shared_memory(gl.int64, [NBAR, 1], mbarrier.MBarrierLayout())
        acc_empty = gl.allocate_shared_memory(gl.int64, [NBAR, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NB):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=SPLIT)
        for s in gl.static_range(NT):
            mbarrier.init(tail_bars.index(s), count=1)
        for s in gl.static_range(NBAR):
            mbarrier.init(acc_ready.index(s), count=1)
            mbarrier.init(acc_empty.index(s), count=1)

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        tiles_m = gl.cdiv(m_dim, BM * SPLIT)
        tiles_n = gl.cdiv(n_dim, BN)
        total = num_experts * tiles_m * tiles_n
        mine = gl.cdiv(gl.maximum(total - pid, 0), nprog)
        H0: gl.constexpr = 0
        H1: gl.constexpr = 1
        if SPLIT == 1:
            gl.warp_specialize([
                (_mma_partition, (a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, acc_bufs, acc_ready,
                                  acc_empty, pid, nprog, mine, tiles_m, tiles_n, c_desc, c_rows_ptr, m_dim, GROUP_M, NB,
                                  NACC, SPLIT, H0, TMA_STORE)),
                (_epilogue_partition, (a_desc, b_desc, row_offsets_ptr, c_ptr, c_offsets_ptr, acc_bufs, acc_ready,
                                       acc_empty, pid, nprog, mine, tiles_m, tiles_n, m_dim, n_dim, GROUP_M, OVERWRITE,
                                       PRE, EPI_WARPS, NACC, SPLIT, NCH, ALIGNED, VEC,
                                       TMA_STORE)),
                (_load_partition, (a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, tail_bars, pid,
                                   nprog, mine, tiles_m, tiles_n, GROUP_M, NB, NT, SPLIT)),
                (_tail_partition, (a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, tail_bars, pid,
                                   nprog, mine, tiles_m, tiles_n, GROUP_M, NB, NT, SPLIT)),
            ], [EPI_WARPS, 1, 1], [EPI_REGS, LOAD_REGS, LOAD_REGS])
        else:  # the second MMA warpgroup first among the workers: warps 4-7, an aligned warpgroup. (The lists
            # are written out: Gluon (3.6, 3.8) cannot bind these argument tuples to names and reuse them.)
            gl.warp_specialize([
                (_mma_partition, (a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, acc_bufs, acc_ready,
                                  acc_empty, pid, nprog, mine, tiles_m, tiles_n, c_desc, c_rows_ptr, m_dim, GROUP_M, NB,
                                  NACC, SPLIT, H0, TMA_STORE)),
                (_mma_partition, (a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, acc_bufs, acc_ready,
                                  acc_empty, pid, nprog, mine, tiles_m, tiles_n, c_desc, c_rows_ptr, m_dim, GROUP_M, NB,
                                  NACC, SPLIT, H1, TMA_STORE)),
                (_epilogue_partition, (a_desc, b_desc, row_offsets_ptr, c_ptr, c_offsets_ptr, acc_bufs, acc_ready,
                                       acc_empty, pid, nprog, mine, tiles_m, tiles_n, m_dim, n_dim, GROUP_M, OVERWRITE,
                                       PRE, EPI_WARPS, NACC, SPLIT, NCH, ALIGNED, VEC,
                                       TMA_STORE)),
                (_load_partition, (a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, tail_bars, pid,
                                   nprog, mine, tiles_m, tiles_n, GROUP_M, NB, NT, SPLIT)),
                (_tail_partition, (a_desc, b_desc, row_offsets_ptr, a_bufs, b_bufs, ready, empty, tail_bars, pid,
                                   nprog, mine, tiles_m, tiles_n, GROUP_M, NB, NT, SPLIT)),
            ], [4, EPI_WARPS, 1, 1], [MMA_REGS, EPI_REGS, LOAD_REGS, LOAD_REGS])


def grouped_wgrad_ws(a: torch.Tensor, b: torch.Tensor, row_offsets: torch.Tensor, out_base: torch.Tensor,
                     out_offsets: torch.Tensor, *, overwrite: bool = False, checked: bool = False, **knobs) -> None:
    """out_e (+)= a[rows_e]^T @ b[rows_e] for every expert e (`grouped_wgrad_accumulate`'s contract: a [R, M],
    b [R, N] rows in expert order, row_offsets [El + 1] int32/int64 device tensor, out_base flat fp32 (any float
    type with `overwrite`), out_offsets [El] int64 element offsets of each contiguous [M, N] output). Refuses what
    `gluon_wgrad_supported` refuses, with its reason (`checked`: the caller has asked it already, with these
    operands and tiles). No host synchronisation. `knobs`: `wgrad_ws_plan`'s."""
    why = None if checked else gluon_wgrad_supported(a, b, knobs.get("block_n", 256), knobs.get("block_m", 64))
    if why is not None:
        raise ValueError(f"grouped_wgrad_ws: {why}")
    plan = wgrad_ws_plan(a, b, row_offsets, out_base, out_offsets, overwrite=overwrite, **knobs)
    if plan is None:
        (rows, m_dim), n_dim = a.shape, b.shape[1]
        if overwrite and rows == 0 and m_dim and n_dim:  # no operand rows: every product is zero
            for off in out_offsets.tolist():
                out_base[off:off + m_dim * n_dim].zero_()
        return
    kernel, grid, args, constexprs = plan
    launch(kernel, grid, *args, **constexprs)


# Two MMA warpgroups (128 x 256 tiles) from this many mean rows per expert when adding / writing, one (64 x 256)
# below: H100, examples/bench_wgrad.py --rows routed (docs/BENCHMARKS.md, fifteenth session), two against one:
# adding 1.03-1.50x from 512 rows (Mixtral, Phi-3.5-MoE, Qwen2-MoE), 1.00x at ~273, 0.91-0.93x at 256 and ~136;
# writing 1.02-1.30x from 256 rows, 0.94-1.02x at ~136.
# A 16-bit output (grouped_wgrad's fresh gradient): two at every size (at ~136 rows 0.98-1.06x of cuBLAS against
# one warpgroup's 0.77-0.83x, sixteenth session).
TWO_MMA_MIN_ROWS = {"add": 384, "write": 256, "write16": 0}


@functools.lru_cache(maxsize=64)
def _smem_layout(rows: int, cols: int, dtype: torch.dtype):
    """The shared-memory layout of a [rows, cols] TMA block of `dtype` (cached: host time per call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _gl_dtype(dtype))


@functools.lru_cache(maxsize=16)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_store_refusal(out_rows, out_base, overwrite, m_dim, n_dim, block_m, experts) -> str | None:
    """None when the parts can leave through TMA stores (`out_rows` given: the outputs as rows of one 2-D view and
    each output's first row, `kernels.wgrad.tma_output_rows`), else why not."""
    if out_rows is None:
        return "no out_rows (the outputs as rows of one 2-D view, and each output's first row) were given"
    view, first_rows = out_rows
    if not overwrite:
        return "the TMA store writes: it cannot add into main_grad (overwrite=False)"
    if view.dtype not in (torch.bfloat16, torch.float16, torch.float32) or view.dtype != out_base.dtype:
        return f"the TMA store takes 16-bit or fp32 outputs of out_base's type (got {view.dtype})"
    row_bytes = view.stride(0) * view.element_size() if view.dim() == 2 else 0
    if view.dim() != 2 or view.shape[1] != n_dim or view.stride(1) != 1 or row_bytes % 16 or view.data_ptr() % 16:
        return f"out_rows' view must be [rows, N={n_dim}] with 16-byte aligned rows (TMA)"
    if m_dim % block_m:
        return f"M={m_dim} is not a multiple of block_m={block_m} (a part would cross into the next output)"
    if first_rows.numel() != experts or first_rows.dtype not in (torch.int32, torch.int64):
        return f"out_rows gives {first_rows.numel()} first rows ({first_rows.dtype}) for {experts} outputs"
    return None


def wgrad_ws_plan(a: torch.Tensor, b: torch.Tensor, row_offsets: torch.Tensor, out_base: torch.Tensor,
                  out_offsets: torch.Tensor, *, overwrite: bool = False, block_m: int = 64, block_n: int = 256,
                  block_k: int = 32, num_stages: int = 8, acc_buffers: int = 1, group_m: int = 8, prefetch: int = 1,
                  mma_warpgroups: int | None = None, epilogue_warps: int | None = None,
                  epilogue_chunks: int | None = None, epilogue_regs: int | None = None, load_regs: int | None = None,
                  mma_regs: int | None = None, maxnreg: int | None = None, aligned: bool = False,
                  epilogue_vec: int | None = None, out_rows: tuple | None = None, tma_store: bool | None = None,
                  programs: int | None = None, sms: int | None = None):
    """The checked launch of `grouped_wgrad_ws`: (kernel, grid, args, constexprs), or None when there is nothing
    to compute (no experts, an empty dimension, no operand rows). Also what examples/compile_sm90.py compiles
    without a GPU (`sms`: the program count when `a` is not on one).

    Each MMA warpgroup's part of a tile is block_m x block_n (64 x 256 or 128 x 128: one warpgroup's
    accumulator); mma_warpgroups = 2 stacks two 64-row parts into 128 x 256 tiles (both read the same b blocks:
    40% less operand traffic per FLOP) handed in turn through the buffer(s) to 2 epilogue warps (12 warps of 168
    registers in all); default: 2 from TWO_MMA_MIN_ROWS mean rows per expert (a.shape[0] / experts, no host
    sync). K blocks of block_k rows in up to num_stages shared-memory stages (as many as fit next to
    `acc_buffers` fp32 parts handed to the epilogue warps); the epilogue reads, adds and writes each part in
    `epilogue_chunks` chunks of rows, the old main_grad `prefetch` chunks ahead; `aligned`: the caller promises
    16-byte aligned outputs (`kernels.wgrad.outputs_aligned`: 16-byte accesses); programs: at most this many
    persistent programs (default: one per SM)."""
    (rows, m_dim), n_dim = a.shape, b.shape[1]
    experts = out_offsets.numel()
    if row_offsets.numel() != experts + 1 or row_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_wgrad_ws: {row_offsets.numel()} row offsets ({row_offsets.dtype}) for {experts} "
                         "experts: give El + 1 int32/int64 offsets")
    if (out_base.dtype != torch.float32 and not overwrite) or not out_base.dtype.is_floating_point \
            or out_offsets.dtype != torch.int64:
        raise ValueError("grouped_wgrad_ws: fp32 outputs (any float type when writing), int64 element offsets")
    if mma_warpgroups is None:
        mode = ("write16" if out_base.element_size() == 2 else "write") if overwrite else "add"
        min_rows = TWO_MMA_MIN_ROWS[mode]
        mma_warpgroups = 2 if block_m == 64 and rows >= min_rows * max(experts, 1) else 1
    if acc_buffers not in (1, 2) or prefetch not in (1, 2) or mma_warpgroups not in (1, 2):
        raise ValueError(f"acc_buffers={acc_buffers}, prefetch={prefetch}, mma_warpgroups={mma_warpgroups}: "
                         "1 or 2 each")
    if mma_warpgroups == 2 and (block_m != 64 or (epilogue_warps or 2) != 2):
        raise ValueError(f"mma_warpgroups=2 takes block_m=64 (64-row parts of 128-row tiles) and 2 epilogue warps "
                         f"(12 warps of 168 registers; got block_m={block_m}, epilogue_warps={epilogue_warps})")
    epilogue_chunks = epilogue_chunks or (8 if mma_warpgroups == 2 else 2)
    # elements per epilogue access: 4 (16 bytes of fp32 where `aligned`; 8 bytes of a 16-bit output: the 16-byte
    # accesses of 8 bf16 ran 0.96-1.01x of these, docs/BENCHMARKS.md sixteenth session)
    epilogue_vec = epilogue_vec or 4
    if epilogue_vec not in (1, 2, 4, 8) or epilogue_vec > block_n:
        raise ValueError(f"epilogue_vec={epilogue_vec}: 1, 2, 4 or 8 elements per access")
    if epilogue_chunks not in (1, 2, 4, 8) or epilogue_chunks * 8 > block_m:
        raise ValueError(f"epilogue_chunks={epilogue_chunks}: 1, 2, 4 or 8, at least 8 rows each")
    if experts == 0 or m_dim == 0 or n_dim == 0 or rows == 0:
        return None
    # warps and registers: a 256-wide wgmma needs > 128 registers, so 12 warps (168 each at launch); else 16
    if mma_warpgroups == 2:  # MMA 4 + 4, epilogue 2, loader 1, tail 1: every warpgroup at 168
        epilogue_warps = 2
        epilogue_regs = epilogue_regs or 168
        load_regs = load_regs or 168
        mma_regs = mma_regs or 168
        maxnreg = maxnreg or 168
    epilogue_warps = epilogue_warps or (4 if block_n > 128 else 8)
    epilogue_regs = epilogue_regs or (200 if epilogue_warps == 4 else 152)
    load_regs = load_regs or (40 if epilogue_warps == 4 else 24)
    maxnreg = maxnreg or (168 if epilogue_warps == 4 else 128)
    tma_store_why = _tma_store_refusal(out_rows, out_base, overwrite, m_dim, n_dim, block_m, experts)
    if tma_store and tma_store_why:
        raise ValueError(f"grouped_wgrad_ws: tma_store=True but {tma_store_why}")
    # by default for 16-bit outputs; fp32 (first micro-batch into main_grad) only when asked: its 2 x 64 KB of
    # staging leave 4 ring stages, 0.79-0.97x of cuBLAS against the hand-off's 0.96-1.04x (sixteenth session)
    if tma_store is None:
        tma_store = tma_store_why is None and out_base.element_size() == 2
    tma_store = bool(tma_store)
    stage_bytes = (mma_warpgroups * block_m + block_n) * block_k * a.element_size()
    staging = (mma_warpgroups * block_m * block_n * out_base.element_size() if tma_store
               else acc_buffers * block_m * block_n * 4)
    nb = min(num_stages, (SMEM_BYTES - staging) // stage_bytes)
    if nb < 2:
        raise ValueError(f"num_stages={num_stages}: {nb} stages of {block_k}-row blocks fit next to the epilogue")
    a_desc = GluonDescriptor.from_tensor(a, [block_k, block_m], _smem_layout(block_k, block_m, a.dtype))
    b_desc = GluonDescriptor.from_tensor(b, [block_k, block_n], _smem_layout(block_k, block_n, a.dtype))
    total = experts * triton.cdiv(m_dim, block_m * mma_warpgroups) * triton.cdiv(n_dim, block_n)
    sms = sms or _sm_count(a.device)
    grid = (max(1, min(programs or sms, total)),)
    if tma_store:
        view, first_rows = out_rows
        c_desc = GluonDescriptor.from_tensor(view, [block_m, block_n], _smem_layout(block_m, block_n, view.dtype))
    else:  # placeholders the kernel does not touch
        c_desc, first_rows = a_desc, row_offsets
    args = (a_desc, b_desc, row_offsets, out_base, out_offsets, m_dim, n_dim, experts, c_desc, first_rows)
    constexprs = dict(GROUP_M=group_m, NB=nb, OVERWRITE=bool(overwrite), PRE=prefetch, EPI_WARPS=epilogue_warps,
                      EPI_REGS=epilogue_regs, LOAD_REGS=load_regs, NACC=acc_buffers, SPLIT=mma_warpgroups,
                      MMA_REGS=mma_regs or 0, NCH=epilogue_chunks,
                      ALIGNED=bool(aligned), VEC=epilogue_vec, TMA_STORE=tma_store, num_warps=4, maxnreg=maxnreg)
    return _wgrad_ws_kernel, grid, args, constexprs
