"""Variable-size all-gather / reduce-scatter with autograd, on any torch.distributed backend.

Megatron's sequence-parallel mappings hand uneven split sizes to `all_gather`, which gloo rejects
("invalid tensor size"). The reference transport uses these instead: pad to the largest split,
use equal-size collectives, slice. They are the oracle path, not the fast one.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def _all_gather_padded(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    world = len(sizes)
    longest = max(sizes) if sizes else 0
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _reduce_scatter_by_allreduce(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    return total[start : start + sizes[rank]].contiguous()


class _AllGatherUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_by_allreduce(grad, ctx.sizes, ctx.group), None, None


class _ReduceScatterUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _reduce_scatter_by_allreduce(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_padded(grad, ctx.sizes, ctx.group), None, None


def all_gather_uneven(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenate every rank's `x` (rank i contributes `sizes[i]` rows); backward reduce-scatters."""
    return _AllGatherUneven.apply(x, list(sizes), group)


def reduce_scatter_uneven(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Sum `x` over ranks and keep this rank's `sizes[rank]` rows; backward all-gathers."""
    return _ReduceScatterUneven.apply(x, list(sizes), group)
