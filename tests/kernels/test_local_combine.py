"""World size 1's layer 1 without a combine region (`gemm_combine.local_gemm_combine`): the per-token sum of
receive rows (CPU, Triton interpreter) against float64 and against combine_reduce's fp32 order, and when the
Gluon kernel is chosen. The Gluon GEMM itself is compiled-only: tests/kernels/gpu/test_gluon_layer1.py."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from comet_megatron.kernels import KernelConfig
from comet_megatron.kernels.gemm_combine import local_layer1, sum_by_pair
from comet_megatron.kernels.gluon_gemm import gluon_supported
from moe_reference import seed_from


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_from(request.node.nodeid))


@pytest.mark.parametrize("tokens,topk,hidden", [(37, 2, 72), (5, 4, 1030), (1, 1, 8), (64, 8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_by_pair(tokens, topk, hidden, dtype, gen):
    n = tokens * topk
    recv_pair = torch.randperm(n, generator=gen).to(torch.int32)  # receive row r holds pair recv_pair[r]
    rows = torch.randn(n + 3, hidden, generator=gen).to(dtype)  # rows past n: capacity, never read
    rows[n:] = float("nan")
    scalars = torch.randn(n, generator=gen)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    got, got_scalars = sum_by_pair(rows, recv_pair, tokens, topk, row_scalars=scalars, out=out)
    assert got.data_ptr() == out.data_ptr()
    by_pair = torch.empty(n, hidden, dtype=torch.float64)
    by_pair[recv_pair.long()] = rows[:n].double()
    want = by_pair.view(tokens, topk, hidden).sum(1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * topk)
    # combine_reduce's order: k ascending in fp32, rounded once
    acc = torch.zeros(tokens, hidden, dtype=torch.float32)
    for k in range(topk):
        acc += by_pair.view(tokens, topk, hidden)[:, k].to(dtype).float()
    if dtype == torch.float32:
        assert torch.equal(got, acc)
    else:  # one conversion of the fp32 sum (the interpreter truncates, a GPU rounds to nearest)
        assert ((got.double() - acc.double()).abs() <= acc.double().abs() * 2**-7).all()
    want_scalars = torch.empty(n)
    want_scalars[recv_pair.long()] = scalars
    assert torch.equal(got_scalars, want_scalars.view(tokens, topk))
    assert sum_by_pair(rows, recv_pair, tokens, topk)[1] is None


def test_sum_by_pair_checks_sizes():
    with pytest.raises(ValueError, match="pairs for 4 tokens"):
        sum_by_pair(torch.zeros(7, 8), torch.arange(7), 4, 2)


def _operands(k=1408, n=2048, el=4, dtype=torch.bfloat16, k_major=True):
    a = torch.zeros(300, k, dtype=dtype)
    w = torch.zeros(el, n, k, dtype=dtype).transpose(1, 2) if k_major else torch.zeros(el, k, n, dtype=dtype)
    return a, w


@pytest.mark.parametrize("k_major", [True, False])
def test_gluon_supported_reasons(k_major, monkeypatch):
    monkeypatch.delenv("COMET_KERNELS_GLUON", raising=False)
    a, w = _operands(k_major=k_major)
    # a shape the kernel takes: the only objection on this CPU machine is the device
    assert "compiled CUDA" in gluon_supported(a, w, 128, 256)
    assert "trace" in gluon_supported(a, w, 128, 256, trace=True)
    assert "16-bit" in gluon_supported(a.float(), w.float(), 128, 256)
    assert "tiles 64 x 256" in gluon_supported(a, w, 64, 256)
    assert "K = 1400" in gluon_supported(*_operands(k=1400, k_major=k_major), 128, 256)
    assert "N = 2000" in gluon_supported(*_operands(n=2000, k_major=k_major), 128, 256)
    neither = torch.zeros(4, 1408, 2048, 2, dtype=torch.bfloat16)[..., 0]
    assert "K or N contiguous" in gluon_supported(a, neither, 128, 256)
    monkeypatch.setenv("COMET_KERNELS_GLUON", "0")
    assert gluon_supported(a, w, 128, 256) == "COMET_KERNELS_GLUON=0"


def test_local_layer1_choice():
    a, w = _operands()
    one, two = types.SimpleNamespace(world_size=1), types.SimpleNamespace(world_size=2)
    cfg = KernelConfig(block_m=128, block_n=128, combine_block_n=256)
    assert not local_layer1(one, cfg, a, w)  # CPU: falls back to gemm_combine + combine_reduce
    assert not local_layer1(two, KernelConfig(block_m=128, combine_block_n=256, gluon_layer1=True), a, w)
    assert not local_layer1(one, KernelConfig(block_m=128, combine_block_n=256, gluon_layer1=False), a, w)
    with pytest.raises(ValueError, match="gluon_layer1=True but .*compiled CUDA"):
        local_layer1(one, KernelConfig(block_m=128, combine_block_n=256, gluon_layer1=True), a, w)


def test_local_layer1_auto_takes_short_k_only(monkeypatch):
    """Auto (None) takes the Gluon kernel where it was measured faster (K <= AUTO_MAX_K); True forces it."""
    gc = importlib.import_module("comet_megatron.kernels.gemm_combine")
    monkeypatch.setattr(gc, "gluon_supported", lambda *a, **k: None)  # as on a Hopper GPU
    one = types.SimpleNamespace(world_size=1)
    auto, on = KernelConfig(block_m=128, combine_block_n=256), KernelConfig(block_m=128, combine_block_n=256,
                                                                           gluon_layer1=True)
    short, long_ = _operands(k=gc.AUTO_MAX_K), _operands(k=gc.AUTO_MAX_K + 64)
    assert local_layer1(one, auto, *short) and not local_layer1(one, auto, *long_)
    assert local_layer1(one, on, *long_)
    assert not local_layer1(one, KernelConfig(block_m=128, combine_block_n=256, pre_reduce=True), *short)
