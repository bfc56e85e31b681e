"""`kernels.gluon_wgrad` off the GPU: what `gluon_wgrad_supported` refuses and why (the layer's weight-gradient
route asks it before taking the Hopper kernel), and that `grouped_wgrad_ws` refuses the same with the reason.
The kernel itself runs in tests/kernels/gpu/test_gluon_wgrad.py (Hopper)."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels.gluon_wgrad import grouped_wgrad_ws, gluon_wgrad_supported


def _ops(rows=64, m=128, n=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    return torch.randn(rows, m, generator=g).to(dtype), torch.randn(rows, n, generator=g).to(dtype)


def test_supported_names_each_refusal():
    a, b = _ops()
    assert "16-bit" in gluon_wgrad_supported(a.float(), b.float())
    assert "16-bit" in gluon_wgrad_supported(a, b.half())
    assert "rows [R, M] and [R, N]" in gluon_wgrad_supported(a, b[:-1])
    assert "contiguous" in gluon_wgrad_supported(a.t().contiguous().t(), b)
    assert "16-byte" in gluon_wgrad_supported(_ops(m=131)[0], b)  # 262-byte rows: TMA needs 16-byte multiples
    assert "tiles 128 x 256" in gluon_wgrad_supported(a, b, block_n=256, block_m=128)
    assert "block_n=32" in gluon_wgrad_supported(a, b, block_n=32, block_m=64)
    # well-formed operands: the remaining reason is the machine (no compiled CUDA kernel here)
    assert "CUDA" in gluon_wgrad_supported(a, b) or "Gluon" in gluon_wgrad_supported(a, b)


def test_grouped_wgrad_ws_refuses_with_the_reason():
    a, b = _ops()
    offs = torch.tensor([0, 30, 64], dtype=torch.int32)
    out = torch.zeros(2 * 128 * 64)
    with pytest.raises(ValueError, match="grouped_wgrad_ws: 16-bit"):
        grouped_wgrad_ws(a.float(), b.float(), offs, out, torch.tensor([0, 128 * 64]))
    with pytest.raises(ValueError, match="grouped_wgrad_ws: "):
        grouped_wgrad_ws(a, b, offs, out, torch.tensor([0, 128 * 64]))


@pytest.mark.parametrize("overwrite", [False, True], ids=["add", "write"])
def test_gluon_route_falls_back_to_the_triton_kernel(overwrite):
    """`experts.accumulate_wgrad_gluon` with operands the Gluon kernel cannot take (here: not on a Hopper GPU)
    hands the same sums to the Triton kernel: main_grads right against float64, gaps untouched."""
    from comet_megatron.experts import accumulate_wgrad_gluon
    from moe_reference import wgrad_case

    # fp16: Triton's interpreter gets bf16 products wrong (kernels.config.INTERPRETER_BF16)
    case = wgrad_case([0, 5, 37, 16, 7], 40, 24, 13, torch.Generator().manual_seed(4), overwrite, torch.float16)
    assert gluon_wgrad_supported(case.a, case.b) is not None
    accumulate_wgrad_gluon(case.mains, case.a, case.b, case.device_offsets, overwrite)
    case.check(tol=1e-3)


def test_forced_gluon_route_without_it_is_the_grouped_add(monkeypatch):
    """COMET_WGRAD_ACCUMULATION=gluon where the Gluon kernel cannot run (no Hopper GPU) takes the route that
    always runs (grouped GEMM + add), as the other forced routes do; an unknown mode names the choices."""
    from comet_megatron.experts import _wgrad_accumulation

    mains = [t for t in torch.zeros(2, 8, 4).unbind(0)]
    x = torch.zeros(6, 4, dtype=torch.bfloat16)
    monkeypatch.setenv("COMET_WGRAD_ACCUMULATION", "gluon")
    assert _wgrad_accumulation(x, 6, mains) == "add"
    monkeypatch.setenv("COMET_WGRAD_ACCUMULATION", "cutlass")
    with pytest.raises(ValueError, match="gluon"):
        _wgrad_accumulation(x, 6, mains)


def test_bf16_in_the_interpreter_is_refused_not_miscomputed(monkeypatch):
    """Triton's interpreter computes bf16 tl.dot products wrongly; every dot kernel refuses them there, naming
    the fix, the fused path reports it as the reason to take the reference path, and the weight-gradient
    route does not pick the Triton kernel for them."""
    from comet_megatron.experts import _triton_wgrad_ok
    from comet_megatron.kernels.config import dot_precision
    from comet_megatron.kernels.wgrad import INTERPRETER_TILES, grouped_wgrad_accumulate
    from moe_reference import wgrad_case

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = wgrad_case([3, 20], 16, 16, 0, torch.Generator().manual_seed(1), False)  # bf16 operands
    with pytest.raises(ValueError, match="fp32 or fp16 operands on the CPU"):
        grouped_wgrad_accumulate(case.a, case.b, case.device_offsets, case.base, case.out_offsets,
                                 **INTERPRETER_TILES)
    assert not _triton_wgrad_ok(case.a, case.mains)
    assert _triton_wgrad_ok(case.a.half(), case.mains)
    assert dot_precision(torch.float16) == "tf32" and dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dot_precision(torch.bfloat16) == "tf32"  # compiled kernels take bf16


def _plan(rows, experts=4, m=128, n=256, out_dtype=torch.float32, **knobs):
    """`wgrad_ws_plan` on CPU tensors (it builds descriptors and constexprs; only the launch needs a GPU)."""
    from comet_megatron.kernels.gluon_wgrad import wgrad_ws_plan

    a, b = torch.zeros(rows, m, dtype=torch.bfloat16), torch.zeros(rows, n, dtype=torch.bfloat16)
    offs = torch.zeros(experts + 1, dtype=torch.int32)
    out = torch.zeros(experts * m * n, dtype=out_dtype)
    return wgrad_ws_plan(a, b, offs, out, torch.arange(experts, dtype=torch.int64) * (m * n), sms=132, **knobs)


def test_plan_picks_two_mma_warpgroups_from_the_mean_rows_per_expert():
    """Two MMA warpgroups (128-row tiles: 12 warps, 2 of them epilogue warps, 8 chunks, every warpgroup at 168
    registers) from TWO_MMA_MIN_ROWS mean rows per expert (fewer when writing); one (64-row tiles, 4 epilogue
    warps) below; the caller's choice wins; the grid counts tiles of the chosen height."""
    from comet_megatron.kernels.gluon_wgrad import TWO_MMA_MIN_ROWS

    add, write = TWO_MMA_MIN_ROWS["add"], TWO_MMA_MIN_ROWS["write"]
    assert write < add
    _, grid, _, two = _plan(add * 4)
    assert (two["SPLIT"], two["EPI_WARPS"], two["NCH"], two["maxnreg"], two["MMA_REGS"]) == (2, 2, 8, 168, 168)
    assert grid == (4 * 1 * 1,)  # 4 experts x one 128 x 256 tile each
    _, grid, _, one = _plan(add * 4 - 1)
    assert (one["SPLIT"], one["EPI_WARPS"], one["NCH"]) == (1, 4, 2) and grid == (4 * 2 * 1,)
    assert _plan(write * 4, overwrite=True)[3]["SPLIT"] == 2
    assert _plan(write * 4 - 1, overwrite=True)[3]["SPLIT"] == 1
    assert _plan(add * 4, mma_warpgroups=1)[3]["SPLIT"] == 1
    assert _plan(8, mma_warpgroups=2)[3]["SPLIT"] == 2
    # 128 x 128 parts keep one warpgroup by default
    assert _plan(add * 4, block_m=128, block_n=128)[3]["SPLIT"] == 1


def test_plan_refuses_what_two_mma_warpgroups_cannot_take():
    with pytest.raises(ValueError, match="mma_warpgroups=2 takes block_m=64"):
        _plan(64, mma_warpgroups=2, block_m=128, block_n=128)
    with pytest.raises(ValueError, match="2 epilogue warps"):
        _plan(64, mma_warpgroups=2, epilogue_warps=4)
    with pytest.raises(ValueError, match="mma_warpgroups=3"):
        _plan(64, mma_warpgroups=3)
    with pytest.raises(ValueError, match="epilogue_chunks=16"):
        _plan(64, epilogue_chunks=16)
    with pytest.raises(ValueError, match="epilogue_chunks=3"):
        _plan(64, epilogue_chunks=3)


def test_plan_epilogue_access_width():
    """The epilogue's elements per access: 4 (16 bytes of fp32 where the caller promises alignment; 8 bytes of a
    16-bit output, measured ahead of 8 elements); the knob wins; bad values and adding into a bf16 output are
    refused."""
    assert _plan(64)[3]["VEC"] == 4
    assert _plan(64, aligned=True)[3]["VEC"] == 4
    assert _plan(64, aligned=True, overwrite=True, out_dtype=torch.bfloat16)[3]["VEC"] == 4
    assert _plan(64, aligned=True, overwrite=True, out_dtype=torch.bfloat16, epilogue_vec=8)[3]["VEC"] == 8
    with pytest.raises(ValueError, match="epilogue_vec=3"):
        _plan(64, epilogue_vec=3)
    with pytest.raises(ValueError, match="fp32 outputs"):
        _plan(64, out_dtype=torch.bfloat16)


def test_plan_stores_16_bit_parts_through_tma_where_it_can():
    """A fresh 16-bit output given as rows (`out_rows`, grouped_wgrad's gluon backend) leaves through TMA stores from
    the MMA warpgroups, with two of them at any size; the staging buffers (16-bit) leave room for the ring; where
    the store cannot be used the epilogue warps write it (or, forced, the plan says why)."""
    m, n, experts = 128, 256, 4
    out = torch.zeros(experts * m * n, dtype=torch.bfloat16)
    rows = (out.view(-1, n), torch.arange(experts, dtype=torch.int32) * m)
    _, _, args, k = _plan(64, overwrite=True, out_dtype=torch.bfloat16, out_rows=rows)
    assert k["TMA_STORE"] and k["SPLIT"] == 2 and args[-1] is rows[1]
    assert k["NB"] == 6  # (6 x 24 KB of operands) + 2 x 32 KB of bf16 parts
    one = _plan(64, overwrite=True, out_dtype=torch.bfloat16, out_rows=rows, mma_warpgroups=1)[3]
    assert one["TMA_STORE"] and one["NB"] == 8  # 8 x 20 KB + one 32 KB part
    assert not _plan(64, overwrite=True, out_dtype=torch.bfloat16)[3]["TMA_STORE"]  # no rows given
    assert not _plan(64, overwrite=True, out_dtype=torch.bfloat16, out_rows=rows, tma_store=False)[3]["TMA_STORE"]
    assert not _plan(64, overwrite=True, out_dtype=torch.bfloat16, out_rows=rows, m=96)[3]["TMA_STORE"]
    with pytest.raises(ValueError, match="tma_store=True but no out_rows"):
        _plan(64, overwrite=True, out_dtype=torch.bfloat16, tma_store=True)
    with pytest.raises(ValueError, match="M=96 is not a multiple of block_m=64"):
        _plan(64, overwrite=True, out_dtype=torch.bfloat16, out_rows=rows, m=96, tma_store=True)
    # fp32 (a step's first micro-batch writing main_grad): only when asked, two 64 KB staging buffers, 4 stages
    fp32 = torch.zeros(experts * m * n)
    f32_rows = (fp32.view(-1, n), rows[1])
    assert not _plan(64, overwrite=True, out_rows=f32_rows)[3]["TMA_STORE"]
    k32 = _plan(64, overwrite=True, out_rows=f32_rows, tma_store=True, mma_warpgroups=2)[3]
    assert k32["TMA_STORE"] and k32["NB"] == 4
    with pytest.raises(ValueError, match="cannot add into main_grad"):
        _plan(64, out_rows=f32_rows, tma_store=True)
    with pytest.raises(ValueError, match="16-bit or fp32 outputs"):
        f64 = torch.zeros(experts * m * n, dtype=torch.float64)
        _plan(64, overwrite=True, out_dtype=torch.float64, out_rows=(f64.view(-1, n), rows[1]), tma_store=True)


def test_outputs_aligned_is_what_the_kernels_may_be_told():
    """16-byte aligned outputs with 16-byte rows: the `aligned` promise (experts.mains_aligned for main_grads)."""
    from comet_megatron.experts import mains_aligned
    from comet_megatron.kernels.wgrad import outputs_aligned

    buf = torch.zeros(4096)
    assert outputs_aligned(buf, [0, 64, 1024], 8)
    assert not outputs_aligned(buf, [0, 66], 8)  # 264 bytes in: off 16-byte boundaries
    assert not outputs_aligned(buf, [0, 64], 6)  # 24-byte rows
    assert not outputs_aligned(buf[1:], [0], 8)  # the base itself 4 bytes in
    assert mains_aligned([buf[:64].view(8, 8), buf[128:192].view(8, 8)])
    assert not mains_aligned([buf[:64].view(8, 8), buf[130:194].view(8, 8)])
    assert not mains_aligned([buf[:48].view(8, 6)])
