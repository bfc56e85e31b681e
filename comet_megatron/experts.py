"""`CometGroupedMLP`: the expert module of the comet MoE layer.

Parameters, their names (`local_experts.{i}.linear_fc1.weight`, ...), shapes and the sharded state
dict are exactly those of Megatron's `SequentialMLP` (it is a subclass that keeps them), and
Megatron makes `TEGroupedMLP`'s sharded state dict interchangeable with `SequentialMLP`'s: a
distributed checkpoint moves between comet and either Megatron expert module, both ways.

The forward runs all local experts as grouped GEMMs (`grouped_linear`) instead of a Python loop
of per-expert MLPs: `torch._grouped_mm` (cuBLAS) on CUDA in bf16, a per-expert matmul elsewhere.
Semantics follow Megatron's `MLP` with `per_token_scale`:

    y = fc2( act(fc1(x) + b1) * p ) + b2 * p
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    # cuBLAS grouped GEMM wants 16-byte aligned rows.
    return x.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """rows of `x` [M, K] in expert segments of `counts` times `weight[e]`^T ([G, N, K]) -> [M, N].

    Megatron stores linear weights as [out, in]; the grouped GEMM reads them transposed in place.
    """
    if _grouped_mm_ok(x, weight):
        offs = torch.tensor(counts, device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    outs = [xe @ weight[e].t() for e, xe in enumerate(torch.split(x, list(counts)))]
    if not outs:
        return x.new_empty((0, weight.shape[-2]))
    return torch.cat(outs)


def activation(config, pre: torch.Tensor) -> torch.Tensor:
    """Megatron MLP's activation (optionally gated), exactly as `MLP.forward` computes it."""
    if config.gated_linear_unit:
        x_glu, x_linear = torch.chunk(pre, 2, dim=-1)
        clamp = config.activation_func_clamp_value
        if clamp is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
    return config.activation_func(pre)


def is_swiglu(config) -> bool:
    return bool(config.gated_linear_unit) and config.activation_func is F.silu


class _StackedView(torch.autograd.Function):
    """[G, ...] view over G equally shaped parameters that lie back to back in one storage.

    Backward hands each parameter its slice of the stacked gradient: no copy either way."""

    @staticmethod
    def forward(ctx, *params):
        first = params[0]
        return first.as_strided((len(params), *first.shape), (first.numel(), *first.stride()))

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad.unbind(0))


def _back_to_back(params) -> bool:
    first = params[0]
    if not first.is_contiguous():
        return False
    step = first.numel() * first.element_size()
    storage = first.untyped_storage().data_ptr()
    return all(
        p.shape == first.shape and p.dtype == first.dtype and p.is_contiguous()
        and p.untyped_storage().data_ptr() == storage
        and p.data_ptr() == first.data_ptr() + i * step
        for i, p in enumerate(params)
    )


def stack_weights(params) -> torch.Tensor:
    """Differentiable [G, ...] stack of `params`: a view when they lie back to back (as
    `CometGroupedMLP` allocates them), else a copy (e.g. after a wrapper re-homed them)."""
    if _back_to_back(params):
        return _StackedView.apply(*params)
    return torch.stack(list(params))


class CometGroupedMLP(SequentialMLP):
    """SequentialMLP's parameters and checkpoint layout; grouped-GEMM forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Put each linear's expert weights back to back in one storage, so that the grouped
        # GEMMs read them as one [El, out, in] tensor without a per-call copy.
        for linear in ("linear_fc1", "linear_fc2"):
            params = [getattr(e, linear).weight for e in self.local_experts]
            stacked = torch.stack([p.detach() for p in params])
            for i, p in enumerate(params):
                p.data = stacked[i]

    def fc_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ([El, F1, H], [El, H, F]) views of the experts' weights (differentiable)."""
        w1 = stack_weights([e.linear_fc1.weight for e in self.local_experts])
        w2 = stack_weights([e.linear_fc2.weight for e in self.local_experts])
        return w1, w2

    def fc_biases(self):
        b1 = [e.linear_fc1.bias for e in self.local_experts]
        b2 = [e.linear_fc2.bias for e in self.local_experts]
        b1 = torch.stack(b1) if b1[0] is not None else None
        b2 = torch.stack(b2) if b2[0] is not None else None
        return b1, b2

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        x = permuted_local_hidden_states
        counts: List[int] = (
            tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        )
        probs = permuted_probs.unsqueeze(-1)
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1")
            x = (probs * x).to(x.dtype)
            probs = torch.ones_like(probs)
        w1, w2 = self.fc_weights()
        b1, b2 = self.fc_biases()
        pre = grouped_linear(x, w1, counts)
        if b1 is not None:
            pre = pre + _per_row(b1, counts)
        h = activation(self.config, pre)
        h = (h * probs).to(h.dtype)
        y = grouped_linear(h, w2, counts)
        if b2 is not None:
            y = (y + _per_row(b2, counts) * probs).to(y.dtype)
        return y, None


def _per_row(bias: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Expand per-expert biases [G, N] to one row per token [M, N]."""
    idx = torch.repeat_interleave(
        torch.arange(len(counts), device=bias.device),
        torch.tensor(list(counts), device=bias.device),
    )
    return bias.index_select(0, idx)
