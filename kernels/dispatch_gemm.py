"""Layer 0: dispatch (pull rows from peers) fused with the expert grouped GEMM and its epilogue.

One launch per rank, grid (num_comm + num_compute,):

- programs [0, num_comm) COMMUNICATE: program c takes tiles c, c + num_comm, ... of the layout's tile
  list (processing order: local rows first, then ring order). For each tile it waits for
  `inputs_ready[s]` (epoch) of every source rank s that has rows in the tile, pulls the rows
  x_s[pair // K] from the peers through the int64 address tables into the local receive buffer (and,
  in forward, the pair id, source rank and routing prob of every row, resolved through the peer's
  `send_order`/`send_offsets`), then release-stores the epoch into the tile's local ready flag.
- programs [num_comm, grid) COMPUTE, persistent: program p takes work items p, p + num_compute, ... where
  item w is a (tile, column block) pair (see `_dispatch_item`). It waits for the tile's ready flag and
  computes recv[tile] @ W[expert] (weights through TMA descriptors on Hopper, see operands.py) with
  the epilogue fused (items are grouped: GROUP_M consecutive
  tiles sweep the column blocks together, for L2 reuse of the weights):
    forward:  h = act(pre) (gated: act(pre[:, :F]) * pre[:, F:]); stores h and, if asked, pre.
    backward: the rows are grad_out rows, W = w2^T, so acc = dhp = g @ w2^T (grad of the prob-scaled
              hidden). Stores dhp, which `_act_backward_kernel` turns in place into d_pre = act'(pre) *
              (dhp * p) plus per-(row, column block) partials of grad_prob = rowsum(dhp * h), summed by
              the launcher in a fixed order (deterministic); `fused_act_backward` does this in the
              epilogue instead.
Waiting programs have higher program ids than the programs they wait for, so the kernel also runs in
Triton's sequential CPU interpreter. On a GPU the grid must be co-resident (num_comm + num_compute <=
SMs x occupancy) because compute programs spin on flags raised by communication programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import dispatch_programs, dot_precision, epilogue_split, rows_16b_aligned
from .launch import launch
from .operands import column_halves, load_rows_block, load_weight_block, weight_descriptor
from .routing import ReceiveLayout
from .signals import ERR_DISPATCH_INPUTS, ERR_DISPATCH_TILE, now, store_release, use_globaltimer, wait_until_geq

ACTIVATIONS = {"silu": 0, "gelu": 1, "relu": 2}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # exact (erf) gelu, as torch's default
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        d = tl.where(x > 0.0, 1.0, 0.0)
    return d


@triton.jit
def _pull_tile_rows(q, x_table, order_table, offsets_table, probs_table, inputs_ready_ptr,
                    seg_start_ptr, seg_count_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                    recv_ptr, recv_pair_ptr, recv_src_ptr, recv_prob_ptr,
                    rank, epoch, timeout, err_ptr,
                    TOPK: tl.constexpr, HIDDEN: tl.constexpr, WORLD: tl.constexpr, EL: tl.constexpr,
                    BM: tl.constexpr, BH: tl.constexpr,
                    KNOWN_ROWS: tl.constexpr, ROWS_16B: tl.constexpr, GLOBALTIMER: tl.constexpr):
    """Pull the rows of tile q from their source ranks into the local receive buffer."""
    j = tl.load(tile_expert_ptr + q)
    rs = tl.load(tile_start_ptr + q)
    re = tl.load(tile_end_ptr + q)
    rows = rs + tl.arange(0, BM)
    rmask = rows < re
    xbase = tl.zeros([BM], dtype=tl.int64)  # per row: address of its source rank's tokens region
    if KNOWN_ROWS:
        # Backward: sources were resolved by the forward round of the same routing.
        pair = tl.load(recv_pair_ptr + rows, mask=rmask, other=0)
        src = tl.load(recv_src_ptr + rows, mask=rmask, other=0)
        for s in tl.static_range(WORLD):
            from_s = rmask & (src == s)
            if tl.max(from_s.to(tl.int32), 0) > 0:
                wait_until_geq(inputs_ready_ptr + s, epoch, timeout, err_ptr, ERR_DISPATCH_INPUTS, s, GLOBALTIMER)
                xbase = tl.where(from_s, tl.load(x_table + s), xbase)
    else:
        pair = tl.zeros([BM], dtype=tl.int32)
        src = tl.zeros([BM], dtype=tl.int32)
        prob = tl.zeros([BM], dtype=tl.float32)
        for i in range(WORLD):
            s = (rank + i) % WORLD
            st = tl.load(seg_start_ptr + j * WORLD + i)
            cnt = tl.load(seg_count_ptr + j * WORLD + i)
            if (cnt > 0) & (st < re) & (st + cnt > rs):
                wait_until_geq(inputs_ready_ptr + s, epoch, timeout, err_ptr, ERR_DISPATCH_INPUTS, s, GLOBALTIMER)
                in_seg = rmask & (rows >= st) & (rows < st + cnt)
                peer_offsets = tl.load(offsets_table + s).to(tl.pointer_type(tl.int32), bitcast=True)
                peer_order = tl.load(order_table + s).to(tl.pointer_type(tl.int32), bitcast=True)
                peer_probs = tl.load(probs_table + s).to(tl.pointer_type(tl.float32), bitcast=True)
                first = tl.load(peer_offsets + rank * EL + j)  # this expert's first pair in s's send order
                pair_s = tl.load(peer_order + first + (rows - st), mask=in_seg, other=0)
                prob_s = tl.load(peer_probs + pair_s, mask=in_seg, other=0.0)
                pair = tl.where(in_seg, pair_s, pair)
                src = tl.where(in_seg, s, src)
                prob = tl.where(in_seg, prob_s, prob)
                xbase = tl.where(in_seg, tl.load(x_table + s), xbase)
        tl.store(recv_pair_ptr + rows, pair, mask=rmask)
        tl.store(recv_src_ptr + rows, src, mask=rmask)
        tl.store(recv_prob_ptr + rows, prob, mask=rmask)
    token_rows = (xbase.to(tl.pointer_type(recv_ptr.dtype.element_ty), bitcast=True)
                  + (pair // TOPK).to(tl.int64) * HIDDEN)
    if ROWS_16B:
        # Region bases are 256-byte aligned and a row is a multiple of 16 bytes: lets Triton vectorize
        # the gathered loads (it cannot know the alignment of addresses read from a table).
        token_rows = tl.multiple_of(token_rows, 16)
    dst_rows = recv_ptr + rows.to(tl.int64) * HIDDEN
    for h0 in range(0, HIDDEN, BH):
        cols = h0 + tl.arange(0, BH)
        m = rmask[:, None] & (cols[None, :] < HIDDEN)
        v = tl.load(token_rows[:, None] + cols[None, :], mask=m)
        tl.store(dst_rows[:, None] + cols[None, :], v, mask=m)


@triton.jit
def _forward_chunk(gate, up, rmask, c0, out_rows, pre_rows, FFN: tl.constexpr, W: tl.constexpr, ACT: tl.constexpr,
                   GATED: tl.constexpr, STORE_PRE: tl.constexpr):
    """Forward epilogue of columns [c0, c0 + W) of one tile: h = act(gate) (* up) and the pre-activation."""
    cols = c0 + tl.arange(0, W)
    m = rmask[:, None] & (cols < FFN)[None, :]
    if GATED:
        h = _act(gate, ACT) * up
    else:
        h = _act(gate, ACT)
    tl.store(out_rows + cols[None, :], h.to(out_rows.dtype.element_ty), mask=m)
    if STORE_PRE:
        tl.store(pre_rows + cols[None, :], gate.to(pre_rows.dtype.element_ty), mask=m)
        if GATED:
            tl.store(pre_rows + FFN + cols[None, :], up.to(pre_rows.dtype.element_ty), mask=m)


@triton.jit
def _act_backward_chunk(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN: tl.constexpr, W: tl.constexpr,
                        ACT: tl.constexpr, GATED: tl.constexpr, STORE_HP: tl.constexpr):
    """Activation backward of columns [c0, c0 + W) of one tile, dhp [BM, W] = (g @ w2^T) on them (fp32):
    stores d_pre (both gated halves) and h * p; returns the rows' partial sums of dhp * h (grad_prob)."""
    cols = c0 + tl.arange(0, W)
    m = rmask[:, None] & (cols < FFN)[None, :]
    dh = dhp * p[:, None]
    gate = tl.load(pre_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(pre_rows + FFN + cols[None, :], mask=m, other=0.0).to(tl.float32)
        act_gate = _act(gate, ACT)
        h = act_gate * up
        tl.store(out_rows + FFN + cols[None, :], (dh * act_gate).to(out_rows.dtype.element_ty), mask=m)
        d_gate = dh * up * _act_grad(gate, ACT)
    else:
        h = _act(gate, ACT)
        d_gate = dh * _act_grad(gate, ACT)
    tl.store(out_rows + cols[None, :], d_gate.to(out_rows.dtype.element_ty), mask=m)
    if STORE_HP:
        tl.store(hp_rows + cols[None, :], (h * p[:, None]).to(hp_rows.dtype.element_ty), mask=m)
    # Masked columns contribute 0: dhp is 0 there (B was loaded as 0).
    return tl.sum(dhp * h, 1)


# Epilogues on column sub-blocks: `EPI_SPLIT` (1, 2, 4 or 8) pieces of the tile's columns, split in halves
# level by level (a register shuffle, no memory round trip); each piece's operands and products are live
# one at a time, so the epilogue fits in registers next to the accumulators.
@triton.jit
def _forward_l1(g, u, rmask, c0, out_rows, pre_rows, FFN: tl.constexpr, BM: tl.constexpr, W: tl.constexpr,
                SPLIT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr):
    if SPLIT == 1:
        _forward_chunk(g, u, rmask, c0, out_rows, pre_rows, FFN, W, ACT, GATED, STORE_PRE)
    else:
        g0, g1 = column_halves(g, BM, W)
        u0, u1 = column_halves(u, BM, W)
        _forward_chunk(g0, u0, rmask, c0, out_rows, pre_rows, FFN, W // 2, ACT, GATED, STORE_PRE)
        _forward_chunk(g1, u1, rmask, c0 + W // 2, out_rows, pre_rows, FFN, W // 2, ACT, GATED, STORE_PRE)


@triton.jit
def _forward_l2(g, u, rmask, c0, out_rows, pre_rows, FFN: tl.constexpr, BM: tl.constexpr, W: tl.constexpr,
                SPLIT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr):
    if SPLIT <= 2:
        _forward_l1(g, u, rmask, c0, out_rows, pre_rows, FFN, BM, W, SPLIT, ACT, GATED, STORE_PRE)
    else:
        g0, g1 = column_halves(g, BM, W)
        u0, u1 = column_halves(u, BM, W)
        _forward_l1(g0, u0, rmask, c0, out_rows, pre_rows, FFN, BM, W // 2, SPLIT // 2, ACT, GATED, STORE_PRE)
        _forward_l1(g1, u1, rmask, c0 + W // 2, out_rows, pre_rows, FFN, BM, W // 2, SPLIT // 2, ACT, GATED,
                    STORE_PRE)


@triton.jit
def _forward_epilogue(g, u, rmask, c0, out_rows, pre_rows, FFN: tl.constexpr, BM: tl.constexpr, W: tl.constexpr,
                      SPLIT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr):
    """Layer 0 forward epilogue of a tile's columns [c0, c0 + W) in SPLIT pieces: h and pre stored."""
    if SPLIT <= 4:
        _forward_l2(g, u, rmask, c0, out_rows, pre_rows, FFN, BM, W, SPLIT, ACT, GATED, STORE_PRE)
    else:
        g0, g1 = column_halves(g, BM, W)
        u0, u1 = column_halves(u, BM, W)
        _forward_l2(g0, u0, rmask, c0, out_rows, pre_rows, FFN, BM, W // 2, SPLIT // 2, ACT, GATED, STORE_PRE)
        _forward_l2(g1, u1, rmask, c0 + W // 2, out_rows, pre_rows, FFN, BM, W // 2, SPLIT // 2, ACT, GATED,
                    STORE_PRE)


@triton.jit
def _act_backward_l1(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN: tl.constexpr, BM: tl.constexpr,
                     W: tl.constexpr, SPLIT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                     STORE_HP: tl.constexpr):
    if SPLIT == 1:
        gp = _act_backward_chunk(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN, W, ACT, GATED, STORE_HP)
    else:
        a0, a1 = column_halves(dhp, BM, W)
        gp = _act_backward_chunk(a0, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN, W // 2, ACT, GATED, STORE_HP)
        gp += _act_backward_chunk(a1, p, rmask, c0 + W // 2, out_rows, pre_rows, hp_rows, FFN, W // 2, ACT, GATED,
                                  STORE_HP)
    return gp


@triton.jit
def _act_backward_l2(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN: tl.constexpr, BM: tl.constexpr,
                     W: tl.constexpr, SPLIT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                     STORE_HP: tl.constexpr):
    if SPLIT <= 2:
        gp = _act_backward_l1(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN, BM, W, SPLIT, ACT, GATED,
                              STORE_HP)
    else:
        a0, a1 = column_halves(dhp, BM, W)
        gp = _act_backward_l1(a0, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN, BM, W // 2, SPLIT // 2, ACT,
                              GATED, STORE_HP)
        gp += _act_backward_l1(a1, p, rmask, c0 + W // 2, out_rows, pre_rows, hp_rows, FFN, BM, W // 2,
                               SPLIT // 2, ACT, GATED, STORE_HP)
    return gp


@triton.jit
def _act_backward_epilogue(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN: tl.constexpr, BM: tl.constexpr,
                           W: tl.constexpr, SPLIT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                           STORE_HP: tl.constexpr):
    """Fused activation backward of a tile's columns [c0, c0 + W) in SPLIT pieces; returns the rows'
    partial grad_prob sums."""
    if SPLIT <= 4:
        gp = _act_backward_l2(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN, BM, W, SPLIT, ACT, GATED,
                              STORE_HP)
    else:
        a0, a1 = column_halves(dhp, BM, W)
        gp = _act_backward_l2(a0, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN, BM, W // 2, SPLIT // 2, ACT,
                              GATED, STORE_HP)
        gp += _act_backward_l2(a1, p, rmask, c0 + W // 2, out_rows, pre_rows, hp_rows, FFN, BM, W // 2,
                               SPLIT // 2, ACT, GATED, STORE_HP)
    return gp


@triton.jit
def _dispatch_item(w, num_tiles, n_blocks, GROUP_M: tl.constexpr):
    """Work item w -> (tile, column block), grouped: GROUP_M consecutive tiles (in processing order)
    sweep all column blocks together, so concurrent programs share weight tiles in L2."""
    per_group = GROUP_M * n_blocks
    first = (w // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_tiles - first, GROUP_M)
    r = w % per_group
    return first + r % rows_in_group, r // rows_in_group


@triton.jit
def _compute_item(w, q, nb, a_rows, rows, rmask, j, rs, n_blocks,
                  w_ptr, stride_we, stride_wk, stride_wn, w_desc,
                  out_ptr, stride_out, pre_ptr, stride_pre, gp_part_ptr, hp_ptr, recv_prob_ptr,
                  trace_ptr, clock_ptr, max_tiles,
                  HIDDEN: tl.constexpr, FFN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  ACT: tl.constexpr, GATED: tl.constexpr, BACKWARD: tl.constexpr, STORE_PRE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, TRACE: tl.constexpr, GLOBALTIMER: tl.constexpr,
                  W_DESC: tl.constexpr, W_K_MAJOR: tl.constexpr, EVEN_K: tl.constexpr, FUSED_BWD: tl.constexpr,
                  STORE_HP: tl.constexpr, EPI_SPLIT: tl.constexpr, EL: tl.constexpr, W_REV: tl.constexpr):
    """One work item: rows (a_rows: their addresses) @ W[j][:, column block nb] with the fused epilogue.
    W_REV: the weight operand holds the experts in reversed order (its [i] is expert EL-1-i's)."""
    if TRACE:
        tl.store(trace_ptr + 2 * (max_tiles + w), now(clock_ptr, GLOBALTIMER))
    cols = nb * BN + tl.arange(0, BN)
    cmask = cols < FFN
    jw = EL - 1 - j if W_REV else j
    w_j = w_ptr + jw.to(tl.int64) * stride_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)  # forward gated: the "up" half (cols + ffn)
    n0 = nb * BN
    for k0 in range(0, HIDDEN, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < HIDDEN
        # The receive rows were written by this launch's communication programs: pointer loads
        # (see operands.py); the weights may come through TMA.
        a = load_rows_block(w_desc, a_rows, rs, k0, ks, rmask, kmask, False, EVEN_K)
        b = load_weight_block(w_desc, w_j, jw, k0, n0, ks, cols, kmask, cmask, stride_wk, stride_wn,
                              W_DESC, W_K_MAJOR, EVEN_K, BK, BN)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED and not BACKWARD:
            b_up = load_weight_block(w_desc, w_j + FFN * stride_wn, jw, k0, n0 + FFN, ks, cols, kmask,
                                     cmask, stride_wk, stride_wn, W_DESC, W_K_MAJOR, EVEN_K, BK, BN)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
    m2 = rmask[:, None] & cmask[None, :]
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out
    pre_rows = pre_ptr + rows.to(tl.int64)[:, None] * stride_pre
    if not BACKWARD:
        _forward_epilogue(acc, acc_up, rmask, n0, out_rows, pre_rows, FFN, BM, BN, EPI_SPLIT, ACT, GATED, STORE_PRE)
    elif not FUSED_BWD:
        # dhp only (light epilogue); `_act_backward_kernel` finishes d_pre and grad_prob in place
        tl.store(out_rows + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        # Activation backward in the epilogue (whole-tile it spilled on Hopper: hence the sub-blocks)
        p = tl.load(recv_prob_ptr + rows, mask=rmask, other=0.0)
        hp_rows = hp_ptr + rows.to(tl.int64)[:, None] * FFN
        gp = _act_backward_epilogue(acc, p, rmask, n0, out_rows, pre_rows, hp_rows, FFN, BM, BN, EPI_SPLIT, ACT,
                                    GATED, STORE_HP)
        tl.store(gp_part_ptr + rows.to(tl.int64) * n_blocks + nb, gp, mask=rmask)
    if TRACE:
        tl.store(trace_ptr + 2 * (max_tiles + w) + 1, now(clock_ptr, GLOBALTIMER))


@triton.jit
def _local_item(w, n_local, n_blocks, tile_expert_ptr, tile_start_ptr, tile_end_ptr, recv_pair_ptr,
                local_tokens_ptr, local_order_ptr, local_offsets_ptr, seg_start_ptr, rank,
                w_ptr, stride_we, stride_wk, stride_wn, w_desc,
                out_ptr, stride_out, pre_ptr, stride_pre, gp_part_ptr, hp_ptr, recv_prob_ptr,
                trace_ptr, clock_ptr, max_tiles,
                TOPK: tl.constexpr, HIDDEN: tl.constexpr, FFN: tl.constexpr, WORLD: tl.constexpr, EL: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                ACT: tl.constexpr, GATED: tl.constexpr, BACKWARD: tl.constexpr, STORE_PRE: tl.constexpr,
                KNOWN_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr, TRACE: tl.constexpr,
                GLOBALTIMER: tl.constexpr, W_DESC: tl.constexpr, W_K_MAJOR: tl.constexpr, EVEN_K: tl.constexpr,
                FUSED_BWD: tl.constexpr, STORE_HP: tl.constexpr, EPI_SPLIT: tl.constexpr, W_REV: tl.constexpr):
    """Phase 1 work item w: a tile of only this rank's rows, gathered in place from the tokens region."""
    q, nb = _dispatch_item(w, n_local, n_blocks, GROUP_M)
    j = tl.load(tile_expert_ptr + q)
    rs = tl.load(tile_start_ptr + q)
    rows = rs + tl.arange(0, BM)
    rmask = rows < tl.load(tile_end_ptr + q)
    if KNOWN_ROWS:
        pair = tl.load(recv_pair_ptr + rows, mask=rmask, other=0)
    else:
        first = tl.load(local_offsets_ptr + rank * EL + j) - tl.load(seg_start_ptr + j * WORLD)
        pair = tl.load(local_order_ptr + first + rows, mask=rmask, other=0)
    a_rows = local_tokens_ptr + (pair // TOPK).to(tl.int64) * HIDDEN
    _compute_item(w, q, nb, a_rows, rows, rmask, j, rs, n_blocks,
                  w_ptr, stride_we, stride_wk, stride_wn, w_desc,
                  out_ptr, stride_out, pre_ptr, stride_pre, gp_part_ptr, hp_ptr, recv_prob_ptr,
                  trace_ptr, clock_ptr, max_tiles,
                  HIDDEN, FFN, BM, BN, BK, ACT, GATED, BACKWARD, STORE_PRE, DOT_PRECISION, TRACE,
                  GLOBALTIMER, W_DESC, W_K_MAJOR, EVEN_K, FUSED_BWD, STORE_HP, EPI_SPLIT, EL, W_REV)


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _dispatch_gemm_kernel(
    x_table, order_table, offsets_table, probs_table, inputs_ready_ptr,
    seg_start_ptr, seg_count_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, num_tiles_ptr,
    recv_ptr, recv_pair_ptr, recv_src_ptr, recv_prob_ptr, tile_ready_ptr,
    local_tokens_ptr, local_order_ptr, local_offsets_ptr,
    w_ptr, stride_we, stride_wk, stride_wn, w_desc,
    out_ptr, stride_out, pre_ptr, stride_pre, gp_part_ptr, hp_ptr,
    rank, epoch, timeout, err_ptr, trace_ptr, clock_ptr, max_tiles,
    TOPK: tl.constexpr, HIDDEN: tl.constexpr, FFN: tl.constexpr, WORLD: tl.constexpr, EL: tl.constexpr,
    NUM_COMM: tl.constexpr, NUM_COMPUTE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, GROUP_M: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, BACKWARD: tl.constexpr, STORE_PRE: tl.constexpr,
    KNOWN_ROWS: tl.constexpr, ROWS_16B: tl.constexpr, DOT_PRECISION: tl.constexpr, TRACE: tl.constexpr,
    GLOBALTIMER: tl.constexpr, W_DESC: tl.constexpr, W_K_MAJOR: tl.constexpr, IN_PLACE: tl.constexpr,
    FUSED_BWD: tl.constexpr, STORE_HP: tl.constexpr, EPI_SPLIT: tl.constexpr, W_REV: tl.constexpr,
):
    EVEN_K: tl.constexpr = HIDDEN % BK == 0
    pid = tl.program_id(0)
    num_tiles = tl.load(num_tiles_ptr)
    if pid < NUM_COMM:
        q = pid
        while q < num_tiles:
            if TRACE:
                tl.store(trace_ptr + 2 * q, now(clock_ptr, GLOBALTIMER))
            _pull_tile_rows(q, x_table, order_table, offsets_table, probs_table, inputs_ready_ptr,
                            seg_start_ptr, seg_count_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                            recv_ptr, recv_pair_ptr, recv_src_ptr, recv_prob_ptr,
                            rank, epoch, timeout, err_ptr,
                            TOPK, HIDDEN, WORLD, EL, BM, BH, KNOWN_ROWS, ROWS_16B, GLOBALTIMER)
            store_release(tile_ready_ptr + q, epoch)
            if TRACE:
                tl.store(trace_ptr + 2 * q + 1, now(clock_ptr, GLOBALTIMER))
            q += NUM_COMM
    else:
        n_blocks = tl.cdiv(FFN, BN)
        # Phase 1: tiles made only of this rank's own rows (ring position 0; they come first in the
        # processing order) are gathered in place from the local tokens region, without waiting for
        # the communication programs (which still copy them into the receive buffer for the weight
        # gradients). Phase 2: every other tile waits for its ready flag and reads the receive buffer.
        # Two loops rather than one loop with a branch-selected row pointer, which defeats Triton's
        # software pipelining of the K loop (measured 2x slower on an H100).
        # while loops: the bounds live in device memory (Triton's interpreter cannot range() over them)
        n_local = 0
        if IN_PLACE:
            n_local = tl.load(num_tiles_ptr + 1)
        w = pid - NUM_COMM
        while w < n_local * n_blocks:
            _local_item(w, n_local, n_blocks, tile_expert_ptr, tile_start_ptr, tile_end_ptr, recv_pair_ptr,
                        local_tokens_ptr, local_order_ptr, local_offsets_ptr, seg_start_ptr, rank,
                        w_ptr, stride_we, stride_wk, stride_wn, w_desc,
                        out_ptr, stride_out, pre_ptr, stride_pre, gp_part_ptr, hp_ptr, recv_prob_ptr,
                        trace_ptr, clock_ptr, max_tiles,
                        TOPK, HIDDEN, FFN, WORLD, EL, BM, BN, BK, GROUP_M, ACT, GATED, BACKWARD, STORE_PRE,
                        KNOWN_ROWS, DOT_PRECISION, TRACE, GLOBALTIMER, W_DESC, W_K_MAJOR, EVEN_K, FUSED_BWD,
                        STORE_HP, EPI_SPLIT, W_REV)
            w += NUM_COMPUTE
        w -= n_local * n_blocks
        while w < (num_tiles - n_local) * n_blocks:
            q, nb = _dispatch_item(w, num_tiles - n_local, n_blocks, GROUP_M)
            q += n_local
            j = tl.load(tile_expert_ptr + q)
            rs = tl.load(tile_start_ptr + q)
            rows = rs + tl.arange(0, BM)
            rmask = rows < tl.load(tile_end_ptr + q)
            wait_until_geq(tile_ready_ptr + q, epoch, timeout, err_ptr, ERR_DISPATCH_TILE, q, GLOBALTIMER)
            a_rows = recv_ptr + rows.to(tl.int64) * HIDDEN
            _compute_item(w + n_local * n_blocks, q, nb, a_rows, rows, rmask, j, rs, n_blocks,
                          w_ptr, stride_we, stride_wk, stride_wn, w_desc,
                          out_ptr, stride_out, pre_ptr, stride_pre, gp_part_ptr, hp_ptr, recv_prob_ptr,
                          trace_ptr, clock_ptr, max_tiles,
                          HIDDEN, FFN, BM, BN, BK, ACT, GATED, BACKWARD, STORE_PRE, DOT_PRECISION, TRACE,
                          GLOBALTIMER, W_DESC, W_K_MAJOR, EVEN_K, FUSED_BWD, STORE_HP, EPI_SPLIT, EL, W_REV)
            w += NUM_COMPUTE


@triton.jit
def _act_backward_kernel(dhp_ptr, stride_dhp, out_ptr, stride_out, pre_ptr, stride_pre, prob_ptr, gp_part_ptr,
                         hp_ptr, n_rows, n_col_blocks, FFN: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                         STORE_HP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Grid (cdiv(R, BR), cdiv(F, BC)). dhp = g @ w2^T [R, F] (from the GEMM; in place: dhp is out[:, :F]);
    writes d_pre = act'(pre) * dhp * p into out (both gated halves) and rowsum(dhp * h) partials, and
    with STORE_HP the prob-scaled activation h * p [R, F] (operand of dW2, recomputed from pre so that
    the forward need not keep h)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c0 = tl.program_id(1) * BC
    cols = c0 + tl.arange(0, BC)
    rmask = rows < n_rows
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out
    pre_rows = pre_ptr + rows.to(tl.int64)[:, None] * stride_pre
    hp_rows = hp_ptr + rows.to(tl.int64)[:, None] * FFN
    m = rmask[:, None] & (cols < FFN)[None, :]
    dhp = tl.load(dhp_ptr + rows.to(tl.int64)[:, None] * stride_dhp + cols[None, :], mask=m, other=0.0)
    dhp = dhp.to(tl.float32)
    p = tl.load(prob_ptr + rows, mask=rmask, other=0.0)
    gp = _act_backward_chunk(dhp, p, rmask, c0, out_rows, pre_rows, hp_rows, FFN, BC, ACT, GATED, STORE_HP)
    tl.store(gp_part_ptr + rows.to(tl.int64) * n_col_blocks + tl.program_id(1), gp, mask=rmask)


ACT_BACKWARD_BLOCK = 128  # columns per program of the separate activation backward


def activation_backward(out: torch.Tensor, pre: torch.Tensor, prob: torch.Tensor, *, ffn: int, activation: str,
                        gated: bool, grad_prob_parts: torch.Tensor | None = None,
                        hp: torch.Tensor | None = None, dhp: torch.Tensor | None = None) -> torch.Tensor:
    """The separate activation backward pass: from dhp = g @ w2^T [R, F] (default: in place, out[:, :F])
    writes d_pre = act'(pre) * dhp * p into out and, when given, h * p into hp [R, F]. Returns grad_prob's
    fp32 partials per column block [R, cdiv(F, 128)] (`.sum(1)`: grad_prob, in a fixed order). One elementwise
    pass: what the GEMM's fused epilogue (`fused_act_backward`) replaces; `bench kernels` times it after
    cuBLAS's GEMM as the unfused layer-0 backward."""
    n_rows = out.shape[0]
    blocks = triton.cdiv(ffn, ACT_BACKWARD_BLOCK)
    if grad_prob_parts is None:
        grad_prob_parts = torch.empty(n_rows, blocks, dtype=torch.float32, device=out.device)
    if n_rows:
        dhp = out if dhp is None else dhp
        launch(_act_backward_kernel, (triton.cdiv(n_rows, 32), blocks),
            dhp, dhp.stride(0), out, out.stride(0), pre, pre.stride(0), prob, grad_prob_parts,
            hp if hp is not None else out, n_rows,
            blocks, FFN=ffn, ACT=ACTIVATIONS[activation], GATED=gated, STORE_HP=hp is not None, BR=32,
            BC=ACT_BACKWARD_BLOCK, num_warps=4,
        )
    return grad_prob_parts


@dataclass
class DispatchResult:
    """Receive-side tensors of one dispatch_gemm round (R = layout.num_rows() rows, receive order)."""

    recv: torch.Tensor          # [R, H] pulled rows (x forward, grad_out backward): dW1 / dW2 operand
    recv_pair: torch.Tensor     # [R] int32 pair id t*K+k on the source rank
    recv_src: torch.Tensor      # [R] int32 source rank
    recv_prob: torch.Tensor     # [R] fp32 routing prob of the row
    out: torch.Tensor           # forward: h [R, F]; backward: d_pre [R, F1]
    pre: torch.Tensor | None    # forward with store_pre: pre-activation [R, F1]
    grad_prob: torch.Tensor | None  # backward: [R] fp32 rowsum(dhp * h)
    trace: torch.Tensor | None  # [max_tiles + max_tiles * n_blocks, 2] int64 (see docs/KERNELS.md)
    hp: torch.Tensor | None = None  # backward (separate activation pass): [R, F] h * p, operand of dW2


def _launch(view, layout: ReceiveLayout, w_kernel: torch.Tensor, epoch: int, *, ffn: int, backward: bool,
            activation: str, gated: bool, store_pre: bool, rows: DispatchResult | None, num_comm, num_compute,
            block_n: int, block_k: int, block_h: int, trace: bool, num_warps: int, num_stages: int,
            group_m: int, use_tma: bool | None = None,
            in_place_local: bool | None = None, fused_act_backward: bool = False,
            epilogue_n: int | None = None, reversed_experts: bool = False) -> DispatchResult:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not in {sorted(ACTIVATIONS)}")
    # the epilogue is split in the forward and in the fused activation backward (the plain backward stores dhp)
    knob = "bwd_epilogue_n" if backward else "fwd_epilogue_n"
    epi_split = epilogue_split(block_n, epilogue_n, "dispatch_gemm", knob) if not backward or fused_act_backward else 1
    ffn1 = 2 * ffn if gated else ffn
    num_comm, num_compute = dispatch_programs(view.device, view.world_size, ffn1, num_comm, num_compute)
    lay = view.layout
    hidden, dev = lay.hidden, view.device
    dtype = view.regions["tokens"].dtype
    n_rows = layout.num_rows()  # the round's host sync (see routing.py)
    alloc = max(n_rows, 1)  # Triton needs a real allocation even when nothing is received
    recv = torch.empty(alloc, hidden, dtype=dtype, device=dev)
    if rows is None:
        recv_pair = torch.empty(alloc, dtype=torch.int32, device=dev)
        recv_src = torch.empty(alloc, dtype=torch.int32, device=dev)
        recv_prob = torch.empty(alloc, dtype=torch.float32, device=dev)
        pre = torch.empty(alloc, ffn1, dtype=dtype, device=dev) if store_pre else None
    else:
        recv_pair, recv_src, recv_prob, pre = rows.recv_pair, rows.recv_src, rows.recv_prob, rows.pre
    out = torch.empty(alloc, ffn1 if backward else ffn, dtype=dtype, device=dev)
    n_blocks = triton.cdiv(ffn, block_n)
    fused_bwd = backward and fused_act_backward
    gp_cols = n_blocks if fused_bwd else triton.cdiv(ffn, ACT_BACKWARD_BLOCK)
    gp_part = torch.empty(alloc, gp_cols, dtype=torch.float32, device=dev) if backward else None
    # backward: h * p, dW2's operand, recomputed from pre (by the epilogue or the separate pass), so the
    # forward's h can go
    hp = torch.empty(alloc, ffn, dtype=dtype, device=dev) if backward else None
    trace_buf = (torch.full((layout.max_tiles * (1 + n_blocks), 2), -1, dtype=torch.int64, device=dev)
                 if trace else None)
    tile_ready = view.scratch("dispatch_tile_ready", layout.max_tiles)
    w_desc, k_major = weight_descriptor(w_kernel, block_k, block_n, force=use_tma)
    launch(_dispatch_gemm_kernel, (num_comm + num_compute,),
        view.tables["tokens"], view.tables["send_order"], view.tables["send_offsets"], view.tables["probs"],
        view.regions["inputs_ready"],
        layout.seg_start, layout.seg_count, layout.tile_expert, layout.tile_row_start, layout.tile_row_end,
        layout.num_tiles,
        recv, recv_pair, recv_src, recv_prob, tile_ready,
        view.regions["tokens"], view.regions["send_order"], view.regions["send_offsets"],
        w_kernel, w_kernel.stride(0), w_kernel.stride(1), w_kernel.stride(2),
        w_desc if w_desc is not None else w_kernel,
        out, out.stride(0), pre if pre is not None else out, pre.stride(0) if pre is not None else 0,
        gp_part if gp_part is not None else recv_prob, hp if hp is not None else out,
        view.rank, epoch, view.timeout, view.errors, trace_buf if trace else view.errors, view.clock,
        layout.max_tiles,
        TOPK=lay.topk, HIDDEN=hidden, FFN=ffn, WORLD=view.world_size, EL=lay.local_experts,
        NUM_COMM=num_comm, NUM_COMPUTE=num_compute,
        BM=layout.block_m, BN=block_n, BK=block_k, BH=block_h, GROUP_M=group_m,
        ACT=ACTIVATIONS[activation], GATED=gated, BACKWARD=backward, STORE_PRE=store_pre,
        KNOWN_ROWS=rows is not None, ROWS_16B=rows_16b_aligned(hidden, dtype), DOT_PRECISION=dot_precision(dtype),
        TRACE=trace,
        GLOBALTIMER=use_globaltimer(view.errors), W_DESC=w_desc is not None, W_K_MAJOR=k_major,
        IN_PLACE=True if in_place_local is None else in_place_local, FUSED_BWD=fused_bwd,
        STORE_HP=hp is not None, EPI_SPLIT=epi_split, W_REV=bool(reversed_experts),
        num_warps=num_warps, num_stages=num_stages,
    )
    if backward and not fused_bwd and n_rows > 0:
        activation_backward(out[:n_rows], pre[:n_rows], recv_prob[:n_rows], ffn=ffn, activation=activation,
                            gated=gated, grad_prob_parts=gp_part[:n_rows], hp=hp[:n_rows])
    r = slice(0, n_rows)
    return DispatchResult(
        recv=recv[r], recv_pair=recv_pair[r], recv_src=recv_src[r], recv_prob=recv_prob[r], out=out[r],
        pre=pre[r] if pre is not None else None,
        grad_prob=gp_part[r].sum(1) if gp_part is not None else None, trace=trace_buf,
        hp=hp[r] if hp is not None else None,
    )


def dispatch_gemm(view, layout: ReceiveLayout, w1: torch.Tensor, epoch: int, *, activation: str = "silu",
                  gated: bool = True, store_pre: bool = True, num_comm: int | None = None,
                  num_compute: int | None = None, block_n: int = 64, block_k: int = 32, block_h: int = 128,
                  trace: bool = False, num_warps: int = 4, num_stages: int = 3, group_m: int = 8,
                  use_tma: bool | None = None, in_place_local: bool | None = None,
                  epilogue_n: int | None = None, reversed_experts: bool = False) -> DispatchResult:
    """Forward layer 0 of round `epoch`: pull routed rows into receive order and compute h = act(x @ w1[e]).

    `epilogue_n`: the epilogue works on column sub-blocks of that width (block_n / 1, 2, 4 or 8; None: whole).

    w1: [El, H, F1] local experts' fc1 weights (F1 = 2F gated: [gate | up] halves; F1 = F plain); with
    `reversed_experts`, w1[i] is expert El-1-i's (a view over weights stored in descending expert order, as
    Megatron's distributed optimizer re-homes them: read in place, no copy).
    Requires `routing.publish` of the same epoch on every rank and `layout = receive_layout(view, epoch)`.
    """
    ffn = w1.shape[2] // 2 if gated else w1.shape[2]
    return _launch(view, layout, w1, epoch, ffn=ffn, backward=False, activation=activation, gated=gated,
                   store_pre=store_pre, rows=None, num_comm=num_comm, num_compute=num_compute,
                   block_n=block_n, block_k=block_k, block_h=block_h, trace=trace, num_warps=num_warps,
                   num_stages=num_stages, group_m=group_m, use_tma=use_tma,
                   in_place_local=in_place_local, epilogue_n=epilogue_n, reversed_experts=reversed_experts)


def dispatch_gemm_backward(view, layout: ReceiveLayout, forward: DispatchResult, w2: torch.Tensor, epoch: int,
                           *, activation: str = "silu", gated: bool = True, num_comm: int | None = None,
                           num_compute: int | None = None, block_n: int = 64, block_k: int = 32,
                           block_h: int = 128, trace: bool = False, num_warps: int = 4,
                           num_stages: int = 3, group_m: int = 8, use_tma: bool | None = None,
                           in_place_local: bool | None = None, fused_act_backward: bool = False,
                           epilogue_n: int = 64, reversed_experts: bool = False) -> DispatchResult:
    """Backward of layer 1 (= the same kernel): pull grad_out rows, dhp = g @ w2[e]^T, activation backward.

    The activation backward runs in the GEMM's epilogue with `fused_act_backward`, on column sub-blocks of
    `epilogue_n` (block_n must be 1, 2, 4 or 8 of them: whole 128-256-wide tiles, holding dhp, both
    pre-activation halves and their products at once, spilled 204 registers on an H100), else as a
    separate in-place pass over d_pre (`_act_backward_kernel`). Both write d_pre, grad_prob and h * p (dW2's
    operand, recomputed from pre).

    `forward` is the forward round's result (row sources, probs and pre-activation are reused);
    requires `routing.publish(view, grad_out, epoch)` on every rank. Returns out = d_pre [R, F1],
    grad_prob [R] and recv = the grad_out rows (operand of dW2). `reversed_experts`: w2[i] is expert El-1-i's
    (see `dispatch_gemm`).
    """
    if forward.pre is None:
        raise ValueError("backward needs the pre-activation: run the forward dispatch_gemm with store_pre=True")
    return _launch(view, layout, w2.transpose(1, 2), epoch, ffn=w2.shape[1], backward=True,
                   activation=activation, gated=gated, store_pre=False, rows=forward, num_comm=num_comm,
                   num_compute=num_compute, block_n=block_n, block_k=block_k, block_h=block_h, trace=trace,
                   num_warps=num_warps, num_stages=num_stages, group_m=group_m, use_tma=use_tma,
                   in_place_local=in_place_local, fused_act_backward=fused_act_backward, epilogue_n=epilogue_n,
                   reversed_experts=reversed_experts)
