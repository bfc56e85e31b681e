"""`kernels.activation`: the expert MLP's activation x routing prob and its backward, one pass each way,
against the same sums in float64 PyTorch (autograd for the backward), on outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comet_megatron.kernels.activation import activation_forward, activation_prob_backward

TORCH_ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _reference(pre, prob, dhp, activation, gated):
    pre = pre.double().requires_grad_(True)
    prob = prob.double().requires_grad_(True)
    if gated:
        gate, up = pre.chunk(2, dim=-1)
        h = TORCH_ACT[activation](gate) * up
    else:
        h = TORCH_ACT[activation](pre)
    hp = h * prob[:, None]
    hp.backward(dhp.double())
    return hp.detach(), pre.grad, prob.grad


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("rows,ffn", [(37, 20), (64, 160), (1, 129)])
def test_activation_forward_backward_fp32(activation, gated, rows, ffn):
    gen = torch.Generator().manual_seed(hash((activation, gated, rows, ffn)) % 2**31)
    pre = torch.randn(rows, 2 * ffn if gated else ffn, generator=gen) * 2
    prob = torch.rand(rows, generator=gen)
    dhp = torch.randn(rows, ffn, generator=gen)
    want_hp, want_dpre, want_dprob = _reference(pre, prob, dhp, activation, gated)
    hp = torch.full((rows, ffn), float("nan"))
    activation_forward(pre, prob, activation=activation, gated=gated, out=hp)
    d_pre = torch.full_like(pre, float("nan"))
    d_pre, grad_prob = activation_prob_backward(dhp, pre, prob, activation=activation, gated=gated, d_pre=d_pre)
    torch.testing.assert_close(hp.double(), want_hp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_pre.double(), want_dpre, rtol=1e-5, atol=1e-5)
    assert grad_prob.dtype == torch.float32
    torch.testing.assert_close(grad_prob.double(), want_dprob, rtol=1e-5, atol=1e-4)


def test_activation_bf16_rounds_once():
    """bf16 in and out: within one bf16 ulp of the float64 result (fp32 inside the kernel, one conversion at the
    end; Triton's interpreter converts by truncation, a GPU to nearest)."""
    gen = torch.Generator().manual_seed(5)
    rows, ffn = 50, 96
    pre = (torch.randn(rows, 2 * ffn, generator=gen) * 2).bfloat16()
    prob = torch.rand(rows, generator=gen)
    dhp = torch.randn(rows, ffn, generator=gen).bfloat16()
    want_hp, want_dpre, want_dprob = _reference(pre, prob, dhp, "silu", True)
    hp = activation_forward(pre, prob)
    d_pre, grad_prob = activation_prob_backward(dhp, pre, prob)
    assert hp.dtype == d_pre.dtype == torch.bfloat16
    # one conversion: |err| < 2^-7 |x| (bf16 has 8 significant bits)
    assert ((hp.double() - want_hp).abs() <= want_hp.abs() * 2**-7).all()
    assert ((d_pre.double() - want_dpre).abs() <= want_dpre.abs() * 2**-7).all()
    torch.testing.assert_close(grad_prob.double(), want_dprob, rtol=1e-5, atol=1e-4)


def test_activation_rejects_bad_shapes():
    pre = torch.randn(4, 6)
    with pytest.raises(ValueError, match="one value per row"):
        activation_forward(pre, torch.rand(3))
    with pytest.raises(ValueError, match="not an even number"):
        activation_forward(torch.randn(4, 5), torch.rand(4))
    with pytest.raises(ValueError, match="the kernels implement"):
        activation_forward(pre, torch.rand(4), activation="tanh")
    with pytest.raises(ValueError, match="dhp must be"):
        activation_prob_backward(torch.randn(4, 6), pre, torch.rand(4))
    with pytest.raises(ValueError, match="contiguous rows"):
        activation_forward(torch.randn(6, 4).t(), torch.rand(4), gated=False)
