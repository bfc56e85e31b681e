"""`--comet-grouped-gemm`: the reference path's expert GEMMs through the Gluon grouped GEMM (Hopper) or cuBLAS.

CPU: the tile tables built on the device from per-expert counts (`gluon_gemm.expert_tiles`) against a host-side
walk; the measured auto rule; the knob; and `grouped_linear`'s Gluon route end to end with the kernel replaced
by a plain-torch stand-in that reads the same tile tables (ascending and reversed expert weights, empty experts),
against float64. The compiled kernel: tests/gpu/test_grouped_gemm_gpu.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from comet_megatron import experts as ex
from comet_megatron.config import CometConfig, CometConfigError
from comet_megatron.experts import ExpertRows, grouped_linear
from comet_megatron.kernels import gluon_gemm
from comet_megatron.kernels.gluon_gemm import expert_tiles


def _host_tiles(counts, block_m):
    tiles, off = [], 0
    for e, c in enumerate(counts):
        for s in range(0, c, block_m):
            tiles.append((e, off + s, off + min(s + block_m, c)))
        off += c
    return tiles


@pytest.mark.parametrize("block_m", [128, 64, 16])
@pytest.mark.parametrize("seed", range(4))
def test_expert_tiles_match_a_host_walk(block_m, seed):
    g = torch.Generator().manual_seed(seed * 31 + block_m)
    experts = int(torch.randint(1, 12, (1,), generator=g))
    counts = torch.randint(0, 3 * block_m, (experts,), generator=g)
    counts[torch.rand(experts, generator=g) < 0.3] = 0  # empty experts
    counts[0] = block_m  # an exact tile
    rows = int(counts.sum())
    got = expert_tiles(counts, rows, block_m)
    want = _host_tiles(counts.tolist(), block_m)
    n = int(got.num_tiles[0])
    assert n == len(want) <= got.max_tiles == -(-rows // block_m) + experts
    assert got.tile_expert.shape == got.tile_row_start.shape == got.tile_row_end.shape == (got.max_tiles,)
    table = list(zip(got.tile_expert[:n].tolist(), got.tile_row_start[:n].tolist(), got.tile_row_end[:n].tolist()))
    assert table == want
    assert got.tile_expert.dtype == torch.int32 and int(got.tile_expert.max()) < experts  # padding stays in range


def test_expert_tiles_of_no_rows():
    got = expert_tiles(torch.zeros(5, dtype=torch.int64), 0)
    assert int(got.num_tiles[0]) == 0 and got.max_tiles == 5


def test_auto_rule_caps_the_gemm_size():
    assert gluon_gemm.auto_gemm_why_not(8192, 2048, 2816) is None  # 0.09 TFLOP
    big = gluon_gemm.auto_gemm_why_not(16384, 4096, 28672)  # Mixtral fc1 at 8192 tokens, 3.8 TFLOP
    assert big is not None and "3.85 TFLOP" in big


def test_knob_and_backend_validation():
    assert CometConfig().grouped_gemm == "auto"
    assert CometConfig(grouped_gemm="cublas").grouped_gemm == "cublas"
    with pytest.raises(CometConfigError, match="--comet-grouped-gemm='cutlass' is not one of auto, cublas, gluon"):
        CometConfig(grouped_gemm="cutlass")
    with pytest.raises(ValueError, match="one of auto, cublas, gluon"):
        ExpertRows([1, 2], gemm="triton")
    rows = ExpertRows([3, 0, 2], gemm="gluon")
    assert rows.reversed().gemm == "gluon"


def test_reason_names_why_cublas_runs():
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    w = torch.randn(2, 512, 256, dtype=torch.bfloat16)
    assert ex.gluon_gemm_reason(x, w, "cublas") == "backend cublas"
    assert "compiled CUDA" in ex.gluon_gemm_reason(x, w, "auto")  # CPU tensors
    assert "N = 500" in ex.gluon_gemm_reason(x, torch.randn(2, 500, 256, dtype=torch.bfloat16), "gluon")


def _kernel_stand_in(calls):
    """grouped_gemm_rows in plain torch over the same tile tables (float64 inside)."""

    def run(a, w, tiles, num_rows, *, reversed_experts=False, **kw):
        assert not kw
        calls.append(reversed_experts)
        el = w.shape[0]
        out = torch.full((num_rows, w.shape[2]), float("nan"), dtype=a.dtype)
        for i in range(int(tiles.num_tiles[0])):
            e, r0, r1 = (int(t[i]) for t in (tiles.tile_expert, tiles.tile_row_start, tiles.tile_row_end))
            we = w[el - 1 - e] if reversed_experts else w[e]
            out[r0:r1] = (a[r0:r1].double() @ we.double()).to(a.dtype)
        return out

    return run


@pytest.mark.parametrize("reversed_experts", [False, True], ids=["ascending", "reversed"])
@pytest.mark.parametrize("device_counts", [False, True], ids=["host-counts", "device-counts"])
def test_grouped_linear_gluon_route(reversed_experts, device_counts, monkeypatch):
    g = torch.Generator().manual_seed(7 + 2 * reversed_experts + device_counts)
    counts = [130, 0, 128, 5, 260]
    rows, k, n = sum(counts), 64, 96
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(len(counts), n, k, generator=g)  # [out, in] per expert, expert order
    calls = []
    monkeypatch.setattr(ex, "gluon_gemm_reason", lambda *a: None)
    monkeypatch.setattr(gluon_gemm, "grouped_gemm_rows", _kernel_stand_in(calls))
    stored = w.flip(0) if reversed_experts else w
    er = ExpertRows(torch.tensor(counts) if not device_counts else [0], gemm="auto")
    if device_counts:  # counts that "live on the device": the tiles come from them without a host list
        er._dev, er._host = torch.tensor(counts), None
    got = grouped_linear(x, stored, er, reversed_experts=reversed_experts)
    want = torch.cat([x[s:s + c].double() @ w[e].double().t()
                      for e, (s, c) in enumerate(zip([0, 130, 130, 258, 263], counts))])
    assert calls == [reversed_experts]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # the input gradient's GEMM reuses the same tiles
    grad_x = grouped_linear(torch.randn(rows, n, generator=g), stored.transpose(-2, -1), er, reversed_experts)
    assert grad_x.shape == (rows, k) and len(calls) == 2 and er._tiles is not None


def test_forced_gluon_falls_back_with_one_warning(caplog):
    g = torch.Generator().manual_seed(3)
    counts = [4, 0, 3]
    x = torch.randn(7, 16, generator=g)
    w = torch.randn(3, 8, 16, generator=g)
    ex._gluon_fallbacks_logged.clear()
    with caplog.at_level(logging.WARNING, logger="comet_megatron"):
        got = [grouped_linear(x, w, ExpertRows(counts, gemm="gluon")) for _ in range(2)]
    want = torch.cat([x[:4] @ w[0].t(), x[4:] @ w[2].t()])
    for y in got:
        torch.testing.assert_close(y, want)
    warnings = [r for r in caplog.records if "--comet-grouped-gemm gluon" in r.getMessage()]
    assert len(warnings) == 1 and "16-bit" in warnings[0].getMessage()
