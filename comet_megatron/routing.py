"""Routing metadata of one MoE call on the host side: the one home for split sizes and row orders.

`build_routing_plan` turns Megatron's router output (`routing_map` [T, E] bool, `probs` [T, E]) into
the send order (expert-major, then token), the all-to-all split sizes and the regrouping that gives
the expert input its canonical comet order:

    local expert  ->  source EP rank in ring order from this rank (r, r+1, ..., r-1)
                  ->  source expert-TP rank  ->  source token index

which is also the receive order of the fused `dispatch_gemm` kernel (tokens already local first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass
class RoutingPlan:
    num_tokens: int
    send_token_index: torch.Tensor  # [R_send] token id of each sent row, expert-major order
    send_probs: torch.Tensor  # [R_send] routing weight of each sent row (differentiable)
    send_splits: List[int]  # rows sent to each EP rank
    recv_splits: List[int]  # rows received from each EP rank (this TP rank's share)
    tp_recv_splits: Optional[List[int]]  # rows each expert-TP rank received (before all-gather)
    regroup_index: Optional[torch.Tensor]  # gathered order -> canonical order; None if identity
    tokens_per_expert: torch.Tensor  # [El] int64 on the CPU (on the device when `known_rows` was given)
    counts: torch.Tensor  # [W, P, E] rows each (EP rank, TP rank) sends to each expert, CPU (idem)


def ring_order(rank: int, world: int) -> List[int]:
    """Source ranks in the order rank `rank` consumes them: itself first, then the next ones."""
    return [(rank + i) % world for i in range(world)]


def _gather_counts(local_counts: torch.Tensor, group, world: int) -> torch.Tensor:
    if world == 1 or group is None:
        return local_counts.unsqueeze(0)
    parts = [torch.empty_like(local_counts) for _ in range(world)]
    dist.all_gather(parts, local_counts.contiguous(), group=group)
    return torch.stack(parts)


def _nonzero_known(mask: torch.Tensor, count: int) -> torch.Tensor:
    """`mask.nonzero()` when the number of True entries is already known on the host: no device sync."""
    try:
        return torch.nonzero_static(mask, size=count)
    except (NotImplementedError, RuntimeError, AttributeError):  # a build without it for this device
        return mask.nonzero()


def build_routing_plan(
    routing_map: torch.Tensor,
    probs: torch.Tensor,
    *,
    ep_group,
    tp_group,
    num_local_experts: int,
    tp_ep_group=None,
    known_rows: int | None = None,
) -> RoutingPlan:
    """Compute the send order, split sizes and regrouping for one MoE call.

    Host synchronisation: one, for the gathered per-(rank, expert) counts, which size the
    all-to-all. The counts are exchanged over the expert-TP x EP ranks (EP-major ordering, as
    Megatron's `tp_ep` group). None at EP = expert-TP = 1 when the caller knows the number of routed
    (token, expert) pairs (`known_rows`: tokens x top-k when the router drops nothing): the plan's counts
    then stay on the device.
    """
    if routing_map.dtype != torch.bool or routing_map.dim() != 2:
        raise ValueError("routing_map must be a [tokens, experts] bool tensor")
    num_tokens, num_experts = routing_map.shape
    ep = dist.get_world_size(ep_group) if ep_group is not None else 1
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    ep_rank = dist.get_rank(ep_group) if ep > 1 else 0
    tp_rank = dist.get_rank(tp_group) if tp > 1 else 0
    el = num_local_experts
    if el * ep != num_experts:
        raise ValueError(f"{num_experts} experts do not split into {ep} EP ranks x {el} local")

    map_t = routing_map.t().contiguous()  # [E, T]
    local_counts = map_t.sum(dim=1).to(torch.int64)  # [E]
    if ep * tp == 1 and known_rows is not None:
        # one rank: nothing to size on the host; the experts read their row offsets on the device
        pairs = _nonzero_known(map_t, known_rows)
        send_token_index = pairs[:, 1].contiguous()
        send_probs = probs.t().reshape(-1).index_select(0, pairs[:, 0] * num_tokens + pairs[:, 1])
        return RoutingPlan(num_tokens=num_tokens, send_token_index=send_token_index, send_probs=send_probs,
                           send_splits=[known_rows], recv_splits=[known_rows], tp_recv_splits=None,
                           regroup_index=None, tokens_per_expert=local_counts,
                           counts=local_counts.view(1, 1, num_experts))

    # Gather everyone's counts: [W, P, E] indexed (ep rank, tp rank, expert).
    if ep * tp > 1:
        group = tp_ep_group
        if group is None:
            # Two-step exchange when no joint group is given: over TP, then over EP.
            tp_counts = _gather_counts(local_counts, tp_group, tp)  # [P, E]
            counts = _gather_counts(tp_counts, ep_group, ep)  # [W, P, E]
        else:
            counts = _gather_counts(local_counts, group, ep * tp).view(ep, tp, num_experts)
    else:
        counts = local_counts.view(1, 1, num_experts)
    counts = counts.cpu()  # the one host synchronisation of the call
    own = counts[ep_rank, tp_rank]  # == local_counts

    # Send order: (expert, token) pairs, expert-major then token ascending. The row count is known on the
    # host now, so the pairs come without another synchronisation (nonzero_static; nonzero otherwise).
    pairs = _nonzero_known(map_t, int(own.sum()))
    send_token_index = pairs[:, 1].contiguous()
    send_probs = probs.t().reshape(-1).index_select(0, pairs[:, 0] * num_tokens + pairs[:, 1])

    mine = slice(ep_rank * el, (ep_rank + 1) * el)
    send_splits = own.view(ep, el).sum(dim=1).tolist()
    # c[q][s][e]: rows expert-TP rank q of this EP rank received from EP rank s for local expert e
    c = counts[:, :, mine].permute(1, 0, 2).contiguous()  # [P, W, El]
    recv_splits = c[tp_rank].sum(dim=1).tolist()
    tp_recv_splits = c.sum(dim=(1, 2)).tolist() if tp > 1 else None
    tokens_per_expert = c.sum(dim=(0, 1)).to(torch.int64)

    regroup_index = None
    if ep * tp > 1 and el * ep * tp > 1:
        sizes = c.flatten().tolist()
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        chunks = []
        ring = ring_order(ep_rank, ep)
        for e in range(el):
            for s in ring:
                for q in range(tp):
                    i = (q * ep + s) * el + e
                    if sizes[i]:
                        chunks.append(torch.arange(offsets[i], offsets[i + 1]))
        if chunks:
            regroup_index = torch.cat(chunks).to(routing_map.device)
        else:
            regroup_index = torch.empty(0, dtype=torch.int64, device=routing_map.device)
    return RoutingPlan(
        num_tokens=num_tokens,
        send_token_index=send_token_index,
        send_probs=send_probs,
        send_splits=send_splits,
        recv_splits=recv_splits,
        tp_recv_splits=tp_recv_splits,
        regroup_index=regroup_index,
        tokens_per_expert=tokens_per_expert,
        counts=counts,
    )
