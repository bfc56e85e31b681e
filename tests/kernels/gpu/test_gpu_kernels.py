"""Compiled kernels on a CUDA GPU: bf16 / fp32 parity on emulated ranks, and world-1 timings against
torch._grouped_mm. Run with `pytest -m gpu tests/kernels/gpu -s` to see the timing table."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels import (EmulatedGroup, KernelConfig, combine_reduce, dispatch_gemm, gemm_combine,
                                    publish, receive_layout)
from moe_reference import (make_problem, reference_grads, reference_rank_outputs, rel_err, reversed_main_grads,
                            seed_from, wgrad_case)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _round_problem(p, dtype):
    """Round the problem's inputs to `dtype` so the float64 reference sees what the kernels see."""
    p.xs = [x.to(dtype).float() for x in p.xs]
    p.w1, p.w2 = p.w1.to(dtype).float(), p.w2.to(dtype).float()
    return p


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("world,topk,pre_reduce", [(1, 2, False), (2, 2, False), (4, 2, False),
                                                   (2, 4, True), (4, 4, True)])
def test_parity_emulated_ranks(world, topk, pre_reduce, dtype, tol, request):
    # pre_reduce: rows of one token meeting on an expert rank are summed before they travel (top-4 with
    # few experts per rank makes such meetings common).
    seed = seed_from(request.node.nodeid)
    tokens = [197 + 61 * r for r in range(world)]
    p = _round_problem(make_problem(seed, world=world, tokens=tokens, topk=topk, hidden=256, ffn=176,
                                    experts_per_rank=3, routing="skewed"), dtype)
    group = EmulatedGroup(world, capacity_tokens=max(tokens), topk=topk, hidden=256, num_experts=p.num_experts,
                          dtype=dtype, device="cuda")
    cfg = KernelConfig(block_m=64, block_n=64, block_k=32, num_comm_dispatch=4, num_comm_combine=4,
                       pre_reduce=pre_reduce)
    w1 = [p.local_w1(r, dtype).cuda() for r in range(world)]
    w2 = [p.local_w2(r, dtype).cuda() for r in range(world)]
    fwd = group.forward([x.to("cuda", dtype) for x in p.xs], [i.cuda() for i in p.topk_idx],
                        [q.cuda() for q in p.topk_probs], w1, w2, cfg)
    ref = reference_rank_outputs(p)
    g = torch.Generator().manual_seed(seed + 1)
    grad_outs = [torch.randn(x.shape, generator=g).to(dtype).float() for x in p.xs]
    bwd = group.backward([s for _, s in fwd], [go.to("cuda", dtype) for go in grad_outs], w1, w2, cfg)
    ref_rank, dw1, dw2 = reference_grads(p, grad_outs)
    el = p.local_experts
    for r in range(world):
        assert rel_err(fwd[r][0].cpu(), ref[r]) < tol, f"forward rank {r}"
        gx, gp, gw1, gw2 = (t.cpu() for t in bwd[r])
        assert rel_err(gx, ref_rank[r][0]) < tol, f"grad x rank {r}"
        assert rel_err(gp, ref_rank[r][1]) < tol, f"grad probs rank {r}"
        assert rel_err(gw1, dw1[r * el:(r + 1) * el]) < tol, f"dW1 rank {r}"
        assert rel_err(gw2, dw2[r * el:(r + 1) * el]) < tol, f"dW2 rank {r}"


def _time_ms(fn, iters=10, warmup=3):
    """Median of `iters` timings; `fn(record=(start, end))` records the events around what is timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn(record=(start, end))
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# (name, tokens, hidden, ffn, local experts, topk): Qwen2-MoE- and Mixtral-like experts at world 1.
SHAPES = [("qwen2-moe", 4096, 2048, 1408, 8, 4), ("mixtral", 4096, 4096, 14336, 8, 2)]
TILES = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_timing_world1_vs_grouped_mm(shape):
    """World 1: the fused kernels (pull = local gather) against torch._grouped_mm on pre-sorted rows."""
    name, tokens, hidden, ffn, experts, topk = shape
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    idx = torch.rand(tokens, experts, device=dev).topk(topk, dim=1).indices
    probs = torch.softmax(torch.randn(tokens, topk, device=dev), 1)
    w1 = torch.randn(experts, hidden, 2 * ffn, device=dev, dtype=dt) / hidden ** 0.5
    w2 = torch.randn(experts, ffn, hidden, device=dev, dtype=dt) / ffn ** 0.5
    group = EmulatedGroup(1, capacity_tokens=tokens, topk=topk, hidden=hidden, num_experts=experts, dtype=dt,
                          device=dev)
    view = group.views[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    state = {"num_comm": 8}

    def fused_fc1(record=None):
        epoch = view.next_epoch()
        publish(view, x, epoch, idx, probs)
        state["layout"] = layout = receive_layout(view, epoch, TILES["block_m"])
        state["epoch"] = epoch
        if record:
            record[0].record()
        nc = state["num_comm"]
        state["d"] = dispatch_gemm(view, layout, w1, epoch, num_comm=nc, num_compute=sms - nc,
                                   block_n=TILES["block_n"], block_k=TILES["block_k"],
                                   num_warps=TILES["num_warps"], num_stages=TILES["num_stages"])
        if record:
            record[1].record()

    def fused_fc2(record=None):
        fused_fc1()
        d, epoch, nc = state["d"], state["epoch"], state["num_comm"]
        if record:
            record[0].record()
        gemm_combine(view, state["layout"], d.out, w2, epoch, recv_pair=d.recv_pair, recv_src=d.recv_src,
                     recv_prob=d.recv_prob, num_comm=nc, num_compute=sms - nc,
                     block_n=TILES["block_n"], block_k=TILES["block_k"], num_warps=TILES["num_warps"],
                     num_stages=TILES["num_stages"])
        state["out"] = combine_reduce(view, tokens, epoch, num_comm=nc)[0]
        if record:
            record[1].record()

    order = torch.sort(idx.reshape(-1), stable=True).indices
    x_sorted = x[order // topk]
    offs = torch.cumsum(torch.bincount(idx.reshape(-1), minlength=experts), 0).to(torch.int32)
    h_sorted = torch.randn(x_sorted.shape[0], ffn, device=dev, dtype=dt)

    def ref_fc1(record=None):
        if record:
            record[0].record()
        pre = torch._grouped_mm(x_sorted, w1, offs=offs)
        torch.nn.functional.silu(pre[:, :ffn]) * pre[:, ffn:]
        if record:
            record[1].record()

    def ref_fc2(record=None):
        if record:
            record[0].record()
        torch._grouped_mm(h_sorted, w2, offs=offs)
        if record:
            record[1].record()

    rows = tokens * topk
    flops1, flops2 = 2 * rows * hidden * 2 * ffn, 2 * rows * ffn * hidden
    results = {
        "grouped_mm fc1 + swiglu (rows pre-sorted)": (_time_ms(ref_fc1), flops1),
        "grouped_mm fc2 (no scatter)": (_time_ms(ref_fc2), flops2),
    }
    for nc in (8, 16, 32):
        state["num_comm"] = nc
        results[f"dispatch_gemm (pull + fc1 + swiglu), {nc} comm programs"] = (_time_ms(fused_fc1), flops1)
        results[f"gemm_combine + combine_reduce (fc2 + scale + scatter + sum), {nc} comm"] = (
            _time_ms(fused_fc2), flops2)
    print(f"\n[{name}] tokens={tokens} H={hidden} F={ffn} E={experts} K={topk} on {torch.cuda.get_device_name()}")
    for label, (ms, flops) in results.items():
        print(f"  {label:70s} {ms:8.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s")
    # Sanity: the fused forward matches a per-expert torch computation of the same layer.
    flat = idx.reshape(-1)
    y = torch.zeros(flat.numel(), hidden, device=dev)
    for e in range(experts):
        sel = (flat == e).nonzero()[:, 0]
        pre = x[sel // topk].float() @ w1[e].float()
        h = torch.nn.functional.silu(pre[:, :ffn]) * pre[:, ffn:]
        y[sel] = (h @ w2[e].float()) * probs.reshape(-1)[sel, None]
    assert rel_err(state["out"].float(), y.view(tokens, topk, hidden).sum(1)) < 2e-2


@pytest.mark.parametrize("backend,rows,m_dim,n_dim,out_dtype,block_n", [
    ("grouped_mm", [300, 0, 517, 64], 256, 192, torch.float32, None),
    ("triton", [300, 0, 517, 64], 256, 192, torch.float32, 128),  # 128 x 128 tiles, TMA store
    ("triton", [600, 0, 1500, 700], 256, 320, torch.bfloat16, 256),  # 128 x 256 tiles (>= 512 rows per expert)
    ("triton", [300, 5, 517], 200, 192, torch.bfloat16, 128),  # M not a multiple of 128: 64 x 128, register store
    # the Gluon kernel writing (Hopper): one MMA warpgroup (< 256 mean rows), two; bf16 (16-byte accesses), fp32
    ("gluon", [300, 0, 517, 64], 256, 192, torch.bfloat16, None),
    ("gluon", [600, 0, 1500, 700], 200, 320, torch.bfloat16, None),
    ("gluon", [300, 5, 517, 1], 200, 64, torch.float32, None),
    ("gluon", [600, 0, 1500, 700, 3], 192, 320, torch.bfloat16, None),  # TMA stores, a 128-row tile half past M
])
def test_grouped_wgrad_backends_bf16(backend, rows, m_dim, n_dim, out_dtype, block_n):
    """The wgrad backends against a float64 per-expert loop (an expert without rows, one with a few), each of
    the Triton backend's tile choices (`grouped_wgrad_tiles`); the output's memory NaN-poisoned before (the
    caching allocator hands the freed block back)."""
    from comet_megatron.kernels import grouped_wgrad
    from comet_megatron.kernels.wgrad import grouped_wgrad_tiles

    if backend == "gluon" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon weight-gradient kernel is Hopper-only (other GPUs keep the Triton backend)")
    gen = torch.Generator(device="cuda").manual_seed(3)
    a = torch.randn(sum(rows), m_dim, device="cuda", generator=gen).to(torch.bfloat16)
    b = torch.randn(sum(rows), n_dim, device="cuda", generator=gen).to(torch.bfloat16)
    if block_n is not None:  # the case runs the tiles it is meant to
        tiles = grouped_wgrad_tiles(a, len(rows), m_dim, tma_store=True)
        assert (tiles["block_n"], tiles["block_m"]) == (block_n, 64 if m_dim % 128 else 128)
    offs = [0] + torch.cumsum(torch.tensor(rows), 0).tolist()
    offsets = torch.tensor(offs, dtype=torch.int32, device="cuda")
    poison = torch.full((len(rows), m_dim, n_dim), float("nan"), device="cuda", dtype=out_dtype)
    del poison
    got = grouped_wgrad(a, b, offsets, backend=backend, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (len(rows), m_dim, n_dim)
    for e in range(len(rows)):
        want = a[offs[e]:offs[e + 1]].double().t() @ b[offs[e]:offs[e + 1]].double()
        assert rel_err(got[e].double(), want) < 1e-2, e


@pytest.mark.parametrize("knobs", [{}, {"tma_store": False}, {"mma_warpgroups": 1}, {"mma_warpgroups": 1, "tma_store": False},
                                   {"tma_store": False, "epilogue_vec": 8}, {"programs": 3}])
def test_grouped_wgrad_gluon_layouts(knobs):
    """grouped_wgrad's Gluon backend in each way it can leave the parts (TMA stores of 16-bit parts from the MMA
    warpgroups, or the epilogue warps; one or two MMA warpgroups; 16-byte accesses) against float64: M = 192 (the
    second warpgroup's part of the last 128-row tile lies past M and is not stored), N = 320 (the TMA store clips
    the last 256-wide tile), an expert without rows (zeros), one with 3; the output's memory NaN-poisoned before."""
    from comet_megatron.kernels import grouped_wgrad

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon weight-gradient kernel is Hopper-only (other GPUs keep the Triton backend)")
    rows, m_dim, n_dim = [600, 0, 1500, 700, 3], 192, 320
    gen = torch.Generator(device="cuda").manual_seed(11)
    a = torch.randn(sum(rows), m_dim, device="cuda", generator=gen).to(torch.bfloat16)
    b = torch.randn(sum(rows), n_dim, device="cuda", generator=gen).to(torch.bfloat16)
    offs = [0] + torch.cumsum(torch.tensor(rows), 0).tolist()
    offsets = torch.tensor(offs, dtype=torch.int32, device="cuda")
    for _ in range(2):  # the second call reuses the first's (poisoned) block
        poison = torch.full((len(rows), m_dim, n_dim), float("nan"), device="cuda", dtype=torch.bfloat16)
        del poison
        got = grouped_wgrad(a, b, offsets, backend="gluon", **knobs)
        torch.cuda.synchronize()
        for e in range(len(rows)):
            want = a[offs[e]:offs[e + 1]].double().t() @ b[offs[e]:offs[e + 1]].double()
            assert not got[e].isnan().any(), e
            assert rel_err(got[e].double(), want) < 1e-2, e
        del got


def test_layer_bf16_weight_gradients_take_the_gluon_kernel_on_hopper():
    """experts.grouped_linear_wgrad (the layer's bf16 weight gradients where no main_grad takes them): on Hopper
    with 16-bit operands and M a multiple of 64 it runs the Gluon kernel (`gluon_fresh_ok`), against float64 per
    expert, [out, in] layout; an expert without rows gets zeros."""
    from comet_megatron.experts import grouped_linear_wgrad
    from comet_megatron.kernels.wgrad import gluon_fresh_ok

    counts = [700, 0, 130, 1500]
    gen = torch.Generator(device="cuda").manual_seed(21)
    grad_y = torch.randn(sum(counts), 384, device="cuda", generator=gen).to(torch.bfloat16)
    x = torch.randn(sum(counts), 200, device="cuda", generator=gen).to(torch.bfloat16)
    assert gluon_fresh_ok(grad_y, x, torch.bfloat16) == (torch.cuda.get_device_capability()[0] == 9)
    assert not gluon_fresh_ok(grad_y[:, :320 - 1], x, torch.bfloat16)  # M not a multiple of 64: cuBLAS
    got = grouped_linear_wgrad(grad_y, x, counts, torch.bfloat16)
    assert got.shape == (4, 384, 200) and got.dtype == torch.bfloat16
    offs = [0] + torch.cumsum(torch.tensor(counts), 0).tolist()
    for e in range(4):
        want = grad_y[offs[e]:offs[e + 1]].double().t() @ x[offs[e]:offs[e + 1]].double()
        if counts[e]:
            assert rel_err(got[e].double(), want) < 1e-2, e
        else:
            assert not got[e].any(), e


def test_accumulate_into_compiled():
    """The one-launch main_grad accumulation, compiled: fp32 destinations scattered in one buffer (reversed,
    with gaps), bf16 source, against float64."""
    from comet_megatron.kernels import accumulate

    gen = torch.Generator(device="cuda").manual_seed(5)
    groups, n, gap = 6, 1000003, 129
    buffer = torch.full((groups * (n + gap) + gap,), float("nan"), device="cuda")
    dsts = [buffer[gap + (groups - 1 - g) * (n + gap):][:n] for g in range(groups)]
    for d in dsts:
        d.normal_(generator=gen)
    before = [d.double() for d in dsts]
    src = torch.randn(groups, n, device="cuda", generator=gen).to(torch.bfloat16)
    base = accumulate.flat_base(dsts)
    offsets = torch.tensor(accumulate.element_offsets(base, dsts), dtype=torch.int64, device="cuda")
    accumulate.accumulate_into(base, offsets, src)
    for g in range(groups):
        assert torch.allclose(dsts[g].double(), before[g] + src[g].double(), rtol=1e-6, atol=1e-6), g
    assert int(torch.isnan(buffer).sum()) == gap * (groups + 1)  # the gaps were not written
    for d in dsts:  # overwrite: destinations holding NaN are written, never read
        d.fill_(float("nan"))
    accumulate.accumulate_into(base, offsets, src, overwrite=True)
    for g in range(groups):
        assert torch.equal(dsts[g], src[g].float()), g
    assert int(torch.isnan(buffer).sum()) == gap * (groups + 1)


@pytest.mark.parametrize("knobs", [{}, {"use_tma_loads": False}, {"prefetch_c": True},
                                   {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4},
                                   {"overwrite": True}, {"overwrite": True, "use_tma_loads": False},
                                   {"aligned": True}, {"aligned": True, "overwrite": True},
                                   {"aligned": True, "prefetch_c": True}])
def test_grouped_wgrad_accumulate_compiled(knobs):
    """Expert weight gradients added into fp32 main_grads (reversed in one buffer, NaN gaps), bf16 operands, the
    Hopper tiles (TMA loads) and variants, against float64: experts without rows, with fewer rows than a K
    block, with whole blocks and a tail; M and N not multiples of the tiles; rows of inf past the last expert's.
    `overwrite`: written over main_grads holding NaN (never read). `aligned`: gaps of 64 elements, so every
    output starts on a 16-byte boundary (16-byte accesses), else 77 (off them)."""
    from comet_megatron.kernels.wgrad import WGRAD_ACCUMULATE_TILES, grouped_wgrad_accumulate, outputs_aligned

    gen = torch.Generator(device="cuda").manual_seed(11)
    gap = 64 if knobs.get("aligned") else 77
    case = wgrad_case([300, 0, 17, 517, 64, 100], 328, 200, gap, gen, knobs.get("overwrite", False))
    assert outputs_aligned(case.base, case.out_offsets.tolist(), 200) == (gap == 64)
    grouped_wgrad_accumulate(case.a, case.b, case.device_offsets, case.base, case.out_offsets,
                             **{**WGRAD_ACCUMULATE_TILES, **knobs})
    case.check()


@pytest.mark.parametrize("knobs", [{}, {"overwrite": True},
                                   {"block_m": 128, "block_n": 128, "num_warps": 8},
                                   {"block_m": 128, "block_n": 128, "num_warps": 8, "overwrite": True}])
def test_grouped_wgrad_accumulate_tma_epilogue_compiled(knobs):
    """The TMA epilogue (bulk reduce-add into L2 / bulk store) of the compiled kernel, bf16 operands: main_grads
    back to back in reverse order with whole-row NaN gaps (as Megatron's DDP buffer holds them among other
    parameters), every kind of expert (no rows, fewer than a K block, blocks + tail), N not a multiple of the
    tile; against float64, and the register epilogue (`tma_out=False`) the same way; the gaps stay NaN."""
    from comet_megatron.kernels import accumulate
    from comet_megatron.kernels.wgrad import WGRAD_ACCUMULATE_TILES, grouped_wgrad_accumulate, tma_output_rows

    gen = torch.Generator(device="cuda").manual_seed(13)
    rows = [300, 0, 17, 517, 64, 128]
    m_dim, n_dim = 384, 200
    a = torch.randn(sum(rows), m_dim, device="cuda", generator=gen).to(torch.bfloat16)
    b = torch.randn(sum(rows), n_dim, device="cuda", generator=gen).to(torch.bfloat16)
    el, n, gap = len(rows), m_dim * n_dim, 3 * n_dim
    overwrite = knobs.get("overwrite", False)
    kw = {**WGRAD_ACCUMULATE_TILES, **knobs}
    offs = [0]
    for r in rows:
        offs.append(offs[-1] + r)
    row_offsets = torch.tensor(offs, dtype=torch.int32, device="cuda")
    for tma_out in (True, False):
        buffer, mains, before = reversed_main_grads(el, m_dim, n_dim, gap, gen, overwrite)
        base = accumulate.flat_base(mains)
        host = accumulate.element_offsets(base, mains)
        out_rows = tma_output_rows(base, host, m_dim, n_dim)
        assert out_rows is not None
        grouped_wgrad_accumulate(a, b, row_offsets, base, torch.tensor(host, dtype=torch.int64, device="cuda"),
                                 out_rows=out_rows, tma_out=tma_out, **kw)
        for e in range(el):
            want = before[e] + a[offs[e]:offs[e + 1]].double().t() @ b[offs[e]:offs[e + 1]].double()
            assert rel_err(mains[e].double(), want) < 1e-5, (tma_out, e)
        touched = torch.zeros(buffer.numel(), dtype=torch.bool, device="cuda")
        for o in host:
            touched[o:o + n] = True
        assert torch.isnan(buffer[~touched]).all()


def _round_trip(p, dtype, cfg, world):
    group = EmulatedGroup(world, capacity_tokens=max(len(x) for x in p.xs), topk=p.topk, hidden=p.hidden,
                          num_experts=p.num_experts, dtype=dtype, device="cuda")
    w1 = [p.local_w1(r, dtype).cuda() for r in range(world)]
    w2 = [p.local_w2(r, dtype).cuda() for r in range(world)]
    fwd = group.forward([x.to("cuda", dtype) for x in p.xs], [i.cuda() for i in p.topk_idx],
                        [q.cuda() for q in p.topk_probs], w1, w2, cfg)
    g = torch.Generator().manual_seed(7)
    grad_outs = [torch.randn(x.shape, generator=g).to(dtype).float() for x in p.xs]
    bwd = group.backward([s for _, s in fwd], [go.to("cuda", dtype) for go in grad_outs], w1, w2, cfg)
    return fwd, bwd, grad_outs


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("knobs", [
    # the Hopper tiles: 256-wide backward block in 4 epilogue sub-blocks, the forward's 128 in 4, gemm_combine's
    # 256-wide chunk in 4; then 8 sub-blocks each; then whole blocks
    dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, bwd_block_n=256, bwd_num_stages=3,
         bwd_epilogue_n=64, fwd_epilogue_n=32, combine_block_n=256, combine_num_stages=3, combine_epilogue_n=64),
    dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, bwd_block_n=128, bwd_num_stages=3,
         bwd_epilogue_n=16, fwd_epilogue_n=16, combine_block_n=128, combine_epilogue_n=16),
    dict(block_m=64, block_n=64, block_k=32, bwd_epilogue_n=64),
], ids=["hopper-4-pieces", "8-pieces", "whole"])
def test_fused_act_backward_compiled(world, knobs, request):
    """Epilogues on column sub-blocks (forward, fused activation backward, gemm_combine), compiled, bf16,
    against float64."""
    seed = seed_from(request.node.nodeid)
    tokens = [301 + 37 * r for r in range(world)]
    # ffn 352: the last 256-wide block is partly past F (sub-blocks entirely past it are masked)
    p = _round_problem(make_problem(seed, world=world, tokens=tokens, topk=2, hidden=256, ffn=352,
                                    experts_per_rank=3, routing="skewed"), torch.bfloat16)
    cfg = KernelConfig(num_comm_dispatch=4, num_comm_combine=4, fused_act_backward=True, **knobs)
    fwd, bwd, grad_outs = _round_trip(p, torch.bfloat16, cfg, world)
    ref = reference_rank_outputs(p)
    ref_rank, dw1, dw2 = reference_grads(p, grad_outs)
    el = p.local_experts
    for r in range(world):
        assert rel_err(fwd[r][0].cpu(), ref[r]) < 2e-2, f"forward rank {r}"
        gx, gp, gw1, gw2 = (t.cpu() for t in bwd[r])
        assert rel_err(gx, ref_rank[r][0]) < 2e-2, f"grad x rank {r}"
        assert rel_err(gp, ref_rank[r][1]) < 2e-2, f"grad probs rank {r}"
        assert rel_err(gw1, dw1[r * el:(r + 1) * el]) < 2e-2, f"dW1 rank {r}"
        assert rel_err(gw2, dw2[r * el:(r + 1) * el]) < 2e-2, f"dW2 rank {r}"


def test_fast_launch_same_results(monkeypatch, request):
    """kernels/launch.py's cached launches give what Triton's own launches give, and are used."""
    from comet_megatron.kernels import launch

    seed = seed_from(request.node.nodeid)
    p = _round_problem(make_problem(seed, world=2, tokens=[211, 173], topk=2, hidden=256, ffn=176,
                                    experts_per_rank=3, routing="skewed"), torch.float32)
    cfg = KernelConfig(block_m=64, block_n=64, block_k=32, num_comm_dispatch=4, num_comm_combine=4)
    monkeypatch.setenv("COMET_FAST_LAUNCH", "0")
    slow_fwd, slow_bwd, _ = _round_trip(p, torch.float32, cfg, 2)
    monkeypatch.setenv("COMET_FAST_LAUNCH", "1")
    _round_trip(p, torch.float32, cfg, 2)  # first time per signature: through Triton, remembered
    before = launch.stats["fast"]
    fast_fwd, fast_bwd, _ = _round_trip(p, torch.float32, cfg, 2)
    assert launch.stats["fast"] - before >= 10, launch.stats  # every kernel of both rounds, both ranks
    for r in range(2):
        assert torch.equal(fast_fwd[r][0], slow_fwd[r][0]), f"forward rank {r}"
        for a, b in zip(fast_bwd[r], slow_bwd[r]):
            assert torch.equal(a, b), f"backward rank {r}"


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", False)])
@pytest.mark.parametrize("rows,ffn", [(4096, 14336), (3001, 1408)])
def test_activation_with_prob_compiled(activation, gated, rows, ffn):
    """`kernels.activation` compiled, at Mixtral's / Qwen2-MoE's expert widths: bf16 within one rounding of
    float64, grad_prob within fp32 summation error."""
    from comet_megatron.kernels.activation import activation_forward, activation_prob_backward

    fn = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[activation]
    pre = (torch.randn(rows, 2 * ffn if gated else ffn, device="cuda") * 2).bfloat16()
    prob = torch.rand(rows, device="cuda")
    dhp = torch.randn(rows, ffn, device="cuda").bfloat16()
    p64, prob64 = pre.double().requires_grad_(True), prob.double().requires_grad_(True)
    gate, up = p64.chunk(2, dim=-1) if gated else (p64, None)
    want = fn(gate) * (up if gated else 1.0) * prob64[:, None]
    want.backward(dhp.double())
    hp = torch.full((rows, ffn), float("nan"), device="cuda", dtype=torch.bfloat16)
    activation_forward(pre, prob, activation=activation, gated=gated, out=hp)
    d_pre = torch.full_like(pre, float("nan"))
    _, grad_prob = activation_prob_backward(dhp, pre, prob, activation=activation, gated=gated, d_pre=d_pre)
    bound = 2**-8 * 1.01  # round to nearest: half a bf16 ulp (+ fp32 arithmetic inside)
    assert ((hp.double() - want.detach()).abs() <= want.detach().abs() * bound + 1e-6).all()
    assert ((d_pre.double() - p64.grad).abs() <= p64.grad.abs() * bound + 1e-6).all()
    torch.testing.assert_close(grad_prob.double(), prob64.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("tokens,hidden,topk,dtype", [(8192, 2048, 4, torch.bfloat16), (3000, 4096, 2, torch.float32),
                                                      (100, 1000, 8, torch.bfloat16)])
def test_token_sum_compiled(tokens, hidden, topk, dtype):
    """`kernels.token_sum` compiled: each token's routed rows (expert-major send order, as the reference path
    sends them) summed within one rounding of float64, bitwise the same on a second run."""
    from comet_megatron.kernels.token_sum import sum_rows_by_token, token_row_order

    experts = 16
    idx = torch.rand(tokens, experts, device="cuda").topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool, device="cuda").scatter_(1, idx, True)
    token = routing_map.t().nonzero()[:, 1].contiguous()
    rows = torch.randn(token.numel(), hidden, device="cuda").to(dtype)
    order, starts = token_row_order(token, tokens)
    out = torch.full((tokens, hidden), float("nan"), device="cuda", dtype=dtype)
    sum_rows_by_token(rows, order, starts, out=out)
    want = torch.zeros(tokens, hidden, device="cuda", dtype=torch.float64).index_add_(0, token, rows.double())
    bound = 2**-8 * 1.01 if dtype == torch.bfloat16 else 1e-6
    assert ((out.double() - want).abs() <= want.abs() * bound + 1e-5).all()
    assert torch.equal(sum_rows_by_token(rows, order, starts), out)
