"""Expert weight gradients as grouped GEMMs over receive rows: dW[e] = a[rows_e]^T @ b[rows_e].

They have no consumer on the critical path of the backward pass, so they are a separate call that a
caller may defer (Megatron's `backward_dw` / `--delay-wgrad-compute`) to overlap other communication.

Backends: "triton" (`grouped_wgrad_accumulate` writing into the output: one program per output tile and
expert, K loop over the expert's rows, no waits), "grouped_mm" (CUDA `torch._grouped_mm` with offsets,
bf16), "gluon" (`gluon_wgrad.grouped_wgrad_ws` writing: the warp-specialised Hopper kernel), "loop" (a torch loop
over experts; the CPU fallback). "auto" = gluon where it writes through TMA stores (`gluon_fresh_ok`), else
grouped_mm on Hopper in bf16, else triton.

`grouped_wgrad_accumulate`: the same products ADDED into fp32 buffers (Megatron's `main_grad`s, separate
slices of one storage, in any order) in one launch for all experts: each program starts its accumulator from
its tile of `main_grad` and writes it back once, so no bf16 gradient is written and read back (as the grouped
GEMM + add does). With few rows per expert the kernel is bound by that read + write of fp32 `main_grad`;
small tiles keep several programs per SM in flight to overlap them. Row offsets come from device memory: no
host synchronisation. `overwrite=True` writes the products instead of adding them (no read of `main_grad`:
half the traffic) for the first micro-batch of a step, whose `main_grad`s Megatron's DDP has just zeroed.

On Hopper the tiles can leave through TMA where the outputs allow it (`out_rows` from `tma_output_rows`:
Megatron's DDP buffer holds an expert weight's main_grads back to back): a bulk reduce-add, done by L2 next to
memory, so the program never reads the old tile into registers (a bulk store when writing). Alone, on an
H100, it ran 0.84-1.16x the register epilogue's speed when adding, 0.95-1.50x when writing; inside the MoE
layer it did not pay (comet_megatron.experts.wgrad_tma_out: opt-in).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .config import dot_precision
from .launch import launch
from .operands import use_tma


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor, *, backend: str = "auto",
                  out_dtype: torch.dtype | None = None, _checked: bool = False, **tiles) -> torch.Tensor:
    """C[e] = a[off[e]:off[e+1]]^T @ b[off[e]:off[e+1]] for every local expert e.

    a: [R, M], b: [R, N] (row-major rows in receive order); expert_offsets: [El+1] int32 device tensor
    (`ReceiveLayout.expert_offsets`). Returns [El, M, N] in `out_dtype` (default a.dtype); experts
    without rows get zeros. The "triton" backend is `grouped_wgrad_accumulate` writing (not adding) into the
    fresh output with `grouped_wgrad_tiles`, its tiles stored through TMA on Hopper; `tiles` (block_m, block_n,
    block_k, group_m, num_warps, num_stages, tma_out) override them. The "gluon" backend (Hopper, 16-bit operands)
    is the warp-specialised kernel of `gluon_wgrad` writing the output (`tiles` are then `wgrad_ws_plan`'s knobs).
    """
    if backend != "gluon":  # the Gluon kernel's knobs are `wgrad_ws_plan`'s, checked there
        unknown = set(tiles) - {"block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages", "tma_out"}
        if unknown:
            raise TypeError(f"grouped_wgrad: unknown tile knobs {sorted(unknown)}")
    num_experts = expert_offsets.numel() - 1
    (rows, m_dim), n_dim = a.shape, b.shape[1]
    out_dtype = out_dtype or a.dtype
    if backend == "auto":
        # the Gluon kernel where it writes through TMA stores (Hopper); else cuBLAS's grouped GEMM (K split by
        # expert) on Hopper in bf16; the Triton kernel elsewhere
        if gluon_fresh_ok(a, b, out_dtype):
            backend, _checked = "gluon", True
        elif (a.is_cuda and a.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
              and torch.cuda.get_device_capability(a.device)[0] >= 9):
            backend = "grouped_mm"
        else:
            backend = "triton"
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
    if backend not in ("triton", "gluon"):
        raise ValueError(f"unknown backend {backend!r}: auto, grouped_mm, triton, gluon or loop")
    out = torch.empty(num_experts, m_dim, n_dim, dtype=out_dtype, device=a.device)
    # each expert's output: element offset e * M * N, first row e * M of the [El * M, N] view (cached: constant)
    offsets, first_rows = _fresh_output_index(num_experts, m_dim, n_dim, a.device)
    # every output 16-byte aligned with 16-byte rows (`outputs_aligned` for these offsets, without the loop)
    aligned = out.data_ptr() % 16 == 0 and (n_dim * out.element_size()) % 16 == 0
    if backend == "gluon":
        from .gluon_wgrad import gluon_wgrad_supported, grouped_wgrad_ws

        # (`_checked`: the caller asked gluon_fresh_ok, which asks the same with the default tiles)
        why = None if _checked and not tiles else gluon_wgrad_supported(a, b, tiles.get("block_n", 256),
                                                                          tiles.get("block_m", 64))
        if why is not None:
            raise ValueError(f"grouped_wgrad: backend='gluon' cannot run here ({why}); use backend='auto'")
        if num_experts:
            # the outputs as [El * M, N] rows: 16-bit parts leave through TMA stores (where M allows); wide outputs
            # sweep more row blocks per column block (see GLUON_FRESH_GROUP_M)
            group_m = GLUON_FRESH_GROUP_M["wide" if m_dim < n_dim else "tall"]
            grouped_wgrad_ws(a, b, expert_offsets, out.view(-1), offsets, overwrite=True, checked=True,
                             **{"aligned": aligned, "out_rows": (out.view(-1, n_dim), first_rows),
                                "group_m": group_m, **tiles})
        return out
    # the fresh output seen as [El * M, N] rows, expert e's from row e * M, for the TMA store epilogue (TMA's
    # rule: 16-byte rows)
    out_rows = None
    if use_tma(a) and num_experts and m_dim and (n_dim * out.element_size()) % 16 == 0:
        out_rows = (out.view(-1, n_dim), first_rows)
    knobs = {**grouped_wgrad_tiles(a, num_experts, m_dim, out_rows is not None), **tiles}
    grouped_wgrad_accumulate(a, b, expert_offsets, out.view(-1), offsets, overwrite=True, out_rows=out_rows,
                             aligned=aligned, **knobs)
    return out


# The Gluon backend's tile order: GROUP_M row blocks of 128 sweep the column blocks together. Outputs wider than
# tall (M < N: dW1 as [H, 2F], fc2's [H, F]) take larger groups: H100, Mixtral / Phi-3.5-MoE dW1 as [H, 2F] at
# 2048 / 8192 tokens, 0.93-1.07x of cuBLAS with 8, 0.94-1.11x with 16, 0.99-1.14x with 32 (one call, 3 rounds;
# docs/BENCHMARKS.md sixteenth session); tall outputs keep 8 (1.07-1.15x).
GLUON_FRESH_GROUP_M = {"wide": 32, "tall": 8}


def gluon_fresh_ok(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether `grouped_wgrad`'s "gluon" backend writes these gradients (a [R, M], b [R, N]) the way it was
    measured ahead of cuBLAS's grouped GEMM: Hopper, 16-bit operands TMA can load, a 16-bit output leaving through
    TMA stores (M a multiple of 64). H100, the three model shapes at 2048-16384 tokens: 0.98-1.37x of
    `torch._grouped_mm` (docs/BENCHMARKS.md, sixteenth session).
    COMET_KERNELS_GLUON=0 turns it off."""
    if out_dtype not in (torch.bfloat16, torch.float16) or a.dim() != 2 or a.shape[1] % 64 or not a.is_cuda:
        return False
    from .gluon_wgrad import gluon_wgrad_supported

    return gluon_wgrad_supported(a, b) is None


_FRESH_INDEX: dict = {}


def _fresh_output_index(experts: int, m_dim: int, n_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 element offsets e * M * N, int32 first rows e * M) of `experts` back-to-back [M, N] outputs, on
    `device`; cached (the kernels only read them): two small launches fewer per call."""
    key = (experts, m_dim, n_dim, str(device))
    hit = _FRESH_INDEX.get(key)
    if hit is None:
        if len(_FRESH_INDEX) >= 256:
            _FRESH_INDEX.clear()
        e = torch.arange(experts, dtype=torch.int64)
        hit = _FRESH_INDEX[key] = ((e * (m_dim * n_dim)).to(device), (e * m_dim).to(torch.int32).to(device))
    return hit


@triton.jit
def _wgrad_accumulate_kernel(a_ptr, stride_a, b_ptr, stride_b, c_ptr, c_offsets_ptr, row_offsets_ptr, m_dim, n_dim,
                             a_desc, b_desc, c_desc, c_rows_ptr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                             USE_DESC: tl.constexpr, PREFETCH_C: tl.constexpr, NUM_STAGES: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, OVERWRITE: tl.constexpr, C_DESC: tl.constexpr,
                             ALIGNED: tl.constexpr = False):
    """C_j[m, n] += sum over rows r of expert j of a[r, m] * b[r, n] (OVERWRITE: C_j = the sum, C never read);
    C_j at c_ptr + c_offsets[j], [M, N] row-major, fp32 (any float type with OVERWRITE). Grid (tiles of [M, N],
    experts).

    C_DESC: C leaves through the TMA descriptor `c_desc` over the outputs' storage as [rows, N] rows (expert j's
    first row: c_rows[j]): an asynchronous bulk reduce-add (the addition happens in L2, the program never
    reads the old tile and goes on at once) or, with OVERWRITE, a bulk store. M must be a multiple of BM."""
    j = tl.program_id(1)
    # grouped tile order: GROUP_M row blocks sweep the column blocks together (L2 reuse of b's columns)
    tiles_m = tl.cdiv(m_dim, BM)
    tiles_n = tl.cdiv(n_dim, BN)
    pid = tl.program_id(0)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    tm = first_m + (pid % per_group) % size_m
    tn = (pid % per_group) // size_m
    mcols = tm * BM + tl.arange(0, BM)
    ncols = tn * BN + tl.arange(0, BN)
    mmask = mcols < m_dim
    nmask = ncols < n_dim
    c_offset = tl.load(c_offsets_ptr + j)
    if ALIGNED:  # every output starts on a 16-byte boundary (the caller knows): 16-byte accesses
        c_offset = tl.multiple_of(c_offset, 128 // c_ptr.dtype.element_ty.primitive_bitwidth)
    c_ptrs = (c_ptr + c_offset + mcols[:, None].to(tl.int64) * n_dim + ncols[None, :])
    cmask = mmask[:, None] & nmask[None, :]
    start = tl.load(row_offsets_ptr + j)
    end = tl.load(row_offsets_ptr + j + 1)
    if OVERWRITE or C_DESC:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    elif PREFETCH_C:  # issued now, consumed after the K loop: the read overlaps the loop
        c_old = tl.load(c_ptrs, mask=cmask, other=0.0)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    else:
        acc = tl.load(c_ptrs, mask=cmask, other=0.0)
    n_full = (end - start) // BK
    for i in tl.range(0, n_full, num_stages=NUM_STAGES):
        r0 = start + i * BK
        if USE_DESC:
            a_t = tl.trans(a_desc.load([r0, tm * BM]))
            b_blk = b_desc.load([r0, tn * BN])
        else:  # a^T loaded as [BM, BK] directly
            rows = (r0 + tl.arange(0, BK)).to(tl.int64)
            a_t = tl.load(a_ptr + rows[None, :] * stride_a + mcols[:, None], mask=mmask[:, None], other=0.0)
            b_blk = tl.load(b_ptr + rows[:, None] * stride_b + ncols[None, :], mask=nmask[None, :], other=0.0)
        acc = tl.dot(a_t, b_blk, acc, input_precision=DOT_PRECISION)
    r0 = start + n_full * BK
    if r0 < end:  # the expert's last, partial block of rows (the next rows belong to another expert)
        rows = r0 + tl.arange(0, BK)
        rmask = rows < end
        rows = rows.to(tl.int64)
        # pointer loads: TMA loads of the whole block with the other expert's rows zeroed in registers ran
        # 1.1-1.2x slower (H100, examples/bench_wgrad.py --rows routed, docs/BENCHMARKS.md twelfth session)
        a_t = tl.load(a_ptr + rows[None, :] * stride_a + mcols[:, None], mask=mmask[:, None] & rmask[None, :],
                      other=0.0)
        b_blk = tl.load(b_ptr + rows[:, None] * stride_b + ncols[None, :], mask=rmask[:, None] & nmask[None, :],
                        other=0.0)
        acc = tl.dot(a_t, b_blk, acc, input_precision=DOT_PRECISION)
    if C_DESC:
        c_row = tl.load(c_rows_ptr + j) + tm * BM
        if OVERWRITE:
            c_desc.store([c_row, tn * BN], acc.to(c_ptr.dtype.element_ty))
        else:
            c_desc.atomic_add([c_row, tn * BN], acc)
    else:
        if PREFETCH_C and not OVERWRITE:
            acc += c_old
        tl.store(c_ptrs, acc, mask=cmask)


# GPU tiles: on an H100 (examples/bench_wgrad.py, docs/BENCHMARKS.md) 64 x 128 with 4 warps ran 1.2-1.3x faster
# than 128 x 128 with 8 (more programs per SM in flight on a kernel bound by its main_grad traffic), and
# loading the old main_grad tile before the K loop (prefetch_c) 1.15-1.2x slower than loading it into the
# accumulator (registers). The TMA epilogue (twelfth session): 0.84-1.16x the register one's speed at these tiles
# when adding, 0.95-1.50x when writing, alone; a persistent variant (tiles looped per program, the bulk reduce
# drained behind the next tile's K loop) ran 0.79-0.99x wherever this kernel is the route's pick (up to 512 rows
# per expert) and 1.13-1.43x only from 1024 rows, where cuBLAS per expert stays ahead of it: dropped.
WGRAD_ACCUMULATE_TILES = dict(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3,
                              prefetch_c=False)
INTERPRETER_TILES = dict(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1, prefetch_c=False)


# `grouped_wgrad` (written into a fresh output, any float type: no main_grad traffic, so larger tiles than the
# accumulate kernel's and the TMA store epilogue pay). H100, bf16 output, rows as a random top-k routing splits
# them, against torch._grouped_mm (a probe's sweeps of 7-10 tile sets, docs/BENCHMARKS.md thirteenth session):
# 128 x 128 x 64 / 8 warps / TMA store 0.71-0.99x, 128 x 256 x 32 / 8 warps / 5 stages / TMA store 0.74-1.07x
# (ahead from 512 rows per expert), the accumulate kernel's 64 x 128 register-store tiles 0.50-0.71x.
GROUPED_WGRAD_TILES = dict(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3,
                           prefetch_c=False)
GROUPED_WGRAD_TILES_LONG = dict(block_m=128, block_n=256, block_k=32, group_m=8, num_warps=8, num_stages=5,
                                prefetch_c=False)
GROUPED_WGRAD_LONG_ROWS = 512  # mean rows per expert from which the wide tiles are used


def grouped_wgrad_tiles(a: torch.Tensor, experts: int, m_dim: int, tma_store: bool) -> dict:
    """`grouped_wgrad`'s Triton tiles for operands like `a` split over `experts` experts (by their mean rows)
    into [M, N] outputs; `tma_store`: the outputs can take the TMA store epilogue. The large tiles need it (with
    the register store 128-row tiles ran 0.13-0.78x of cuBLAS) and an M they divide (a tile must not cross into
    the next expert's output); otherwise the accumulate kernel's tiles, and the interpreter's small ones off the
    GPU."""
    if not a.is_cuda:
        return dict(INTERPRETER_TILES)
    long = a.shape[0] >= GROUPED_WGRAD_LONG_ROWS * max(experts, 1)
    tiles = GROUPED_WGRAD_TILES_LONG if long else GROUPED_WGRAD_TILES
    if not tma_store or m_dim % tiles["block_m"]:
        tiles = WGRAD_ACCUMULATE_TILES
    return dict(tiles)


def wgrad_accumulate_tiles(a: torch.Tensor) -> dict:
    """`grouped_wgrad_accumulate`'s knobs for operands like `a`: the GPU tiles, small ones in the interpreter."""
    return dict(WGRAD_ACCUMULATE_TILES if a.is_cuda else INTERPRETER_TILES)


def grouped_wgrad_accumulate(a: torch.Tensor, b: torch.Tensor, row_offsets: torch.Tensor, out_base: torch.Tensor,
                             out_offsets: torch.Tensor, *, block_m: int = 64, block_n: int = 64,
                             block_k: int = 32, group_m: int = 8, num_warps: int = 4, num_stages: int = 2,
                             prefetch_c: bool = True, use_tma_loads: bool | None = None,
                             overwrite: bool = False, out_rows: tuple | None = None, tma_out: bool = True,
                             aligned: bool = False) -> None:
    """out_e += a[rows_e]^T @ b[rows_e] for every expert e, accumulated in fp32; with `overwrite`,
    out_e = a[rows_e]^T @ b[rows_e] (the outputs are written, never read: an expert without rows gets zeros).

    a: [R, M], b: [R, N] (rows in expert order, unit column stride); row_offsets: [El + 1] int32/int64 device
    tensor (rows_e = row_offsets[e]:row_offsets[e + 1]); out_base: flat fp32 tensor over the outputs' storage
    (with `overwrite`, any float type: the fp32 sums are rounded to it, as `grouped_wgrad` uses it),
    out_offsets: [El] int64 element offsets of each expert's contiguous [M, N] output in it
    (`kernels.accumulate.flat_base` / `element_offsets`). No host synchronisation.

    out_rows: `tma_output_rows(...)` for these outputs, or None. Given, on Hopper (compiled, TMA loads) and with
    M a multiple of block_m, the tiles leave through TMA (`C_DESC`: reduce-add in L2, or store) unless
    `tma_out=False`; otherwise through the program's registers (read, add, write back).
    aligned: `outputs_aligned(...)` is true for these outputs (lets the registers' accesses be 16 bytes wide;
    a promise the kernel cannot check without a host copy of the offsets).
    """
    (rows, m_dim), n_dim = a.shape, b.shape[1]
    experts = out_offsets.numel()
    if b.shape[0] != rows or row_offsets.numel() != experts + 1:
        raise ValueError(f"grouped_wgrad_accumulate: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"{row_offsets.numel()} row offsets for {experts} experts")
    if (out_base.dtype != torch.float32 and not overwrite) or not out_base.dtype.is_floating_point \
            or out_offsets.dtype != torch.int64:
        raise ValueError("grouped_wgrad_accumulate: fp32 outputs (any float type when writing), int64 element "
                         "offsets")
    if experts == 0 or m_dim == 0 or n_dim == 0:
        return
    if rows == 0:  # Triton needs real operands; every product is zero
        if overwrite:
            for off in out_offsets.tolist():
                out_base[off:off + m_dim * n_dim].zero_()
        return
    if a.stride(1) != 1:
        a = a.contiguous()
    if b.stride(1) != 1:
        b = b.contiguous()
    desc = use_tma(a) if use_tma_loads is None else use_tma_loads
    a_desc = b_desc = None
    if desc:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [block_k, block_m])
        b_desc = TensorDescriptor(b, list(b.shape), list(b.stride()), [block_k, block_n])
    c_desc, c_rows = out_base, out_offsets  # placeholders when C_DESC is off
    # the reduce-add needs the compiled kernel (Triton's interpreter has no descriptor atomics)
    reduce_ok = a.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    c_tma = bool(tma_out and out_rows is not None and desc and m_dim % block_m == 0 and (overwrite or reduce_ok))
    if c_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        view, c_rows = out_rows
        if view.shape[1] != n_dim or c_rows.numel() != experts:
            raise ValueError(f"grouped_wgrad_accumulate: out_rows for {c_rows.numel()} experts of {view.shape[1]} "
                             f"columns, the outputs are {experts} x [{m_dim}, {n_dim}]")
        c_desc = TensorDescriptor(view, list(view.shape), list(view.stride()), [block_m, block_n])
    grid = (triton.cdiv(m_dim, block_m) * triton.cdiv(n_dim, block_n), experts)
    launch(_wgrad_accumulate_kernel, grid, a, a.stride(0), b, b.stride(0), out_base, out_offsets, row_offsets,
           m_dim, n_dim, a_desc if desc else a, b_desc if desc else b, c_desc, c_rows,
           BM=block_m, BN=block_n, BK=block_k, GROUP_M=group_m, USE_DESC=desc, PREFETCH_C=prefetch_c,
           NUM_STAGES=num_stages, DOT_PRECISION=dot_precision(a.dtype), OVERWRITE=bool(overwrite), C_DESC=c_tma,
           ALIGNED=bool(aligned), num_warps=num_warps, num_stages=num_stages)


def outputs_aligned(out_base: torch.Tensor, offsets, n_dim: int) -> bool:
    """Whether every output at these element offsets (host ints) of `out_base`, with rows of `n_dim`, starts on a
    16-byte boundary with 16-byte rows: then the weight-gradient kernels' `aligned` may be set."""
    size = out_base.element_size()
    return (n_dim * size) % 16 == 0 and all((out_base.data_ptr() + int(o) * size) % 16 == 0 for o in offsets)


def tma_output_rows(out_base: torch.Tensor, offsets, m_dim: int, n_dim: int) -> tuple | None:
    """The outputs of `grouped_wgrad_accumulate` (element offsets `offsets`, host ints, in the flat fp32
    `out_base`, each a contiguous [M, N]) as rows of one 2-D [rows, N] view that starts at the lowest of
    them: (view, int32 tensor of each output's first row, on out_base's device), for the TMA epilogue. None
    when some output does not start a whole number of rows from the lowest, or the rows are not 16-byte
    aligned (TMA's rule). Megatron's DDP buffers hold the experts' main_grads back to back (in reverse order)."""
    offsets = [int(o) for o in offsets]
    if not offsets or m_dim <= 0 or n_dim <= 0:
        return None
    lo, hi = min(offsets), max(offsets)
    size = out_base.element_size()
    if (n_dim * size) % 16 or any((o - lo) % n_dim for o in offsets) or hi + m_dim * n_dim > out_base.numel():
        return None
    view = out_base[lo:hi + m_dim * n_dim].view(-1, n_dim)
    if view.data_ptr() % 16:
        return None
    rows = torch.tensor([(o - lo) // n_dim for o in offsets], dtype=torch.int32, device=out_base.device)
    return view, rows
