"""Routing metadata on the device: send plans, the counts exchange, and the receive layout.

Send side (rank r, `send_plan`): the T*K (token, k) pairs are numbered `pair = t*K + k`; pairs are
stably sorted by global expert id into `order` ([T*K] int32, pair ids ascending within an expert),
`counts[e]` pairs go to expert e and `offsets[e]` ([E+1], exclusive cumsum) is where expert e's pairs
start in `order`. `publish` writes x, probs, order and offsets into the rank's symmetric regions and
runs one small kernel that pushes `counts[q*El:(q+1)*El]` into row r of every peer q's `recv_counts`,
then raises `inputs_ready[r]` (epoch) at every peer: after that signal a peer may pull anything r
published in this round.

Receive side (rank r, `receive_layout`): the receive buffer holds every pair routed to one of r's El
experts, sorted by local expert j, then by source rank in ring order from r (ring position i is source
(r + i) % W, so local rows come first), then by pair id. `seg_start[j, i]` / `seg_count[j, i]` locate
the segment (expert j, ring position i); `expert_offsets[j]` the rows of expert j. M-tiles of `block_m`
rows never straddle two experts. Tiles are listed in PROCESSING order: by the ring position of their
last row (tiles made only of local rows first, then in the order remote rows arrive), ties by row.

`receive_layout` is one single-program launch (`_layout_kernel`: wait for the counts, segment table,
expert offsets, tile tables in processing order, computed without a sort); `receive_layout_torch`
builds the same layout from torch ops and is the tests' reference.

Host synchronization: none in this module's kernels or torch ops (the tile table is padded to an upper
bound and the kernels read the live tile count from device memory). The one remaining host sync of a
round is `ReceiveLayout.num_rows()` (a `.item()` after the counts exchange), which the launchers call to
size the receive-side output tensors; at world size 1 the count is known on the host (`known_rows`: every
(token, slot) pair), so such a round has no host sync; a caller that sized them for capacity could drop it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .host_copy import AsyncHostCopy

from .launch import launch
from .signals import ERR_LAYOUT_INPUTS, signal_peers, use_globaltimer, wait_peers


@dataclass
class SendPlan:
    counts: torch.Tensor   # [E] int32: pairs sent to each global expert
    order: torch.Tensor    # [T*K] int32: pair ids sorted (stably) by expert
    offsets: torch.Tensor  # [E+1] int32: start of each expert's pairs in `order`


def send_plan(topk_idx: torch.Tensor, num_experts: int) -> SendPlan:
    """Per-expert counts, stable send order and offsets of one rank's routing (device ops, no sync)."""
    experts = topk_idx.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    order = torch.sort(experts, stable=True).indices.to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=experts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return SendPlan(counts, order, offsets)


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _publish_kernel(counts_ptr, recv_counts_table, ready_table, rank, epoch,
                    WORLD: tl.constexpr, EL: tl.constexpr, BLOCK_EL: tl.constexpr, PUSH_COUNTS: tl.constexpr):
    """Grid (1,). Pushes this rank's counts for each peer's experts into the peer's recv_counts[rank]
    (remote stores), then release-stores `epoch` into every peer's inputs_ready[rank]."""
    if PUSH_COUNTS:
        j = tl.arange(0, BLOCK_EL)
        for peer in tl.static_range(WORLD):
            c = tl.load(counts_ptr + peer * EL + j, mask=j < EL)
            dst = tl.load(recv_counts_table + peer).to(tl.pointer_type(tl.int32), bitcast=True)
            tl.store(dst + rank * EL + j, c, mask=j < EL)
    signal_peers(ready_table, rank, epoch, WORLD)


def publish(view, tokens: torch.Tensor, epoch: int, topk_idx: torch.Tensor | None = None,
            topk_probs: torch.Tensor | None = None) -> SendPlan | None:
    """Make this rank's inputs of round `epoch` pullable by the peers, then signal them.

    Forward: pass `topk_idx`/`topk_probs` (routing is published and counts are exchanged; returns the
    SendPlan). Backward: pass only `tokens` = grad_out; the receive layout and row sources saved from the
    forward round are reused, so nothing else is exchanged (returns None).
    """
    layout = view.layout
    num_tokens = tokens.shape[0]
    if num_tokens > layout.capacity_tokens:
        raise ValueError(f"{num_tokens} tokens exceed the workspace capacity {layout.capacity_tokens}")
    view.regions["tokens"][:num_tokens].copy_(tokens)
    plan = None
    if topk_idx is not None:
        plan = send_plan(topk_idx, layout.num_experts)
        n_pairs = plan.order.numel()
        view.regions["probs"][:n_pairs].copy_(topk_probs.reshape(-1))
        view.regions["send_order"][:n_pairs].copy_(plan.order)
        view.regions["send_offsets"].copy_(plan.offsets)
    el = layout.local_experts
    launch(_publish_kernel, (1,),
        # Without counts to push the pointer argument is never read; any int32 tensor will do.
        plan.counts if plan is not None else view.regions["send_offsets"],
        view.tables["recv_counts"], view.tables["inputs_ready"], view.rank, epoch,
        WORLD=view.world_size, EL=el, BLOCK_EL=triton.next_power_of_2(el), PUSH_COUNTS=plan is not None,
    )
    return plan


@dataclass
class ReceiveLayout:
    """Receive-buffer layout of one rank for one routing (all int32 device tensors; see module doc)."""

    block_m: int
    seg_start: torch.Tensor       # [El, W] first row of segment (local expert j, ring position i)
    seg_count: torch.Tensor       # [El, W] rows in that segment
    expert_offsets: torch.Tensor  # [El+1] rows of local expert j: [expert_offsets[j], expert_offsets[j+1])
    tile_expert: torch.Tensor     # [max_tiles] local expert of each tile, in processing order
    tile_row_start: torch.Tensor  # [max_tiles]
    tile_row_end: torch.Tensor    # [max_tiles] (exclusive)
    num_tiles: torch.Tensor       # [2] live tiles (entries beyond are padding), tiles of only local rows
    max_tiles: int                # host-known upper bound (sizes grids of per-tile flags)
    # [El+1 + 2*El*W]: tile_first [El+1] (first global tile of expert j), seg_end [El, W], pos_base [El, W]
    # (processing position of tile t of expert j whose last row comes from ring position i: pos_base + t);
    # lets a kernel find the tile of any receive row (`layout_kernel` only; None from the torch build)
    tile_index: torch.Tensor | None = None
    _offsets_host: list[int] | None = field(default=None, repr=False, compare=False)
    # the row count when the host knows it without asking the GPU (world size 1: every (token, slot) pair of
    # the rank is received by the rank, `known_rows`), so the round needs no host sync
    known_rows: int | None = None
    _host_copy: AsyncHostCopy | None = field(default=None, repr=False, compare=False)

    def num_rows(self) -> int:
        """Total receive rows. THE host sync of a round (see module doc) unless `known_rows` is set: read once
        per layout, so the backward round (same layout) and later launches of the round do not synchronise
        again."""
        if self.known_rows is not None:
            return self.known_rows
        return self.expert_offsets_host()[-1]

    def expert_offsets_host(self) -> list[int]:
        """`expert_offsets` on the host, read by the same single sync as `num_rows` (or, where the row count
        was known, from the copy `start_host_copy` queued: waits for that copy only)."""
        if self._offsets_host is None:
            copy = self._host_copy
            self._offsets_host = copy.tolist() if copy is not None else self.expert_offsets.tolist()
        return self._offsets_host

    def start_host_copy(self) -> None:
        """Queue the copy of `expert_offsets` to the host now (right after the layout kernel), so that a later
        `expert_offsets_host()` does not drain the GPU (see `host_copy.AsyncHostCopy`)."""
        self._host_copy = AsyncHostCopy(self.expert_offsets)


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _wait_inputs_kernel(ready_ptr, epoch, timeout, err_ptr, WORLD: tl.constexpr, GLOBALTIMER: tl.constexpr):
    """Grid (1,). Waits until every rank's inputs_ready[s] >= epoch (their counts rows have landed)."""
    wait_peers(ready_ptr, epoch, timeout, err_ptr, ERR_LAYOUT_INPUTS, WORLD, GLOBALTIMER)


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _layout_kernel(recv_counts_ptr, ready_ptr, seg_start_ptr, seg_count_ptr, expert_offsets_ptr,
                   tile_expert_ptr, tile_start_ptr, tile_end_ptr, num_tiles_ptr,
                   tile_first_ptr, seg_end_ptr, pos_base_ptr,
                   rank, epoch, timeout, err_ptr, max_tiles,
                   WORLD: tl.constexpr, EL: tl.constexpr, WP: tl.constexpr, ELP: tl.constexpr, BM: tl.constexpr,
                   BLOCK_T: tl.constexpr, SEARCH_STEPS: tl.constexpr, GLOBALTIMER: tl.constexpr):
    """Grid (1,). The whole receive layout in one launch (see the module doc for what it holds).

    Tile order without a sort: within an expert the tiles' last-row sources are non-decreasing, so
    with C[j, i] = tiles of expert j whose last row lies before the end of segment (j, i), the tiles
    of expert j whose last row comes from ring position i are t in [C[j, i-1], C[j, i]), and their
    place in processing order is  sum_j' C[j', i-1] + sum_{j' < j} (C[j', i] - C[j', i-1]) + t - C[j, i-1].
    """
    wait_peers(ready_ptr, epoch, timeout, err_ptr, ERR_LAYOUT_INPUTS, WORLD, GLOBALTIMER)
    j = tl.arange(0, ELP)[:, None]
    i = tl.arange(0, WP)[None, :]
    live = (j < EL) & (i < WORLD)
    src = (rank + i) % WORLD
    cnt = tl.load(recv_counts_ptr + src * EL + j, mask=live, other=0)  # [ELP, WP]: (expert, ring position)
    flat = tl.reshape(cnt, [ELP * WP])
    start = tl.reshape(tl.cumsum(flat, 0) - flat, [ELP, WP])  # padding entries are 0: sums unaffected
    tl.store(seg_start_ptr + j * WORLD + i, start, mask=live)
    tl.store(seg_count_ptr + j * WORLD + i, cnt, mask=live)
    rows_e = tl.sum(cnt, 1)  # [ELP]
    end_e = tl.cumsum(rows_e, 0)
    off_e = end_e - rows_e
    e1 = tl.arange(0, ELP)
    tl.store(expert_offsets_ptr + e1, off_e, mask=e1 < EL)
    tl.store(expert_offsets_ptr + EL, tl.sum(rows_e, 0))
    tiles_e = (rows_e + BM - 1) // BM
    first_e = tl.cumsum(tiles_e, 0) - tiles_e
    total = tl.sum(tiles_e, 0)
    tl.store(tile_first_ptr + e1, first_e, mask=e1 < EL)
    tl.store(tile_first_ptr + EL, total)
    off, end, n_t = off_e[:, None], end_e[:, None], tiles_e[:, None]
    seg_end = start + cnt
    c_le = tl.where(seg_end >= end, n_t, (seg_end - off) // BM)    # tiles ending before seg_end
    c_lt = tl.where(start >= end, n_t, (start - off) // BM)        # tiles ending before the segment
    here = c_le - c_lt                                               # tiles whose last row is in (j, i)
    pos_base = tl.sum(c_lt, 0)[None, :] + (tl.cumsum(here, 0) - here) - c_lt
    tl.store(seg_end_ptr + j * WORLD + i, seg_end, mask=live)
    tl.store(pos_base_ptr + j * WORLD + i, pos_base, mask=live)
    tl.store(num_tiles_ptr, total)
    # tiles whose last row comes from ring position 0: made only of this rank's own rows
    tl.store(num_tiles_ptr + 1, tl.sum(tl.sum(tl.where(i == 0, c_le, 0), 1), 0))
    tl.debug_barrier()  # the per-tile pass below reads the tables just stored by other threads
    q0 = 0
    while q0 < total:  # only live tiles are placed (entries past num_tiles stay unspecified)
        q = q0 + tl.arange(0, BLOCK_T)
        valid = q < total
        # expert of global tile q: the last e < EL with tile_first[e] <= q (binary search; empty experts
        # share their tile_first with the next expert, so the search lands on the non-empty one)
        lo = tl.zeros([BLOCK_T], dtype=tl.int32)
        hi = tl.zeros([BLOCK_T], dtype=tl.int32) + (EL - 1)
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi + 1) // 2
            ok = tl.load(tile_first_ptr + mid, mask=valid, other=0) <= q
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        ex = tl.minimum(lo, EL - 1)
        t = q - tl.load(tile_first_ptr + ex, mask=valid, other=0)
        row_start = tl.load(expert_offsets_ptr + ex, mask=valid, other=0) + t * BM
        row_end = tl.minimum(row_start + BM, tl.load(expert_offsets_ptr + ex + 1, mask=valid, other=0))
        last_src = tl.zeros([BLOCK_T], dtype=tl.int32)
        for r in tl.static_range(WORLD):
            last_src += (tl.load(seg_end_ptr + ex * WORLD + r, mask=valid, other=0) <= row_end - 1).to(tl.int32)
        last_src = tl.minimum(last_src, WORLD - 1)
        pos = tl.load(pos_base_ptr + ex * WORLD + last_src, mask=valid, other=0) + t
        tl.store(tile_expert_ptr + pos, ex, mask=valid)
        tl.store(tile_start_ptr + pos, row_start, mask=valid)
        tl.store(tile_end_ptr + pos, row_end, mask=valid)
        q0 += BLOCK_T


def _max_tiles(view, block_m: int) -> int:
    lay = view.layout
    return triton.cdiv(view.world_size * lay.capacity_tokens * lay.topk, block_m) + lay.local_experts


def receive_layout(view, epoch: int, block_m: int) -> ReceiveLayout:
    """Wait for every peer's counts of round `epoch`, then build the receive layout on the device (one
    launch, no host sync). Entries of the tile tables past `num_tiles` are unspecified."""
    lay = view.layout
    w, el = view.world_size, lay.local_experts
    dev = view.device
    max_tiles = _max_tiles(view, block_m)
    i32 = torch.int32
    seg_start = torch.empty(el, w, dtype=i32, device=dev)
    seg_count = torch.empty(el, w, dtype=i32, device=dev)
    expert_offsets = torch.empty(el + 1, dtype=i32, device=dev)
    tiles = torch.empty(3, max_tiles, dtype=i32, device=dev)
    num_tiles = torch.empty(2, dtype=i32, device=dev)
    scratch = torch.empty(el + 1 + 2 * el * w, dtype=i32, device=dev)
    launch(_layout_kernel, (1,),
        view.regions["recv_counts"], view.regions["inputs_ready"], seg_start, seg_count, expert_offsets,
        tiles[0], tiles[1], tiles[2], num_tiles,
        scratch, scratch[el + 1:], scratch[el + 1 + el * w:],
        view.rank, epoch, view.timeout, view.errors, max_tiles,
        WORLD=w, EL=el, WP=triton.next_power_of_2(w), ELP=triton.next_power_of_2(el), BM=block_m,
        BLOCK_T=256, SEARCH_STEPS=el.bit_length(), GLOBALTIMER=use_globaltimer(view.errors), num_warps=4,
    )
    return ReceiveLayout(
        block_m=block_m, seg_start=seg_start, seg_count=seg_count, expert_offsets=expert_offsets,
        tile_expert=tiles[0], tile_row_start=tiles[1], tile_row_end=tiles[2], num_tiles=num_tiles,
        max_tiles=max_tiles, tile_index=scratch,
    )


def receive_layout_torch(view, epoch: int, block_m: int) -> ReceiveLayout:
    """The same layout from torch ops (about 30 launches): the independent reference of the tests."""
    launch(_wait_inputs_kernel, (1,),
        view.regions["inputs_ready"], epoch, view.timeout, view.errors,
        WORLD=view.world_size, GLOBALTIMER=use_globaltimer(view.errors),
    )
    lay = view.layout
    w, el, r = view.world_size, lay.local_experts, view.rank
    dev = view.device
    ring = (r + torch.arange(w, device=dev)) % w
    seg_count = view.regions["recv_counts"].to(torch.int64)[ring].t().contiguous()  # [El, W]
    flat = seg_count.reshape(-1)
    seg_start = (torch.cumsum(flat, 0) - flat).view(el, w)
    rows_per_expert = seg_count.sum(1)
    expert_offsets = torch.zeros(el + 1, dtype=torch.int64, device=dev)
    expert_offsets[1:] = torch.cumsum(rows_per_expert, 0)

    max_tiles = _max_tiles(view, block_m)
    tiles_per_expert = (rows_per_expert + block_m - 1) // block_m
    tile_cum = torch.cumsum(tiles_per_expert, 0)
    q = torch.arange(max_tiles, device=dev)
    expert = torch.searchsorted(tile_cum, q, right=True).clamp(max=el - 1)
    valid = q < tile_cum[-1]
    local_tile = q - (tile_cum[expert] - tiles_per_expert[expert])
    row_start = expert_offsets[expert] + local_tile * block_m
    row_end = torch.minimum(row_start + block_m, expert_offsets[expert + 1])
    # Ring position of a tile's last row: the tile can start once that source's rows have arrived.
    seg_end = (seg_start + seg_count)[expert]
    last_source = torch.searchsorted(seg_end, (row_end - 1).clamp(min=0)[:, None], right=True)[:, 0]
    key = torch.where(valid, last_source * max_tiles + q, w * max_tiles + q)
    order = torch.argsort(key)
    i32 = torch.int32
    return ReceiveLayout(
        block_m=block_m,
        seg_start=seg_start.to(i32), seg_count=seg_count.to(i32), expert_offsets=expert_offsets.to(i32),
        tile_expert=expert[order].to(i32), tile_row_start=row_start[order].to(i32),
        tile_row_end=row_end[order].to(i32), max_tiles=max_tiles,
        num_tiles=torch.stack([tile_cum[-1], (valid & (last_source == 0)).sum()]).to(i32),
    )
