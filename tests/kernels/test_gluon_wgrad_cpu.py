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
