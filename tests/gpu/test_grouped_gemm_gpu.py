"""`grouped_linear` through the compiled Gluon grouped GEMM (`--comet-grouped-gemm`, Hopper) against float64 and
against cuBLAS: ragged and empty experts, device counts (no host sync), experts stored in reverse (the distributed
optimizer's layout), bf16 and fp16, both GEMM orientations (forward: weights read K-major; input gradient:
N-major). The kernel's output buffer is poisoned before it writes. Run with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
                       reason="the Gluon grouped GEMM is Hopper-only (elsewhere --comet-grouped-gemm runs cuBLAS)"),
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stored", ["ascending", "reversed"])
@pytest.mark.parametrize("orientation", ["forward", "input-grad"])
@pytest.mark.parametrize("backend", ["gluon", "auto"])
def test_grouped_linear_through_gluon(dtype, stored, orientation, backend, monkeypatch):
    from comet_megatron import experts as ex
    from comet_megatron.experts import ExpertRows, grouped_linear
    from comet_megatron.kernels import gluon_gemm

    g = torch.Generator().manual_seed(hash((str(dtype), stored, orientation, backend)) % 2**31)
    counts = [300, 0, 128, 77, 513, 1]
    rows, out_f, in_f = sum(counts), 512, 768  # both widths divisible by 256: either orientation runs Gluon
    w = (torch.randn(len(counts), out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)  # [out, in], expert order
    if orientation == "input-grad":  # grad_x = grad_y @ W[e]: the weight transposed, N-major
        weight, k = w.transpose(-2, -1), out_f
    else:
        weight, k = w, in_f
    x = torch.randn(rows, k, generator=g).to(dtype).cuda()
    rev = stored == "reversed"
    dev_w = (weight.flip(0) if rev else weight).cuda()
    ran = []
    real = gluon_gemm.grouped_gemm_rows

    def spy(a, wm, tiles, num_rows, **kw):  # poison the buffer the kernel writes
        out = torch.full((num_rows + 3, wm.shape[2]), float("nan"), dtype=a.dtype, device=a.device)
        ran.append(kw.get("reversed_experts"))
        y = real(a, wm, tiles, num_rows, out=out, **kw)
        assert torch.isnan(out[num_rows:]).all()  # nothing past the rows
        return y

    monkeypatch.setattr(gluon_gemm, "grouped_gemm_rows", spy)
    er = ExpertRows(torch.tensor(counts).cuda(), rows=rows, gemm=backend)  # device counts
    got = grouped_linear(x, dev_w, er, reversed_experts=rev)
    assert ran == [rev]
    want = torch.cat([x[s:s + c].cpu().double() @ weight[e].double().t()
                      for e, (s, c) in enumerate(zip([0, 300, 300, 428, 505, 1018], counts))])
    assert got.dtype == dtype and got.shape == want.shape
    assert _rel(got.cpu(), want) < 1e-2
    if dtype == torch.bfloat16:  # cuBLAS on the same operands, same rounding of the fp32 accumulator
        cub = grouped_linear(x, dev_w, ExpertRows(counts, gemm="cublas"), reversed_experts=rev)
        assert _rel(got, cub) < 5e-3
    assert ex.gluon_gemm_reason(x, dev_w, backend) is None


def test_auto_leaves_large_gemms_to_cublas(monkeypatch):
    from comet_megatron.experts import ExpertRows, grouped_linear
    from comet_megatron.kernels import gluon_gemm

    monkeypatch.setattr(gluon_gemm, "AUTO_MAX_GEMM_FLOPS", 1e6)  # every GEMM here is "large"
    ran = []
    monkeypatch.setattr(gluon_gemm, "grouped_gemm_rows", lambda *a, **k: ran.append(1))
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
    y = grouped_linear(x, w, ExpertRows([100, 156], gemm="auto"))
    assert not ran and y.shape == (256, 256)
    torch.testing.assert_close(y[:100].float(), (x[:100].float() @ w[0].float().t()), rtol=2e-2, atol=2e-1)
