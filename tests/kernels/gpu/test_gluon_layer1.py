"""The Gluon layer-1 kernel (kernels/gluon_gemm.py, Hopper only, compiled): grouped GEMM rows against float64
with ragged and empty experts, both weight layouts, experts stored in reverse, strided (gapped) experts, the
prob scale and every column block; and world-1 rounds through it against float64 and against the Triton
gemm_combine path. Run with `pytest -m gpu tests/kernels/gpu`."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from comet_megatron.kernels import EmulatedGroup, KernelConfig
from comet_megatron.kernels.gluon_gemm import grouped_gemm_rows, gluon_supported
from moe_reference import make_problem, reference_grads, reference_rank_outputs, rel_err, seed_from

gc = importlib.import_module("comet_megatron.kernels.gemm_combine")  # the module (the package exports the function)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
                       reason="the Gluon layer-1 kernel is Hopper-only (other GPUs keep gemm_combine)"),
]


def _tiles(counts, bm=128):
    """A ReceiveLayout's tile tables for rows grouped by expert (expert ascending), padded as the real ones."""
    expert, start, end, off = [], [], [], 0
    for e, c in enumerate(counts):
        for s in range(0, c, bm):
            expert.append(e), start.append(off + s), end.append(off + min(s + bm, c))
        off += c
    pad = 3  # entries past num_tiles are unspecified in a real layout: garbage here
    dev = "cuda"
    t = lambda v: torch.tensor(v + [-7] * pad, dtype=torch.int32, device=dev)  # noqa: E731
    return types.SimpleNamespace(tile_expert=t(expert), tile_row_start=t(start), tile_row_end=t(end),
                                 num_tiles=torch.tensor([len(expert)] * 2, dtype=torch.int32, device=dev),
                                 max_tiles=len(expert) + pad), off


@pytest.mark.parametrize("block_n", [256, 128, 64])
@pytest.mark.parametrize("k_major", [True, False], ids=["k-major", "n-major"])
@pytest.mark.parametrize("stored", ["dense", "reversed-gapped"])
@pytest.mark.parametrize("scale", [True, False])
def test_grouped_gemm_rows(block_n, k_major, stored, scale, request):
    g = torch.Generator().manual_seed(seed_from(request.node.nodeid))
    counts = [300, 0, 128, 77, 513]  # ragged last tiles, an empty expert, an exact tile
    el, k, n = len(counts), 384, 512
    layout, rows = _tiles(counts)
    a = torch.randn(rows + 9, k, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(el, k, n, generator=g) / k ** 0.5).to(torch.bfloat16)  # math: expert e is w[e] [K, N]
    order = list(range(el))[::-1] if stored == "reversed-gapped" else list(range(el))
    gap = 64 if stored == "reversed-gapped" else 0  # experts apart in memory, as the distributed optimizer's
    if k_major:  # memory [El, N, K]
        buf = torch.full((el, n * k + gap), float("nan"), dtype=torch.bfloat16)
        buf[:, :n * k] = w[order].transpose(1, 2).reshape(el, -1)
        wv = buf.cuda()[:, :n * k].view(el, n, k).transpose(1, 2)
    else:
        buf = torch.full((el, k * n + gap), float("nan"), dtype=torch.bfloat16)
        buf[:, :k * n] = w[order].reshape(el, -1)
        wv = buf.cuda()[:, :k * n].view(el, k, n)
    assert (wv.stride(1) == 1) == k_major and gluon_supported(a, wv, 128, block_n) is None
    prob = torch.rand(rows + 9, generator=g).cuda() if scale else None
    out = torch.full((rows + 4, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = grouped_gemm_rows(a, wv, layout, rows, prob=prob, block_n=block_n, reversed_experts=order[0] != 0,
                            out=out)
    assert got.shape == (rows, n) and got.data_ptr() == out.data_ptr()
    torch.cuda.synchronize()
    want = torch.empty(rows, n, dtype=torch.float64)
    off = 0
    for e, c in enumerate(counts):
        want[off:off + c] = a[off:off + c].cpu().double() @ w[e].double()
        off += c
    if scale:
        want *= prob[:rows].cpu().double()[:, None]
    assert rel_err(got.cpu().float(), want.float()) < 1e-2
    assert torch.isnan(out[rows:]).all()  # nothing written past the receive rows


@pytest.mark.parametrize("topk,routing", [(2, "skewed"), (4, "sparse")])
def test_world1_round_gluon_vs_triton(topk, routing, monkeypatch, request):
    """moe_forward / moe_backward at world size 1 take the Gluon layer 1 (both rounds), and match float64 and
    the Triton gemm_combine + combine_reduce path."""
    seed = seed_from(request.node.nodeid)
    p = make_problem(seed, world=1, tokens=[517], topk=topk, hidden=256, ffn=384, experts_per_rank=5,
                     routing=routing)
    dtype = torch.bfloat16
    p.xs = [x.to(dtype).float() for x in p.xs]
    p.w1, p.w2 = p.w1.to(dtype).float(), p.w2.to(dtype).float()
    calls = []
    real = gc.grouped_gemm_rows
    monkeypatch.setattr(gc, "grouped_gemm_rows", lambda *a, **k: calls.append(k.get("prob") is not None)
                        or real(*a, **k))
    results = {}
    for gluon in (None, False):
        group = EmulatedGroup(1, capacity_tokens=517, topk=topk, hidden=256, num_experts=p.num_experts,
                              dtype=dtype, device="cuda")
        cfg = KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, combine_block_n=256,
                           gluon_layer1=gluon)
        w1, w2 = [p.local_w1(0, dtype).cuda()], [p.local_w2(0, dtype).cuda()]
        fwd = group.forward([p.xs[0].to("cuda", dtype)], [p.topk_idx[0].cuda()], [p.topk_probs[0].cuda()], w1, w2,
                            cfg)
        grad_out = torch.randn(p.xs[0].shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).float()
        bwd = group.backward([fwd[0][1]], [grad_out.to("cuda", dtype)], w1, w2, cfg)
        results[gluon] = (fwd[0][0].cpu(), [t.cpu() for t in bwd[0]], grad_out)
        if gluon is None:
            assert calls == [True, False], calls  # forward (prob-scaled) and backward rounds went through Gluon
    ref = reference_rank_outputs(p)[0]
    for gluon, (out, (gx, gp, gw1, gw2), grad_out) in results.items():
        ref_rank, dw1, dw2 = reference_grads(p, [grad_out])
        assert rel_err(out, ref) < 2e-2, f"forward gluon={gluon}"
        assert rel_err(gx, ref_rank[0][0]) < 2e-2, f"grad x gluon={gluon}"
        assert rel_err(gp, ref_rank[0][1]) < 2e-2, f"grad probs gluon={gluon}"
        assert rel_err(gw1, dw1) < 2e-2 and rel_err(gw2, dw2) < 2e-2, f"weight grads gluon={gluon}"
    (o1, b1, _), (o2, b2, _) = results[None], results[False]
    assert rel_err(o1, o2.float()) < 1e-2 and rel_err(b1[0], b2[0].float()) < 1e-2
    assert torch.equal(b1[1], b2[1])  # grad of the probs: the same fp32 row scalars, only moved


def test_gluon_fast_launch_same_results(monkeypatch, request):
    """kernels/launch.py's cached launch of the Gluon kernel (its descriptors in the signature) gives what
    Gluon's own launch gives, and is used."""
    from comet_megatron.kernels import launch

    g = torch.Generator().manual_seed(seed_from(request.node.nodeid))
    counts = [200, 131, 0, 300]
    layout, rows = _tiles(counts)
    a = torch.randn(rows, 256, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(4, 512, 256, generator=g) / 16).to(torch.bfloat16).cuda().transpose(1, 2)  # K-major
    prob = torch.rand(rows, generator=g).cuda()
    outs = []
    for fast in ("0", "1", "1", "1"):
        monkeypatch.setenv("COMET_FAST_LAUNCH", fast)
        before = launch.stats["fast"]
        outs.append(grouped_gemm_rows(a, w, layout, rows, prob=prob, out=torch.full((rows, 512), float("nan"),
                                      dtype=torch.bfloat16, device="cuda")).clone())
        fast_used = launch.stats["fast"] - before
    assert fast_used == 1  # the last call went through the cached launcher
    assert all(torch.equal(o, outs[0]) for o in outs[1:]) and not torch.isnan(outs[0]).any()
