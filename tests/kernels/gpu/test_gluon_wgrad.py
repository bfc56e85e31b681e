"""The warp-specialised Gluon weight-gradient kernel (kernels/gluon_wgrad.py, Hopper only, compiled): expert
weight gradients added into (or written over) fp32 main_grads in reverse order in one NaN-gapped buffer, against
float64, for every kind of expert (no rows, fewer rows than a K block, whole blocks, blocks + a partial tail),
M and N not multiples of the tiles, rows of inf past the last expert's (the tail's zeroing must catch them),
several tile sets and fewer programs than tiles. Run with `pytest -m gpu tests/kernels/gpu`."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels import accumulate
from comet_megatron.kernels.gluon_wgrad import grouped_wgrad_ws, gluon_wgrad_supported
from comet_megatron.kernels.wgrad import outputs_aligned
from moe_reference import rel_err, reversed_main_grads, seed_from, wgrad_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
                       reason="the Gluon weight-gradient kernel is Hopper-only (other GPUs keep the Triton one)"),
]


# two MMA warpgroups sharing the b blocks of 128-row tiles (12 warps at 168 registers, 2 epilogue warps)
TWO_MMA = {"mma_warpgroups": 2}


KNOB_SETS = [{}, {"num_stages": 2}, {"programs": 3}, {"prefetch": 2, "group_m": 1}, {"acc_buffers": 2, "num_stages": 4},
             {"block_m": 128, "block_n": 128},
             {"block_m": 128, "block_n": 128, "block_k": 64, "acc_buffers": 2, "programs": 5},
             {"block_m": 128, "block_n": 64, "block_k": 64, "num_stages": 3},
             {"epilogue_chunks": 4, "prefetch": 2}, {"epilogue_chunks": 1},
             TWO_MMA, {**TWO_MMA, "epilogue_chunks": 4, "programs": 3},
             {**TWO_MMA, "acc_buffers": 2, "num_stages": 4, "programs": 5}]
# bf16: every knob set with outputs off 16-byte boundaries (gap 77: scalar accesses) and on them (gap 64, told
# so: 16-byte accesses); fp16: every set unaligned, the default aligned
CASES = ([(k, torch.bfloat16, gap) for k in KNOB_SETS for gap in (77, 64)]
         + [(k, torch.float16, 77) for k in KNOB_SETS] + [({}, torch.float16, 64)])


@pytest.mark.parametrize("overwrite", [False, True], ids=["add", "write"])
@pytest.mark.parametrize("knobs,dtype,gap", CASES)
def test_grouped_wgrad_ws(overwrite, knobs, dtype, gap, request):
    gen = torch.Generator(device="cuda").manual_seed(seed_from(request.node.nodeid))
    case = wgrad_case([300, 0, 17, 517, 64, 128, 1], 328, 200, gap, gen, overwrite, dtype)
    assert gluon_wgrad_supported(case.a, case.b, knobs.get("block_n", 256), knobs.get("block_m", 64)) is None
    aligned = outputs_aligned(case.base, case.out_offsets.tolist(), 200)
    assert aligned == (gap == 64)
    grouped_wgrad_ws(case.a, case.b, case.device_offsets, case.base, case.out_offsets, overwrite=overwrite,
                     aligned=aligned, **knobs)
    torch.cuda.synchronize()
    case.check()


@pytest.mark.parametrize("knobs", [{}, {"mma_warpgroups": 1}, {"programs": 3}, {"mma_warpgroups": 2, "programs": 5}])
def test_grouped_wgrad_ws_writes_fp32_main_grads_through_tma_stores(knobs, request):
    """`tma_store=True` with fp32 main_grads (a step's first micro-batch): each MMA warpgroup stores its fp32 part
    through TMA into the main_grads seen as rows (`tma_output_rows`; reversed, two rows of NaN between them); M =
    320: the second warpgroup's part of the last 128-row tile lies past M and must not be stored (the gaps stay
    NaN); the main_grads NaN before (never read)."""
    from comet_megatron.kernels.wgrad import tma_output_rows

    gen = torch.Generator(device="cuda").manual_seed(seed_from(request.node.nodeid))
    m_dim, n_dim = 320, 200
    case = wgrad_case([300, 0, 17, 517, 64, 128, 1], m_dim, n_dim, 2 * n_dim, gen, True)
    host_offsets = case.out_offsets.tolist()
    rows = tma_output_rows(case.base, host_offsets, m_dim, n_dim)
    assert rows is not None
    grouped_wgrad_ws(case.a, case.b, case.device_offsets, case.base, case.out_offsets, overwrite=True,
                     aligned=outputs_aligned(case.base, host_offsets, n_dim), out_rows=rows, tma_store=True, **knobs)
    torch.cuda.synchronize()
    case.check()


def test_grouped_wgrad_ws_repeated_calls_large():
    """A Mixtral-like slice (many tiles per program, int64 row offsets), added twice (two tile sets): the second
    call adds on top of the first (no state kept between launches), against float64."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    case = wgrad_case([530, 489, 0, 511], 1024, 768, 0, gen, False, pad=0)
    offs = torch.tensor(case.offsets, dtype=torch.int64, device="cuda")
    for knobs in ({}, {"block_m": 128, "block_n": 128}):
        grouped_wgrad_ws(case.a, case.b, offs, case.base, case.out_offsets, **knobs)
    torch.cuda.synchronize()
    case.check(times=2)


def test_grouped_wgrad_ws_without_rows_and_bad_input():
    """No operand rows: writing zeroes every output, adding leaves them alone; wrong offsets or outputs are
    refused with the fix named."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    a = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.empty(0, 32, device="cuda", dtype=torch.bfloat16)
    offs = torch.zeros(3, dtype=torch.int32, device="cuda")
    for overwrite in (False, True):
        buffer, mains, before = reversed_main_grads(2, 64, 32, 5, gen, overwrite)
        base = accumulate.flat_base(mains)
        out_offsets = torch.tensor(accumulate.element_offsets(base, mains), dtype=torch.int64, device="cuda")
        grouped_wgrad_ws(a, b, offs, base, out_offsets, overwrite=overwrite)
        for m, want in zip(mains, before):
            assert torch.equal(m.double(), want)
        with pytest.raises(ValueError, match="El \\+ 1"):
            grouped_wgrad_ws(a, b, offs[:2], base, out_offsets, overwrite=overwrite)
        with pytest.raises(ValueError, match="int64 element offsets"):
            grouped_wgrad_ws(a, b, offs, base, out_offsets.int(), overwrite=overwrite)
