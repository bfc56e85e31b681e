"""`CometTokenDispatcher`: the reference transport (torch.distributed collectives).

It implements Megatron's `MoETokenDispatcher` protocol, so `MoELayer.forward` drives it stage by
stage, and works on any torch.distributed backend (gloo on CPU, NCCL on GPUs). It is the fallback
when the fused kernels cannot run (peers not reachable peer-to-peer, `--no-comet-overlap`) and the
oracle the fused kernels are tested against: its expert-input order is the fused kernels' receive
order (local expert, then source rank in ring order from this rank, then source token order).

Layout of one MoE call on EP rank r (EP size W, expert-TP size P, El local experts):
    dispatch_preprocess  tokens [T, H] -> send buffer sorted by global expert (so by destination)
    token_dispatch       all-to-all over EP: receive [src rank][local expert][token]
    dispatch_postprocess all-gather over expert-TP (sequence parallel), then regroup to
                         [local expert][ring(src)][token]
    combine_preprocess   inverse regroup, reduce-scatter over expert-TP
    token_combine        all-to-all back
    combine_postprocess  sum each token's rows (routing weights were applied by the experts)

On a GPU each token's rows are summed by `kernels.token_sum` (the combine, and the backward of the dispatch
gather): one program per token adds its rows in send order in fp32, no atomics, bitwise reproducible, ~10x
less time than PyTorch's bf16 atomic `index_add` on Qwen2-MoE's shapes. Elsewhere `index_add`, or with
`--comet-deterministic` an in-order sum. `COMET_TOKEN_SUM=auto|triton|torch` (triton: also in Triton's
interpreter, for CPU tests).

One host synchronisation remains, as in Megatron's alltoall dispatcher: the split sizes of the
variable-size all-to-all must be known on the host. At EP = expert-TP = 1 without token dropping there is
none: the routed pair count is tokens x top-k, and the experts read their row offsets on the device.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.tensor_parallel import all_to_all
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from comet_megatron.collectives import all_gather_uneven, reduce_scatter_uneven
from comet_megatron.experts import triton_pass
from comet_megatron.routing import RoutingPlan, build_routing_plan


class CometTokenDispatcher(MoETokenDispatcher):
    """Reference (collective-based) dispatcher of the comet MoE layer."""

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.num_experts = config.num_moe_experts
        self.local_expert_indices = local_expert_indices
        self.plan: Optional[RoutingPlan] = None
        # --comet-deterministic: sum each token's expert outputs in a fixed order (set by the layer)
        self.deterministic = False
        self.token_order = None  # (order, starts) of kernels.token_sum between dispatch and combine

    # ------------------------------------------------------------------ dispatch
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, self.hidden_shape[-1])
        self.plan = build_routing_plan(
            routing_map,
            probs,
            ep_group=self.ep_group,
            tp_group=self.tp_group,
            num_local_experts=self.num_local_experts,
            tp_ep_group=self.tp_ep_group,
            known_rows=self._known_rows(routing_map),
        )
        plan = self.plan
        self.token_order = None
        if triton_pass("COMET_TOKEN_SUM", hidden_states):  # its backward and the combine: kernels.token_sum
            from comet_megatron.kernels.token_sum import token_row_order

            self.token_order = token_row_order(plan.send_token_index, plan.num_tokens)
            permuted_tokens = _GatherRows.apply(hidden_states, plan.send_token_index, self.token_order)
        elif self.deterministic:  # its backward sums each token's row gradients in a fixed order
            permuted_tokens = _GatherRows.apply(hidden_states, plan.send_token_index)
        else:  # backward: index_add, atomics on GPUs
            permuted_tokens = hidden_states.index_select(0, plan.send_token_index)
        return permuted_tokens, plan.send_probs

    def _known_rows(self, routing_map) -> int | None:
        """Routed (token, expert) pairs when known without the GPU: tokens x top-k where Megatron's router
        drops or pads nothing (no capacity factor, no quantization padding), which at EP = expert-TP = 1
        spares the call its host sync."""
        cfg = self.config
        if (self.ep_size * self.tp_size != 1 or getattr(cfg, "moe_expert_capacity_factor", None) is not None
                or getattr(cfg, "moe_router_padding_for_quantization", False)
                or getattr(cfg, "moe_router_padding_for_fp8", False)):
            return None
        return routing_map.shape[0] * self.config.moe_router_topk

    def token_dispatch(self, hidden_states, probs):
        plan = self.plan
        if self.ep_size > 1:
            hidden_states = all_to_all(
                self.ep_group, hidden_states, plan.recv_splits, plan.send_splits
            )
            probs = all_to_all(self.ep_group, probs, plan.recv_splits, plan.send_splits)
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states, probs):
        plan = self.plan
        if self.tp_size > 1:
            hidden_states = all_gather_uneven(hidden_states, plan.tp_recv_splits, self.tp_group)
            probs = all_gather_uneven(probs, plan.tp_recv_splits, self.tp_group)
        if plan.regroup_index is not None:
            hidden_states = hidden_states.index_select(0, plan.regroup_index)
            probs = probs.index_select(0, plan.regroup_index)
        return hidden_states, plan.tokens_per_expert, probs

    # ------------------------------------------------------------------ combine
    def combine_preprocess(self, hidden_states):
        plan = self.plan
        if plan.regroup_index is not None:
            hidden_states = _scatter_rows(hidden_states, plan.regroup_index)
        if self.tp_size > 1:
            hidden_states = reduce_scatter_uneven(hidden_states, plan.tp_recv_splits, self.tp_group)
        return hidden_states

    def token_combine(self, hidden_states):
        plan = self.plan
        if self.ep_size > 1:
            hidden_states = all_to_all(
                self.ep_group, hidden_states, plan.send_splits, plan.recv_splits
            )
        return hidden_states

    def combine_postprocess(self, hidden_states):
        plan = self.plan
        self.plan = None
        order, self.token_order = self.token_order, None
        if order is not None:
            out = _SumRowsPerToken.apply(hidden_states, plan.send_token_index, order)
        elif self.deterministic:
            out = _sum_rows_per_token_in_order(hidden_states, plan.send_token_index, plan.num_tokens)
        else:  # index_add: atomics on GPUs, so the summation order of a token's rows may vary
            out = hidden_states.new_zeros((plan.num_tokens, hidden_states.shape[-1]))
            out = out.index_add(0, plan.send_token_index, hidden_states)
        return out.view(self.hidden_shape)


def _sum_rows_per_token_in_order(rows: torch.Tensor, token: torch.Tensor, num_tokens: int):
    """out[t] = sum of the rows of token t, added in send order (expert ascending): bitwise
    reproducible. Rows go to slots [t, j] (j = their rank among token t's rows), then the slots
    are summed along j."""
    order = torch.sort(token, stable=True).indices
    sorted_tok = token.index_select(0, order)
    first = torch.searchsorted(sorted_tok, sorted_tok, right=False)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel(), device=order.device) - first
    width = int(slot.max().item()) + 1 if slot.numel() else 1
    flat = token * width + slot
    slots = rows.new_zeros((num_tokens * width, rows.shape[-1])).index_copy(0, flat, rows)
    return slots.view(num_tokens, width, -1).sum(dim=1)


def _sum_rows(rows: torch.Tensor, order) -> torch.Tensor:
    from comet_megatron.kernels.token_sum import sum_rows_by_token

    return sum_rows_by_token(rows.contiguous(), *order)


class _GatherRows(torch.autograd.Function):
    """`x.index_select(0, token)` whose backward sums each token's row gradients in a fixed order, bitwise
    reproducible, instead of an atomic index_add: by `kernels.token_sum` when given its `order` (from
    `token_row_order`), else `_sum_rows_per_token_in_order`."""

    @staticmethod
    def forward(ctx, x, token, order=None):
        ctx.save_for_backward(token)
        ctx.num_tokens, ctx.order = x.shape[0], order
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        if ctx.order is not None:
            return _sum_rows(grad, ctx.order), None, None
        return _sum_rows_per_token_in_order(grad, token, ctx.num_tokens), None, None


class _SumRowsPerToken(torch.autograd.Function):
    """out[t] = the sum of the rows r with token[r] == t (`kernels.token_sum`, in send order); backward: a
    gather of the output gradient."""

    @staticmethod
    def forward(ctx, rows, token, order):
        ctx.save_for_backward(token)
        return _sum_rows(rows, order)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inverse of `rows.index_select(0, index)` for a permutation `index`."""
    out = torch.empty_like(rows)
    return out.index_copy(0, index, rows)
