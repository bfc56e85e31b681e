"""Workspace layout contract, routing send plans and the grouped weight-gradient kernel."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels import WorkspaceLayout, grouped_wgrad, send_plan
from comet_megatron.kernels.workspace_layout import REGION_ALIGN
from moe_reference import seed_from


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_from(request.node.nodeid))


def test_workspace_regions_are_aligned_and_disjoint():
    lay = WorkspaceLayout(capacity_tokens=100, topk=4, hidden=48, num_experts=16, world_size=4,
                          dtype=torch.bfloat16, max_comm_programs=32)
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in lay.regions.values())
    assert all(start % REGION_ALIGN == 0 for start, _, _ in spans)
    assert all(end <= nxt for (_, end, _), (nxt, _, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= lay.nbytes
    assert lay.regions["combine"].nbytes == 100 * 4 * 48 * 2
    assert lay.regions["arrival"].shape == (4, 32)
    views = lay.region_views(torch.zeros(lay.nbytes, dtype=torch.uint8))
    assert views["recv_counts"].shape == (4, 4) and views["recv_counts"].dtype == torch.int32
    with pytest.raises(ValueError, match="not divisible"):
        WorkspaceLayout(8, 2, 16, num_experts=6, world_size=4, dtype=torch.float32)


def test_send_plan_is_stable_by_expert(gen):
    idx = torch.randint(0, 5, (9, 3), generator=gen)
    plan = send_plan(idx, 6)
    flat = idx.reshape(-1)
    assert plan.counts.tolist() == torch.bincount(flat, minlength=6).tolist()
    expected = sorted(range(flat.numel()), key=lambda pair: (int(flat[pair]), pair))
    assert plan.order.tolist() == expected
    assert plan.offsets.tolist() == [0] + torch.cumsum(plan.counts, 0).tolist()


@pytest.mark.parametrize("backend", ["triton", "loop"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.float16, torch.float16),
                                             (torch.float16, torch.float32)])
def test_grouped_wgrad_matches_per_expert_products(backend, dtype, out_dtype, gen):
    """Every backend against float64 per-expert products, in the requested output type (the Triton backend
    writes it from its fp32 accumulator): an expert without rows, fewer rows than a K block, a tail."""
    rows_per_expert = [5, 0, 17, 3, 40]  # includes an expert without rows
    a = torch.randn(sum(rows_per_expert), 20, generator=gen).to(dtype)
    b = torch.randn(sum(rows_per_expert), 12, generator=gen).to(dtype)
    offsets = torch.tensor([0] + torch.cumsum(torch.tensor(rows_per_expert), 0).tolist(), dtype=torch.int32)
    got = grouped_wgrad(a, b, offsets, backend=backend, out_dtype=out_dtype, block_m=16, block_n=16, block_k=16)
    assert got.dtype == (out_dtype or dtype) and got.shape == (len(rows_per_expert), 20, 12)
    tol = 1e-5 if got.dtype == torch.float32 and dtype == torch.float32 else 2e-2
    for e in range(len(rows_per_expert)):
        s, t = offsets[e].item(), offsets[e + 1].item()
        want = (a[s:t].double().t() @ b[s:t].double()).to(got.dtype)
        torch.testing.assert_close(got[e], want, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- accumulate_into
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dst_dtype,src_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_accumulate_into_scattered_destinations(dst_dtype, src_dtype, overwrite, gen):
    """G destinations in one storage, in reversed order with gaps (as Megatron's grad buffer lays out the
    experts' main_grads among other parameters); a size that is not a multiple of the block. `overwrite`: the
    destinations hold NaN before, which must not be read."""
    from comet_megatron.kernels import accumulate

    groups, shape = 5, (37, 131)  # 4847 elements: one full block and a partial one
    n = shape[0] * shape[1]
    gap = 77
    buffer = torch.full((groups * (n + gap) + gap,), float("nan"), dtype=dst_dtype)  # gaps: NaN sentinel
    dsts = [buffer[gap + (groups - 1 - g) * (n + gap):][:n].view(shape) for g in range(groups)]
    before = [torch.randn(shape, generator=gen).to(dst_dtype) for _ in range(groups)]
    for d, b in zip(dsts, before):
        d.copy_(torch.full_like(b, float("nan")) if overwrite else b)
    src = torch.randn((groups, *shape), generator=gen).to(src_dtype)
    base = accumulate.flat_base(dsts)
    assert base is not None and base.numel() == buffer.numel()
    offsets = torch.tensor(accumulate.element_offsets(base, dsts), dtype=torch.int64)
    accumulate.accumulate_into(base, offsets, src, overwrite=overwrite)
    tol = 1e-6 if dst_dtype == torch.float32 else 1e-2
    for g in range(groups):
        want = src[g].double() if overwrite else before[g].double() + src[g].double()
        assert torch.allclose(dsts[g].double(), want, rtol=tol, atol=tol), g
    touched = torch.zeros(buffer.numel(), dtype=torch.bool)
    for o in offsets.tolist():
        touched[o:o + n] = True
    assert torch.isnan(buffer[~touched].float()).all()  # nothing outside the destinations written


def test_flat_base_refuses_what_it_cannot_address():
    from comet_megatron.kernels import accumulate

    a, b = torch.zeros(4, 6), torch.zeros(4, 6)
    assert accumulate.flat_base([a, b]) is None  # two storages
    buf = torch.zeros(100)
    assert accumulate.flat_base([buf[:24].view(4, 6), buf[30:54].view(6, 4)]) is not None
    assert accumulate.flat_base([buf[:24], buf[30:50]]) is None  # sizes differ
    assert accumulate.flat_base([buf[:24].view(4, 6), buf[30:54].view(4, 6).t()]) is None  # not contiguous
    assert accumulate.flat_base([buf[:24], buf.double()[:24]]) is None  # dtypes differ
    with pytest.raises(ValueError, match="int64"):
        accumulate.accumulate_into(buf, torch.zeros(2, dtype=torch.int32), torch.zeros(2, 4))


# ----------------------------------------------------------------------------- grouped_wgrad_accumulate
# 16-bit operands as fp16 here: Triton 3.8's interpreter multiplies bf16 tiles wrongly (their raw bits); the
# compiled bf16 kernel: tests/kernels/gpu
@pytest.mark.parametrize("prefetch_c,use_desc,overwrite", [(True, False, False), (False, False, False),
                                                         (True, True, False), (False, False, True),
                                                         (True, True, True)])
@pytest.mark.parametrize("operand_dtype", [torch.float32, torch.float16])
def test_grouped_wgrad_accumulate_into_scattered_main_grads(prefetch_c, use_desc, overwrite, operand_dtype, gen):
    """out_e += a_e^T b_e into fp32 slices of one buffer (reversed order, NaN gaps), against float64 products:
    experts with no rows, fewer rows than a K block, whole blocks plus a tail, exactly whole blocks; M and N
    not multiples of the tile; a row stride wider than the row (a column slice of a bigger tensor); rows of inf past
    the last expert's (its partial last block must not read them).
    `overwrite`: out_e = a_e^T b_e over main_grads holding NaN (never read; the expert without rows gets zeros)."""
    from comet_megatron.kernels import accumulate
    from comet_megatron.kernels.wgrad import grouped_wgrad_accumulate

    rows_per_expert = [0, 5, 37, 32, 16, 7]
    m_dim, n_dim = 40, 24
    total = sum(rows_per_expert)
    spare = 9  # rows past the last expert's (a receive buffer larger than its rows): inf, never to be read
    a_full = torch.randn(total + spare, m_dim + 8, generator=gen).to(operand_dtype)
    a_full[total:] = float("inf")
    a = a_full[:, 8:]  # row stride m_dim + 8
    b = torch.randn(total + spare, n_dim, generator=gen).to(operand_dtype)
    b[total:] = float("inf")
    experts, n = len(rows_per_expert), m_dim * n_dim
    gap = 13
    buffer = torch.full((experts * (n + gap) + gap,), float("nan"))
    mains = [buffer[gap + (experts - 1 - e) * (n + gap):][:n].view(m_dim, n_dim) for e in range(experts)]
    before = [torch.randn(m_dim, n_dim, generator=gen) for _ in range(experts)]
    for m, v in zip(mains, before):
        m.copy_(torch.full_like(v, float("nan")) if overwrite else v)
    base = accumulate.flat_base(mains)
    out_offsets = torch.tensor(accumulate.element_offsets(base, mains), dtype=torch.int64)
    row_offsets = torch.tensor([0] + torch.cumsum(torch.tensor(rows_per_expert), 0).tolist(), dtype=torch.int32)
    grouped_wgrad_accumulate(a, b, row_offsets, base, out_offsets, block_m=16, block_n=16, block_k=16,
                             group_m=2, num_warps=1, num_stages=1, prefetch_c=prefetch_c, use_tma_loads=use_desc,
                             overwrite=overwrite)
    tol = 1e-5 if operand_dtype == torch.float32 else 1e-3
    for e in range(experts):
        s, t = row_offsets[e].item(), row_offsets[e + 1].item()
        want = a[s:t].double().t() @ b[s:t].double()
        if not overwrite:
            want = before[e].double() + want
        torch.testing.assert_close(mains[e].double(), want, rtol=tol, atol=tol, msg=f"expert {e}")
    touched = torch.zeros(buffer.numel(), dtype=torch.bool)
    for o in out_offsets.tolist():
        touched[o:o + n] = True
    assert torch.isnan(buffer[~touched]).all()  # nothing outside the main_grads written


def test_grouped_wgrad_accumulate_refuses_mismatched_inputs():
    from comet_megatron.kernels.wgrad import grouped_wgrad_accumulate

    a, b = torch.zeros(6, 4), torch.zeros(6, 3)
    base, offs = torch.zeros(24), torch.tensor([0, 12])
    with pytest.raises(ValueError, match="row offsets"):
        grouped_wgrad_accumulate(a, b, torch.tensor([0, 6], dtype=torch.int32), base, offs)
    with pytest.raises(ValueError, match="fp32"):
        grouped_wgrad_accumulate(a, b, torch.tensor([0, 3, 6]), base.bfloat16(), offs)
    with pytest.raises(ValueError, match="int64"):  # writing takes any float type, still int64 offsets
        grouped_wgrad_accumulate(a, b, torch.tensor([0, 3, 6]), base.bfloat16(), offs.int(), overwrite=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_grouped_wgrad_accumulate_without_rows(overwrite):
    """No rows at all (no token routed to this rank's experts): adding leaves the main_grads as they were,
    writing sets them to the (zero) products; the rest of the buffer is untouched either way."""
    from comet_megatron.kernels.wgrad import grouped_wgrad_accumulate

    a, b = torch.zeros(0, 4), torch.zeros(0, 3)
    buffer = torch.full((40,), float("nan"))
    buffer[2:14] = 5.0
    buffer[20:32] = 7.0
    grouped_wgrad_accumulate(a, b, torch.zeros(3, dtype=torch.int32), buffer, torch.tensor([20, 2]),
                             overwrite=overwrite)
    want = torch.full((40,), float("nan"))
    want[2:14] = 0.0 if overwrite else 5.0
    want[20:32] = 0.0 if overwrite else 7.0
    torch.testing.assert_close(buffer, want, equal_nan=True)


def test_tma_output_rows_views_back_to_back_outputs():
    """The outputs as rows of one [rows, N] view from the lowest (Megatron's DDP: experts' main_grads back to
    back, reversed, among other parameters): first rows right; None for what TMA cannot address."""
    from comet_megatron.kernels.wgrad import tma_output_rows

    m_dim, n_dim = 3, 8
    buf = torch.arange(200, dtype=torch.float32)
    offsets = [40 + 2 * m_dim * n_dim, 40 + 2 * n_dim, 40]  # a gap of whole rows between the last two
    view, rows = tma_output_rows(buf, offsets, m_dim, n_dim)
    assert rows.dtype == torch.int32 and rows.tolist() == [2 * m_dim, 2, 0]
    for off, r in zip(offsets, rows.tolist()):
        assert torch.equal(view[r:r + m_dim], buf[off:off + m_dim * n_dim].view(m_dim, n_dim))
    assert view.shape == (2 * m_dim + m_dim, n_dim)
    assert tma_output_rows(buf, [40, 40 + m_dim * n_dim + 3], m_dim, n_dim) is None  # not a whole row apart
    assert tma_output_rows(buf, [41, 41 + m_dim * n_dim], m_dim, n_dim) is None  # start not 16-byte aligned
    assert tma_output_rows(buf, [0, 18], 3, 6) is None  # rows of 24 bytes: not 16-byte aligned
    assert tma_output_rows(buf, [190], m_dim, n_dim) is None  # runs past the buffer
    assert tma_output_rows(buf, [], m_dim, n_dim) is None


@pytest.mark.parametrize("experts_rows", [[0, 5, 37, 32, 16], [20, 0]])
def test_grouped_wgrad_accumulate_tma_store_epilogue(experts_rows, gen):
    """overwrite through the descriptor epilogue (C_DESC: the tile stored by TMA at its expert's first row
    of the outputs' [rows, N] view), forced on in the interpreter: main_grads back to back in reverse order
    with whole-row NaN gaps, holding NaN before (never read); the gaps stay NaN. The reduce-add variant
    needs the compiled kernel (tests/kernels/gpu)."""
    from comet_megatron.kernels import accumulate
    from comet_megatron.kernels.wgrad import grouped_wgrad_accumulate, tma_output_rows

    m_dim, n_dim = 32, 24
    total = sum(experts_rows)
    a = torch.randn(total, m_dim, generator=gen).to(torch.float16)
    b = torch.randn(total, n_dim, generator=gen).to(torch.float16)
    experts, n = len(experts_rows), m_dim * n_dim
    gap = 2 * n_dim
    buffer = torch.full((experts * (n + gap) + gap,), float("nan"))
    mains = [buffer[gap + (experts - 1 - e) * (n + gap):][:n].view(m_dim, n_dim) for e in range(experts)]
    base = accumulate.flat_base(mains)
    host_offsets = accumulate.element_offsets(base, mains)
    out_rows = tma_output_rows(base, host_offsets, m_dim, n_dim)
    assert out_rows is not None
    row_offsets = torch.tensor([0] + torch.cumsum(torch.tensor(experts_rows), 0).tolist(), dtype=torch.int32)
    grouped_wgrad_accumulate(a, b, row_offsets, base, torch.tensor(host_offsets, dtype=torch.int64),
                             block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1,
                             use_tma_loads=True, overwrite=True, out_rows=out_rows)
    for e in range(experts):
        s, t = row_offsets[e].item(), row_offsets[e + 1].item()
        want = a[s:t].double().t() @ b[s:t].double()
        torch.testing.assert_close(mains[e].double(), want, rtol=1e-3, atol=1e-3, msg=f"expert {e}")
    touched = torch.zeros(buffer.numel(), dtype=torch.bool)
    for o in host_offsets:
        touched[o:o + n] = True
    assert torch.isnan(buffer[~touched]).all()


def test_grouped_wgrad_tiles_by_rows_and_what_the_store_allows():
    """`grouped_wgrad`'s tiles on a GPU: 128 x 128 below 512 mean rows per expert, 128 x 256 from there, both
    only with the TMA store and an M they divide (a tile must not spill into the next expert's output); the
    accumulate kernel's tiles otherwise; the interpreter's off the GPU. (CUDA operands stood in for: only
    `is_cuda` and the row count are read.)"""
    from types import SimpleNamespace

    from comet_megatron.kernels.wgrad import (GROUPED_WGRAD_TILES, GROUPED_WGRAD_TILES_LONG, INTERPRETER_TILES,
                                              WGRAD_ACCUMULATE_TILES, grouped_wgrad_tiles)

    def on_gpu(rows):
        return SimpleNamespace(is_cuda=True, shape=(rows, 256))

    assert grouped_wgrad_tiles(on_gpu(4 * 511), 4, 256, True) == GROUPED_WGRAD_TILES
    assert grouped_wgrad_tiles(on_gpu(4 * 512), 4, 256, True) == GROUPED_WGRAD_TILES_LONG
    assert grouped_wgrad_tiles(on_gpu(4 * 512), 4, 200, True) == WGRAD_ACCUMULATE_TILES  # 128 does not divide M
    assert grouped_wgrad_tiles(on_gpu(4 * 100), 4, 256, False) == WGRAD_ACCUMULATE_TILES  # no TMA store
    assert grouped_wgrad_tiles(on_gpu(0), 0, 256, True) == GROUPED_WGRAD_TILES
    assert grouped_wgrad_tiles(torch.zeros(8, 4), 2, 4, True) == INTERPRETER_TILES
    tiles = grouped_wgrad_tiles(on_gpu(4 * 512), 4, 256, True)
    tiles["block_m"] = 1  # a copy: the table is not changed through it
    assert GROUPED_WGRAD_TILES_LONG["block_m"] == 128


def test_grouped_wgrad_refuses_unknown_tile_knobs():
    from comet_megatron.kernels import grouped_wgrad

    a, b = torch.zeros(4, 8), torch.zeros(4, 8)
    with pytest.raises(TypeError, match="unknown tile knobs.*blockm"):
        grouped_wgrad(a, b, torch.tensor([0, 4], dtype=torch.int32), backend="triton", blockm=16)


def test_grouped_wgrad_refuses_backends_it_cannot_run():
    """backend='gluon' off Hopper (here: CPU tensors) names why and the fix; an unknown backend lists the names."""
    from comet_megatron.kernels import grouped_wgrad

    a, b = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="backend='gluon' cannot run here.*backend='auto'"):
        grouped_wgrad(a, b, offsets, backend="gluon")
    with pytest.raises(ValueError, match="backend='gluon' cannot run here.*16-bit"):
        grouped_wgrad(a.float(), b.float(), offsets, backend="gluon")
    with pytest.raises(ValueError, match="unknown backend 'cublas'.*grouped_mm, triton, gluon"):
        grouped_wgrad(a, b, offsets, backend="cublas")
