"""EXPERIMENT (kept in history only): layer 1 grouped GEMM with warp specialisation in Gluon on Hopper: a
1-warp TMA loader and two 4-warp consumers taking alternate 128 x 128 tiles, which take turns for their K loops
(an mbarrier pair), so one consumer's epilogue runs while the other's wgmmas do. Correct (ninth session);
without the turns the consumers ran several mbarrier phases ahead of the loader and the kernel crashed.
Slower than the single-partition kernel (kernels/gluon_gemm.py) except on small problems: docs/BENCHMARKS.md."""
import json, os, sys, types
import torch, triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GD
from comet_megatron.kernels.gluon_gemm import _acc_layout, _tile


@gluon.jit
def _loader(a_desc, w_desc, ready, empty, a_bufs, w_bufs, tile_expert_ptr, tile_start_ptr, tile_end_ptr, pid, nprog,
            total, num_tiles, mine, K_DIM: gl.constexpr, N_DIM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
            NB: gl.constexpr, GROUP_N: gl.constexpr, EL: gl.constexpr, W_REV: gl.constexpr,
            W_K_MAJOR: gl.constexpr):
    cnt = 0
    for i in range(mine):
        r0, r1, e, n0 = _tile(pid + i * nprog, total, num_tiles, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                              N_DIM, BN, GROUP_N, EL, W_REV)
        for k in range(0, K_DIM, BK):
            s = cnt % NB
            mbarrier.wait(empty.index(s), ((cnt // NB) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [r0, k], ready.index(s), a_bufs.index(s))
            if W_K_MAJOR:
                tma.async_copy_global_to_shared(w_desc, [e, n0, k], ready.index(s), w_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(w_desc, [e, k, n0], ready.index(s), w_bufs.index(s))
            cnt += 1


@gluon.jit
def _consumer(C: gl.constexpr, a_desc, c_desc, c_bufs, ready, empty, turn, a_bufs, w_bufs, out_ptr, prob_ptr,
              tile_expert_ptr, tile_start_ptr, tile_end_ptr, pid, nprog, total, num_tiles, mine,
              K_DIM: gl.constexpr, N_DIM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
              NB: gl.constexpr, GROUP_N: gl.constexpr, EL: gl.constexpr, W_REV: gl.constexpr,
              W_K_MAJOR: gl.constexpr, SCALE: gl.constexpr, MODE: gl.constexpr):
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, layout)
    col_l: gl.constexpr = gl.SliceLayout(0, layout)
    dtype: gl.constexpr = a_desc.dtype
    N_K: gl.constexpr = K_DIM // BK
    c_smem = c_bufs.index(C)
    if MODE == 0:
        first = C
        step = 2
    elif MODE == C + 1:
        first = 0
        step = 1
    else:
        first = mine
        step = 1
    j = 0
    for i in range(first, mine, step):
        if MODE == 0:  # take turns: start this tile's K loop once the other consumer has issued its previous one
            mbarrier.wait(turn.index(C), (j & 1) ^ (1 - C))
        r0, r1, e, n0 = _tile(pid + i * nprog, total, num_tiles, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                              N_DIM, BN, GROUP_N, EL, W_REV)
        rows = r0 + gl.arange(0, BM, layout=row_l)
        if SCALE:
            prob = gl.load(prob_ptr + rows, mask=rows < r1, other=0.0)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        base = i * N_K
        for kk in range(N_K):
            cnt = base + kk
            s = cnt % NB
            mbarrier.wait(ready.index(s), (cnt // NB) & 1)
            if W_K_MAJOR:
                b = w_bufs.index(s).reshape([BN, BK]).permute((1, 0))
            else:
                b = w_bufs.index(s).reshape([BK, BN])
            acc = warpgroup_mma(a_bufs.index(s), b, acc, is_async=True, use_acc=kk > 0)
            acc = warpgroup_mma_wait(1, (acc,))
            if kk > 0:  # the previous step's wgmma has completed: its stage may be refilled
                mbarrier.arrive(empty.index((cnt - 1) % NB))
        if MODE == 0:
            mbarrier.arrive(turn.index(1 - C))
        j += 1
        acc = warpgroup_mma_wait(0, (acc,))
        mbarrier.arrive(empty.index((base + N_K - 1) % NB))
        if SCALE:
            y = (acc * prob[:, None]).to(dtype)
        else:
            y = acc.to(dtype)
        if r0 + BM <= r1:
            tma.store_wait(pendings=0)
            c_smem.store(y)
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [r0, n0], c_smem)
        else:
            cols = n0 + gl.arange(0, BN, layout=col_l)
            gl.store(out_ptr + rows.to(gl.int64)[:, None] * N_DIM + cols[None, :], y, mask=(rows < r1)[:, None])
    tma.store_wait(pendings=0)


@gluon.jit
def ws_kernel(a_desc, w_desc, c_desc, out_ptr, prob_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
              num_tiles_ptr, K_DIM: gl.constexpr, N_DIM: gl.constexpr, GROUP_N: gl.constexpr, NB: gl.constexpr,
              SCALE: gl.constexpr, EL: gl.constexpr, W_REV: gl.constexpr, W_K_MAJOR: gl.constexpr,
              LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, MODE: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [NB] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(dtype, [NB] + w_desc.block_type.shape, w_desc.layout)
    c_bufs = gl.allocate_shared_memory(dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NB):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_tiles = gl.load(num_tiles_ptr)
    total = num_tiles * (N_DIM // BN)
    mine = gl.cdiv(gl.maximum(total - pid, 0), nprog)
    gl.warp_specialize([
        (_consumer, (0, a_desc, c_desc, c_bufs, ready, empty, turn, a_bufs, w_bufs, out_ptr, prob_ptr, tile_expert_ptr,
                     tile_start_ptr, tile_end_ptr, pid, nprog, total, num_tiles, mine, K_DIM, N_DIM, BM, BN, BK, NB,
                     GROUP_N, EL, W_REV, W_K_MAJOR, SCALE, MODE)),
        (_consumer, (1, a_desc, c_desc, c_bufs, ready, empty, turn, a_bufs, w_bufs, out_ptr, prob_ptr, tile_expert_ptr,
                     tile_start_ptr, tile_end_ptr, pid, nprog, total, num_tiles, mine, K_DIM, N_DIM, BM, BN, BK, NB,
                     GROUP_N, EL, W_REV, W_K_MAJOR, SCALE, MODE)),
        (_loader, (a_desc, w_desc, ready, empty, a_bufs, w_bufs, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                   pid, nprog, total, num_tiles, mine, K_DIM, N_DIM, BN, BK, NB, GROUP_N, EL, W_REV, W_K_MAJOR)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def ws_rows(a, w, layout, num_rows, prob=None, out=None, block_n=128, num_stages=4, loader_regs=24,
            consumer_regs=232, group_n=8, mode=0):
    el, k_dim, n_dim = w.shape
    gdt = gl.bfloat16
    stage = out if out is not None else torch.empty(num_rows, n_dim, dtype=a.dtype, device=a.device)
    a_desc = GD.from_tensor(a, [128, 64], gl.NVMMASharedLayout.get_default_for([128, 64], gdt))
    k_major = w.stride(1) == 1
    mem, block = (w.transpose(1, 2), [1, block_n, 64]) if k_major else (w, [1, 64, block_n])
    w_desc = GD(mem, list(mem.shape), list(mem.stride()), block, gl.NVMMASharedLayout.get_default_for(block, gdt))
    c_desc = GD.from_tensor(stage, [128, block_n], gl.NVMMASharedLayout.get_default_for([128, block_n], gdt))
    items = layout.max_tiles * (n_dim // block_n)
    grid = (max(1, min(torch.cuda.get_device_properties(a.device).multi_processor_count, items)),)
    ws_kernel[grid](a_desc, w_desc, c_desc, stage, prob if prob is not None else stage, layout.tile_expert,
                    layout.tile_row_start, layout.tile_row_end, layout.num_tiles, K_DIM=k_dim, N_DIM=n_dim,
                    GROUP_N=group_n, NB=num_stages, SCALE=prob is not None, EL=el, W_REV=False, W_K_MAJOR=k_major,
                    LOADER_REGS=loader_regs, CONSUMER_REGS=consumer_regs, MODE=mode, num_warps=4)
    return stage
