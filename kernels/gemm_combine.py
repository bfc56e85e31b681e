"""Layer 1: expert grouped GEMM in column chunks fused with the combine (scatter rows back to owners).

`gemm_combine`, one launch per rank, grid (num_compute + num_comm,):

- programs [0, num_compute) COMPUTE, persistent: program p takes work items p, p + num_compute, ... in
  CHUNK-MAJOR order: super-chunks of `group_n` column chunks one after the other (so whole column
  chunks of the output finish early), tile by tile inside one (see `_combine_item`). Each item
  computes y = a[tile] @ W[expert][:, chunk] (a = h forward, d_pre backward), scales the rows by their
  routing prob in fp32 when `scale` (forward), stores the chunk into a local staging buffer and
  release-stores the epoch into the item's local done flag.
- programs [num_compute, grid) COMMUNICATE: comm program c takes (super-chunk, tile) groups c, c + num_comm,
  ... in the same order; for a tile with remote rows it waits for the done flags of the tile's chunks in
  that super-chunk and writes every remote row of those chunks into the combine region of the row's
  owner rank at slot `pair` (t*K + k) through the address tables (rows owned by this rank were stored
  by the compute program); with `row_scalars` it also
  writes one fp32 per row into the owner's combine_scalars[pair] (backward: grad of the routing prob).
  When all its groups are done it release-stores the epoch into arrival[rank, c] of EVERY rank, so an
  owner knows that comm program c of this rank has delivered everything it had for it.

The prob scaling happens in the compute epilogue (on the fp32 accumulator, before rounding to the
activation dtype) so that communication programs are pure data movement ("put rows, raise signal"),
which an NVSHMEM put-with-signal can later replace for inter-node peers.

`combine_reduce`, on the owner, grid (cdiv(T, BT), cdiv(H, BH)): every program waits for
arrival[s, c] >= epoch for all ranks s and comm programs c < num_comm (all ranks must launch
gemm_combine with the same num_comm), then out[t] = sum_{k=0..K-1} combine[t*K + k] in that fixed order
(fp32 accumulation: deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig, combine_programs, dot_precision, epilogue_split, rows_16b_aligned
from .gluon_gemm import AUTO_MAX_K, gluon_supported, grouped_gemm_rows
from .launch import launch
from .operands import column_halves, load_rows_block, load_weight_block, rows_descriptor, weight_descriptor
from .routing import ReceiveLayout
from .token_sum import sum_rows_by_token
from .signals import (ERR_COMBINE_ARRIVAL, ERR_COMBINE_CHUNK, now, store_release, use_globaltimer, wait_all_geq,
                      wait_gather_geq,
                      wait_until_geq)


@triton.jit
def _combine_item(w, num_tiles, n_chunks, GROUP_N: tl.constexpr):
    """Work item w -> (tile, column chunk). Columns are cut into super-chunks of GROUP_N chunks; super-
    chunks are processed in order (they finish early, as Comet's column chunks), and inside one the
    items go tile by tile with the GROUP_N chunks inner, so a wave of programs re-reads few A rows."""
    per_super = num_tiles * GROUP_N
    first_chunk = (w // per_super) * GROUP_N
    chunks_here = tl.minimum(n_chunks - first_chunk, GROUP_N)
    r = w % per_super
    return r // chunks_here, first_chunk + r % chunks_here


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _partner_map_kernel(recv_src_ptr, recv_pair_ptr, n_rows, inv_row_ptr, inv_epoch_ptr, rank, epoch,
                        CK: tl.constexpr, BLOCK: tl.constexpr):
    """Pre-reduce: for every remote receive row, inv[src, pair] = row (tagged with the round's epoch), so
    a row can find the other rows of its token that met on this rank."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < n_rows
    src = tl.load(recv_src_ptr + rows, mask=m, other=rank)
    m = m & (src != rank)
    idx = src.to(tl.int64) * CK + tl.load(recv_pair_ptr + rows, mask=m, other=0)
    tl.store(inv_row_ptr + idx, rows, mask=m)
    tl.store(inv_epoch_ptr + idx, tl.zeros([BLOCK], dtype=tl.int32) + epoch, mask=m)


@triton.jit
def _partner(src, pair, rmask, kk, inv_row_ptr, inv_epoch_ptr, epoch, TOPK: tl.constexpr, CK: tl.constexpr):
    """(row of slot kk of each row's token on this rank, whether it is another row of the token here)."""
    idx = src.to(tl.int64) * CK + (pair // TOPK) * TOPK + kk
    here = rmask & (tl.load(inv_epoch_ptr + idx, mask=rmask, other=0) == epoch) & (pair % TOPK != kk)
    return tl.load(inv_row_ptr + idx, mask=here, other=0), here


@triton.jit
def _row_tile(prow, mask, tile_index_ptr, expert_offsets_ptr, EL: tl.constexpr, WORLD: tl.constexpr,
              BM: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Processing position of the M-tile holding receive row `prow` (see routing.ReceiveLayout.tile_index)."""
    lo = tl.zeros_like(prow)
    hi = tl.zeros_like(prow) + (EL - 1)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(expert_offsets_ptr + mid, mask=mask, other=0) <= prow
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    off = tl.load(expert_offsets_ptr + lo, mask=mask, other=0)
    t = (prow - off) // BM
    row_end = tl.minimum(off + (t + 1) * BM, tl.load(expert_offsets_ptr + lo + 1, mask=mask, other=0))
    seg_end_ptr = tile_index_ptr + EL + 1
    last = tl.zeros_like(prow)
    for r in tl.static_range(WORLD):
        last += (tl.load(seg_end_ptr + lo * WORLD + r, mask=mask, other=0) <= row_end - 1).to(tl.int32)
    last = tl.minimum(last, WORLD - 1)
    return tl.load(tile_index_ptr + EL + 1 + EL * WORLD + lo * WORLD + last, mask=mask, other=0) + t


@triton.jit
def _combine_store(y, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN: tl.constexpr,
                   W: tl.constexpr):
    """Columns [c0, c0 + W) of a tile's (scaled) rows: this rank's rows into their combine slot, the others
    into the staging buffer for the communication programs."""
    cols = c0 + tl.arange(0, W)
    cmask = cols < HIDDEN
    y = y.to(stage_ptr.dtype.element_ty)
    tl.store(local_combine_ptr + pair[:, None] * HIDDEN + cols[None, :], y, mask=local[:, None] & cmask[None, :])
    tl.store(stage_ptr + rows.to(tl.int64)[:, None] * HIDDEN + cols[None, :], y,
             mask=remote[:, None] & cmask[None, :])


# The epilogue on column sub-blocks: EPI_SPLIT (1, 2, 4 or 8) pieces split in halves level by level
# (a register shuffle); each piece's layout conversion for the stores is live one at a time.
@triton.jit
def _combine_l1(y, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN: tl.constexpr,
                BM: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr):
    if SPLIT == 1:
        _combine_store(y, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, W)
    else:
        y0, y1 = column_halves(y, BM, W)
        _combine_store(y0, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, W // 2)
        _combine_store(y1, c0 + W // 2, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, W // 2)


@triton.jit
def _combine_l2(y, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN: tl.constexpr,
                BM: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr):
    if SPLIT <= 2:
        _combine_l1(y, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, BM, W, SPLIT)
    else:
        y0, y1 = column_halves(y, BM, W)
        _combine_l1(y0, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, BM, W // 2, SPLIT // 2)
        _combine_l1(y1, c0 + W // 2, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, BM, W // 2,
                    SPLIT // 2)


@triton.jit
def _combine_epilogue(y, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN: tl.constexpr,
                      BM: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr):
    if SPLIT <= 4:
        _combine_l2(y, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, BM, W, SPLIT)
    else:
        y0, y1 = column_halves(y, BM, W)
        _combine_l2(y0, c0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, BM, W // 2, SPLIT // 2)
        _combine_l2(y1, c0 + W // 2, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, BM, W // 2,
                    SPLIT // 2)


@triton.jit
def _combine_compute_item(w, num_tiles, n_chunks, a_ptr, stride_a, w_ptr, stride_we, stride_wk, stride_wn, a_desc,
                          w_desc, recv_prob_ptr, stage_ptr, done_ptr, recv_pair_ptr, recv_src_ptr, row_scalars_ptr,
                          local_combine_ptr, local_scalars_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                          rank, epoch, trace_ptr, clock_ptr,
                          K_DIM: tl.constexpr, HIDDEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr, GROUP_N: tl.constexpr, SCALE: tl.constexpr, SCALARS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, TRACE: tl.constexpr, GLOBALTIMER: tl.constexpr,
                          A_DESC: tl.constexpr, W_DESC: tl.constexpr, W_K_MAJOR: tl.constexpr, EVEN_K: tl.constexpr,
                          EPI_SPLIT: tl.constexpr, EL: tl.constexpr, W_REV: tl.constexpr):
    """Compute program, one work item w = (tile, column chunk): y = a[tile] @ w[expert][:, chunk] (scaled),
    local rows stored into their combine slot, remote rows staged; then the item's done flag. W_REV: the
    weight operand holds the experts in reversed order (its [i] is expert EL-1-i's)."""
    if TRACE:
        tl.store(trace_ptr + 2 * w, now(clock_ptr, GLOBALTIMER))
    q, chunk = _combine_item(w, num_tiles, n_chunks, GROUP_N)
    cols = chunk * BN + tl.arange(0, BN)
    cmask = cols < HIDDEN
    j = tl.load(tile_expert_ptr + q)
    rs = tl.load(tile_start_ptr + q)
    rows = rs + tl.arange(0, BM)
    rmask = rows < tl.load(tile_end_ptr + q)
    a_rows = a_ptr + rows.to(tl.int64) * stride_a
    jw = EL - 1 - j if W_REV else j
    w_j = w_ptr + jw.to(tl.int64) * stride_we
    n0 = chunk * BN
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K_DIM, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K_DIM
        a = load_rows_block(a_desc, a_rows, rs, k0, ks, rmask, kmask, A_DESC, EVEN_K)
        b = load_weight_block(w_desc, w_j, jw, k0, n0, ks, cols, kmask, cmask, stride_wk, stride_wn,
                              W_DESC, W_K_MAJOR, EVEN_K, BK, BN)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if SCALE:
        acc = acc * tl.load(recv_prob_ptr + rows, mask=rmask, other=0.0)[:, None]
    # Rows whose owner is this rank go straight to their combine slot (no staging, no
    # communication program); the others are staged for the communication programs.
    src = tl.load(recv_src_ptr + rows, mask=rmask, other=-1)
    local = rmask & (src == rank)
    remote = rmask & (src != rank)
    pair = tl.load(recv_pair_ptr + rows, mask=local, other=0).to(tl.int64)
    _combine_epilogue(acc, n0, rows, local, remote, pair, local_combine_ptr, stage_ptr, HIDDEN, BM, BN, EPI_SPLIT)
    if SCALARS:
        if chunk == 0:
            tl.store(local_scalars_ptr + pair,
                     tl.load(row_scalars_ptr + rows, mask=local, other=0.0), mask=local)
    store_release(done_ptr + w, epoch)
    if TRACE:
        tl.store(trace_ptr + 2 * w + 1, now(clock_ptr, GLOBALTIMER))


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _gemm_combine_kernel(
    a_ptr, stride_a, w_ptr, stride_we, stride_wk, stride_wn, a_desc, w_desc, recv_prob_ptr,
    stage_ptr, done_ptr, recv_pair_ptr, recv_src_ptr, row_scalars_ptr, local_combine_ptr, local_scalars_ptr,
    combine_table, scalars_table, arrival_table,
    inv_row_ptr, inv_epoch_ptr, tile_index_ptr, expert_offsets_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr, num_tiles_ptr,
    rank, epoch, timeout, err_ptr, trace_ptr, clock_ptr, max_items,
    K_DIM: tl.constexpr, HIDDEN: tl.constexpr, WORLD: tl.constexpr, MAX_COMM: tl.constexpr,
    NUM_COMM: tl.constexpr, NUM_COMPUTE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr,
    SCALE: tl.constexpr, SCALARS: tl.constexpr, ROWS_16B: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TRACE: tl.constexpr, GLOBALTIMER: tl.constexpr, BLOCK_N_ITEMS: tl.constexpr,
    PRE_REDUCE: tl.constexpr, TOPK: tl.constexpr, CK: tl.constexpr, EL: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    A_DESC: tl.constexpr, W_DESC: tl.constexpr, W_K_MAJOR: tl.constexpr, EPI_SPLIT: tl.constexpr,
    W_REV: tl.constexpr,
):
    EVEN_K: tl.constexpr = K_DIM % BK == 0
    pid = tl.program_id(0)
    num_tiles = tl.load(num_tiles_ptr)
    n_chunks = tl.cdiv(HIDDEN, BN)
    total = num_tiles * n_chunks
    # while loops: the bounds live in device memory (Triton's interpreter cannot range() over them)
    if pid < NUM_COMPUTE:
        w = pid
        while w < total:
            _combine_compute_item(
                w, num_tiles, n_chunks, a_ptr, stride_a, w_ptr, stride_we, stride_wk, stride_wn, a_desc, w_desc,
                recv_prob_ptr, stage_ptr, done_ptr, recv_pair_ptr, recv_src_ptr, row_scalars_ptr,
                local_combine_ptr, local_scalars_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                rank, epoch, trace_ptr, clock_ptr, K_DIM, HIDDEN, BM, BN, BK, GROUP_N, SCALE, SCALARS,
                DOT_PRECISION, TRACE, GLOBALTIMER, A_DESC, W_DESC, W_K_MAJOR, EVEN_K, EPI_SPLIT, EL, W_REV)
            w += NUM_COMPUTE
    else:
        cid = pid - NUM_COMPUTE
        # Communication works per (super-chunk, tile): one wait for the tile's chunks of the super-chunk,
        # the rows' metadata and owner addresses loaded once, then the chunks moved back to back (per
        # item, the dependent metadata loads and the wait cost more than moving the rows). Tiles
        # without remote rows (every tile at EP=1, the local tiles at EP>1) are skipped outright.
        n_super = tl.cdiv(n_chunks, GROUP_N)
        g = cid
        while g < n_super * num_tiles:
            sc = g // num_tiles
            q = g % num_tiles
            first_chunk = sc * GROUP_N
            chunks_here = tl.minimum(n_chunks - first_chunk, GROUP_N)
            w0 = sc * num_tiles * GROUP_N + q * chunks_here  # the tile's first item in this super-chunk
            rows = tl.load(tile_start_ptr + q) + tl.arange(0, BM)
            rmask = rows < tl.load(tile_end_ptr + q)
            src = tl.load(recv_src_ptr + rows, mask=rmask, other=rank)
            rmask = rmask & (src != rank)  # local rows were stored by the compute program
            if tl.max(rmask.to(tl.int32), 0) > 0:
                wait_all_geq(done_ptr + w0, chunks_here, epoch, timeout, err_ptr, ERR_COMBINE_CHUNK, w0,
                             BLOCK_N_ITEMS, GLOBALTIMER)
                pair = tl.load(recv_pair_ptr + rows, mask=rmask, other=0).to(tl.int64)
                dst = tl.zeros([BM], dtype=tl.int64)  # per row: address of its owner's combine region
                for s in tl.static_range(WORLD):
                    dst = tl.where(src == s, tl.load(combine_table + s), dst)
                dst_rows = dst.to(tl.pointer_type(stage_ptr.dtype.element_ty), bitcast=True) + pair * HIDDEN
                if ROWS_16B:  # see dispatch_gemm: lets Triton vectorize stores to table-derived addresses
                    dst_rows = tl.multiple_of(dst_rows, 16)
                stage_rows = stage_ptr + rows.to(tl.int64) * HIDDEN
                send = rmask
                if PRE_REDUCE:
                    # Rows of one token that met on this rank travel as one: the row with the smallest k
                    # (the leader) sends their sum; the owner's combine_reduce reads only leader slots.
                    for kk in tl.static_range(TOPK):
                        prow, here = _partner(src, pair, rmask, kk, inv_row_ptr, inv_epoch_ptr, epoch, TOPK, CK)
                        send = send & ~(here & (kk < pair % TOPK))
                i = 0
                while i < chunks_here:
                    cols = (first_chunk + i) * BN + tl.arange(0, BN)
                    m2 = send[:, None] & (cols < HIDDEN)[None, :]
                    v = tl.load(stage_rows[:, None] + cols[None, :], mask=m2)
                    if PRE_REDUCE:
                        acc = v.to(tl.float32)
                        for kk in tl.static_range(TOPK):
                            prow, here = _partner(src, pair, send, kk, inv_row_ptr, inv_epoch_ptr, epoch, TOPK,
                                                  CK)
                            pos = _row_tile(prow, here, tile_index_ptr, expert_offsets_ptr, EL, WORLD, BM,
                                            SEARCH_STEPS)
                            item = sc * num_tiles * GROUP_N + pos * chunks_here + i
                            wait_gather_geq(done_ptr + item, here, epoch, timeout, err_ptr, ERR_COMBINE_CHUNK,
                                            w0 + i, done_ptr + w0, GLOBALTIMER)
                            pm = here[:, None] & (cols < HIDDEN)[None, :]
                            acc += tl.load(stage_ptr + prow.to(tl.int64)[:, None] * HIDDEN + cols[None, :], mask=pm,
                                           other=0.0).to(tl.float32)
                        v = acc.to(stage_ptr.dtype.element_ty)
                    tl.store(dst_rows[:, None] + cols[None, :], v, mask=m2)
                    if TRACE:
                        tl.store(trace_ptr + 2 * (max_items + w0 + i), now(clock_ptr, GLOBALTIMER))
                    i += 1
                if SCALARS:
                    if sc == 0:
                        sdst = tl.zeros([BM], dtype=tl.int64)
                        for s in tl.static_range(WORLD):
                            sdst = tl.where(src == s, tl.load(scalars_table + s), sdst)
                        tl.store(sdst.to(tl.pointer_type(tl.float32), bitcast=True) + pair,
                                 tl.load(row_scalars_ptr + rows, mask=rmask, other=0.0), mask=rmask)
            g += NUM_COMM
        for s in tl.static_range(WORLD):
            peer_arrival = tl.load(arrival_table + s).to(tl.pointer_type(tl.int32), bitcast=True)
            store_release(peer_arrival + rank * MAX_COMM + cid, epoch)


def gemm_combine(view, layout: ReceiveLayout, a: torch.Tensor, w: torch.Tensor, epoch: int, *,
                 recv_pair: torch.Tensor, recv_src: torch.Tensor, recv_prob: torch.Tensor | None = None,
                 row_scalars: torch.Tensor | None = None, num_comm: int | None = None,
                 num_compute: int | None = None, block_n: int = 64, block_k: int = 32,
                 trace: bool = False, num_warps: int = 4, num_stages: int = 3,
                 group_n: int = 8, use_tma: bool | None = None, pre_reduce: bool = False,
                 epilogue_n: int | None = None, reversed_experts: bool = False) -> torch.Tensor | None:
    """Compute y = a @ w[e] per receive row and deliver each row to combine[pair] on its owner rank.

    pre_reduce: rows of one token that meet on this rank are summed and sent once, into the slot of the
    smallest k (the owner must then call `combine_reduce(..., topk_idx=...)`, which reads only those
    slots for experts on other ranks). Needs a layout from `receive_layout` (its `tile_index`).

    a: [R, Kd] receive-order rows (forward: h, Kd = F; backward: d_pre, Kd = F1).
    w: [El, Kd, H] (forward: w2; backward: w1.transpose(1, 2), a strided view is fine); with
    `reversed_experts`, w[i] is expert El-1-i's (weights stored in descending expert order, read in place).
    recv_prob: if given, rows are scaled by it (forward); None sends unscaled rows (backward).
    row_scalars: optional [R] fp32 delivered to the owner's combine_scalars[pair] (backward: grad_prob).
    epilogue_n: the epilogue stores column sub-blocks of that width (block_n / 1, 2, 4 or 8; None: whole).
    Returns the trace buffer when `trace` ([2 * max_items, 2] int64: compute (start, end) per item, then
    one delivery timestamp per item in column 0), else None.
    """
    epi_split = epilogue_split(block_n, epilogue_n, "gemm_combine", "combine_epilogue_n")
    num_comm, num_compute = combine_programs(view.device, view.world_size, num_comm, num_compute)
    lay = view.layout
    if num_comm > lay.max_comm_programs:
        raise ValueError(f"num_comm={num_comm} exceeds the workspace's max_comm_programs={lay.max_comm_programs}")
    hidden, dev = lay.hidden, view.device
    dtype = view.regions["combine"].dtype
    stage = torch.empty(max(a.shape[0], 1), hidden, dtype=dtype, device=dev)
    max_items = layout.max_tiles * triton.cdiv(hidden, block_n)
    done = view.scratch("combine_chunk_done", max_items)
    trace_buf = torch.full((2 * max_items, 2), -1, dtype=torch.int64, device=dev) if trace else None
    a_desc = rows_descriptor(a, layout.block_m, block_k, force=use_tma)
    w_desc, k_major = weight_descriptor(w, block_k, block_n, force=use_tma)
    ck = lay.capacity_tokens * lay.topk
    el = lay.local_experts
    if pre_reduce:
        if layout.tile_index is None:
            raise ValueError("pre_reduce needs the layout built by receive_layout (tile_index)")
        inv_row = view.scratch("partner_row", view.world_size * ck)
        inv_epoch = view.scratch("partner_epoch", view.world_size * ck)
        if a.shape[0] > 0:
            launch(_partner_map_kernel, (triton.cdiv(a.shape[0], 256),),
                recv_src, recv_pair, a.shape[0], inv_row, inv_epoch, view.rank, epoch, CK=ck, BLOCK=256)
        tile_index = layout.tile_index
    else:
        inv_row = inv_epoch = tile_index = done
    launch(_gemm_combine_kernel, (num_compute + num_comm,),
        a, a.stride(0), w, w.stride(0), w.stride(1), w.stride(2),
        a_desc if a_desc is not None else a, w_desc if w_desc is not None else w,
        recv_prob if recv_prob is not None else stage,
        stage, done, recv_pair, recv_src, row_scalars if row_scalars is not None else stage,
        view.regions["combine"], view.regions["combine_scalars"],
        view.tables["combine"], view.tables["combine_scalars"], view.tables["arrival"],
        inv_row, inv_epoch, tile_index, layout.expert_offsets,
        layout.tile_expert, layout.tile_row_start, layout.tile_row_end, layout.num_tiles,
        view.rank, epoch, view.timeout, view.errors, trace_buf if trace else view.errors, view.clock, max_items,
        K_DIM=a.shape[1], HIDDEN=hidden, WORLD=view.world_size, MAX_COMM=lay.max_comm_programs,
        NUM_COMM=num_comm, NUM_COMPUTE=num_compute,
        BM=layout.block_m, BN=block_n, BK=block_k, GROUP_N=group_n,
        SCALE=recv_prob is not None, SCALARS=row_scalars is not None, ROWS_16B=rows_16b_aligned(hidden, dtype),
        DOT_PRECISION=dot_precision(a.dtype),
        TRACE=trace, GLOBALTIMER=use_globaltimer(view.errors), BLOCK_N_ITEMS=triton.next_power_of_2(group_n),
        PRE_REDUCE=pre_reduce, TOPK=lay.topk, CK=ck, EL=el, SEARCH_STEPS=el.bit_length(),
        A_DESC=a_desc is not None, W_DESC=w_desc is not None, W_K_MAJOR=k_major, EPI_SPLIT=epi_split,
        W_REV=bool(reversed_experts), num_warps=num_warps, num_stages=num_stages,
    )
    return trace_buf


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _combine_reduce_kernel(combine_ptr, out_ptr, arrival_ptr, num_tokens, epoch, timeout, err_ptr, topk_idx_ptr, rank,
                           HIDDEN: tl.constexpr, WORLD: tl.constexpr, MAX_COMM: tl.constexpr, NUM_COMM: tl.constexpr,
                           BLOCK_C: tl.constexpr,
                           TOPK: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, GLOBALTIMER: tl.constexpr,
                           PRE_REDUCE: tl.constexpr, EL: tl.constexpr):
    for s in tl.static_range(WORLD):
        wait_all_geq(arrival_ptr + s * MAX_COMM, NUM_COMM, epoch, timeout, err_ptr, ERR_COMBINE_ARRIVAL,
                     s * MAX_COMM, BLOCK_C, GLOBALTIMER)
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    m = (tokens < num_tokens)[:, None] & (cols < HIDDEN)[None, :]
    acc = tl.zeros([BT, BH], dtype=tl.float32)
    tmask = tokens < num_tokens
    for k in tl.static_range(TOPK):
        slot = (tokens * TOPK + k).to(tl.int64)
        mk = m
        if PRE_REDUCE:
            # a slot holds data if its expert is on this rank (stored locally, never pre-reduced) or it is
            # the leader (smallest k) of its token's slots on the expert's rank (the pre-reduced sum)
            owner_k = tl.load(topk_idx_ptr + slot, mask=tmask, other=0) // EL
            valid = owner_k == rank
            leader = tmask
            for kk in tl.static_range(k):
                leader = leader & (tl.load(topk_idx_ptr + tokens.to(tl.int64) * TOPK + kk, mask=tmask, other=0) // EL
                                   != owner_k)
            mk = m & (valid | leader)[:, None]
        acc += tl.load(combine_ptr + slot[:, None] * HIDDEN + cols[None, :], mask=mk, other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * HIDDEN + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m)


def combine_reduce(view, num_tokens: int, epoch: int, *, num_comm: int | None = None, scalars: bool = False,
                   out_dtype: torch.dtype | None = None, block_t: int = 16, block_h: int = 128,
                   topk_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """On the owner: wait for every peer's deliveries of round `epoch`, sum the K slots of each token.

    `topk_idx` ([T, K] global expert ids of this rank's tokens): the peers pre-reduced (gemm_combine's
    `pre_reduce`): for experts on other ranks only the slot of the smallest k per rank is summed.

    Returns (out [T, H], grad_probs [T, K] fp32 copied from combine_scalars when `scalars`, else None).
    `num_comm` must equal the value every rank passed to gemm_combine.
    """
    num_comm, _ = combine_programs(view.device, view.world_size, num_comm, None)
    lay = view.layout
    hidden, k = lay.hidden, lay.topk
    out = torch.empty(max(num_tokens, 1), hidden, dtype=out_dtype or view.regions["combine"].dtype,
                      device=view.device)
    # With no local tokens the kernel still runs one program: the waits keep the round's ordering.
    grid = (max(triton.cdiv(num_tokens, block_t), 1), triton.cdiv(hidden, block_h))
    launch(_combine_reduce_kernel, grid,
        view.regions["combine"], out, view.regions["arrival"], num_tokens, epoch, view.timeout,
        view.errors, topk_idx if topk_idx is not None else view.errors, view.rank,
        HIDDEN=hidden, WORLD=view.world_size, MAX_COMM=lay.max_comm_programs, NUM_COMM=num_comm,
        BLOCK_C=triton.next_power_of_2(num_comm), TOPK=k,
        BT=block_t, BH=block_h, GLOBALTIMER=use_globaltimer(view.errors),
        PRE_REDUCE=topk_idx is not None, EL=lay.local_experts,
    )
    grad_probs = view.regions["combine_scalars"][: num_tokens * k].view(num_tokens, k).clone() if scalars else None
    return out[:num_tokens], grad_probs


# --- world size 1: layer 1 without a combine region --------------------------------------------------------

def local_layer1(view, cfg: KernelConfig, a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether layer 1 of this round runs as `local_gemm_combine` instead of gemm_combine + combine_reduce: world
    size 1, the Gluon kernel applies, and `cfg.gluon_layer1` is True, or None (auto) with K <= AUTO_MAX_K (where
    it was measured faster). True where it cannot run raises ValueError with the reason."""
    if view.world_size != 1 or cfg.gluon_layer1 is False or cfg.pre_reduce:
        return False
    if cfg.gluon_layer1 is None and w.shape[1] > AUTO_MAX_K:
        return False
    why = gluon_supported(a, w, cfg.block_m, cfg.combine_block_n or cfg.block_n, trace=cfg.trace)
    if why is not None and cfg.gluon_layer1:
        raise ValueError(f"gluon_layer1=True but the Gluon layer-1 kernel cannot run here: {why}")
    return why is None


def sum_by_pair(rows: torch.Tensor, recv_pair: torch.Tensor, num_tokens: int, topk: int,
                row_scalars: torch.Tensor | None = None, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """World size 1, where the receive rows are a permutation of the (token, slot) pairs: (out [T, H],
    per-pair scalars [T, K] fp32 or None) with out[t] = sum over k of rows[r(t, k)] (recv_pair[r(t, k)] =
    t * K + k) in fp32, k ascending (combine_reduce's order), rounded once; scalars[t, k] = row_scalars[r(t, k)].
    `out`: [T, H] buffer for the sums."""
    n = num_tokens * topk
    if rows.shape[0] < n or recv_pair.numel() < n:
        raise ValueError(f"{rows.shape[0]} rows / {recv_pair.numel()} pairs for {num_tokens} tokens x top-{topk}")
    inv = torch.empty(n, dtype=torch.int64, device=rows.device)
    inv[recv_pair[:n].long()] = torch.arange(n, device=rows.device)
    starts = torch.arange(0, n + 1, topk, device=rows.device)
    out = sum_rows_by_token(rows[:n], inv, starts, out=out)
    scalars = row_scalars[inv].view(num_tokens, topk).float() if row_scalars is not None else None
    return out, scalars


def local_gemm_combine(layout: ReceiveLayout, a: torch.Tensor, w: torch.Tensor, num_tokens: int, topk: int, *,
                       recv_pair: torch.Tensor, recv_prob: torch.Tensor | None = None,
                       row_scalars: torch.Tensor | None = None, block_n: int = 256, group_n: int = 8,
                       num_stages: int = 3, reversed_experts: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gemm_combine + combine_reduce at world size 1 (check `local_layer1` first): the Gluon grouped GEMM writes
    the (prob-scaled) rows in receive order, then each token's rows are summed (`sum_by_pair`). Same arguments
    and results as that pair (forward: recv_prob; backward: row_scalars -> per-pair grad of the probs)."""
    n = num_tokens * topk
    rows = grouped_gemm_rows(a, w, layout, n, prob=recv_prob, block_n=block_n, group_n=group_n,
                             num_stages=num_stages, reversed_experts=reversed_experts)
    return sum_by_pair(rows, recv_pair, num_tokens, topk, row_scalars)
