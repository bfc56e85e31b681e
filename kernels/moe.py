"""One rank's MoE forward and backward rounds, written as phase generators.

Each function is a generator that yields the NAME of the phase it just finished at the two points where
the rank depends on work of the other ranks, and returns its result:

    forward round:  publish          | receive_layout + dispatch_gemm + gemm_combine | combine_reduce
    backward round: publish(grad_out) | dispatch_gemm_backward + gemm_combine        | combine_reduce

A real rank (each process drives its own GPU) simply exhausts its generator (`run_rank`): the kernels
wait on device-side signals. Emulated ranks in one process (`emulated.py`, Triton's sequential CPU
interpreter) are driven phase by phase across ranks (`run_ranks`), so every producer runs before its
consumers and nothing deadlocks. Both paths run the same code.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch

from .config import KernelConfig
from .dispatch_gemm import DispatchResult, dispatch_gemm, dispatch_gemm_backward
from .gemm_combine import combine_reduce, gemm_combine, local_gemm_combine, local_layer1
from .routing import ReceiveLayout, publish, receive_layout
from .signals import check_errors
from .wgrad import grouped_wgrad


@dataclass
class ForwardState:
    """What the backward round and the weight gradients need from the forward round."""

    layout: ReceiveLayout
    dispatch: DispatchResult  # recv (x rows), pair/src/prob of rows, pre (out = h is dropped)
    num_tokens: int
    combine_trace: torch.Tensor | None
    topk_idx: torch.Tensor | None = None  # [T, K]: the owner's slot mask when the combine pre-reduces


@dataclass
class BackwardState:
    dispatch: DispatchResult  # recv (grad_out rows), out = d_pre, grad_prob
    combine_trace: torch.Tensor | None


Phases = Generator[str, None, tuple]


def moe_forward(view, x: torch.Tensor, topk_idx: torch.Tensor, topk_probs: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, cfg: KernelConfig, reversed_experts: tuple[bool, bool] = (False, False)) -> Phases:
    """Forward round. Returns (out [T, H], ForwardState). w1: [El, H, F1], w2: [El, F, H];
    `reversed_experts` (w1's, w2's): that weight holds the experts in reversed order ([i] is expert El-1-i's)."""
    epoch = view.next_epoch()
    publish(view, x, epoch, topk_idx, topk_probs)
    yield "publish"
    layout = receive_layout(view, epoch, cfg.block_m)
    if view.world_size == 1:  # the rank receives every (token, slot) pair it sent: no host sync for the count
        layout.known_rows = topk_idx.numel()
        layout.start_host_copy()  # the per-expert offsets, if the weight gradients ask, without draining the GPU
    rev1, rev2 = reversed_experts
    d = dispatch_gemm(view, layout, w1, epoch, store_pre=True, reversed_experts=rev1, **cfg.dispatch_kwargs())
    if local_layer1(view, cfg, d.out, w2):  # world size 1: no combine region, no signals
        out, _ = local_gemm_combine(layout, d.out, w2, x.shape[0], view.layout.topk, recv_pair=d.recv_pair,
                                    recv_prob=d.recv_prob, reversed_experts=rev2, **cfg.local_combine_kwargs())
        d.out = None
        yield "dispatch_gemm+gemm_combine"
        return out, ForwardState(layout, d, x.shape[0], None, topk_idx)
    trace = gemm_combine(view, layout, d.out, w2, epoch, recv_pair=d.recv_pair, recv_src=d.recv_src,
                         recv_prob=d.recv_prob, reversed_experts=rev2, **cfg.combine_kwargs())
    # The backward's activation backward (epilogue or separate pass) recomputes h * p from pre: h need not
    # live until backward ([R, F] per layer). Freeing it now is stream-ordered: the pending gemm_combine
    # still reads it.
    d.out = None
    yield "dispatch_gemm+gemm_combine"
    out, _ = combine_reduce(view, x.shape[0], epoch, num_comm=cfg.num_comm_combine, block_h=cfg.block_h,
                            topk_idx=topk_idx if cfg.pre_reduce else None)
    return out, ForwardState(layout, d, x.shape[0], trace, topk_idx)


def moe_backward(view, state: ForwardState, grad_out: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 cfg: KernelConfig, reversed_experts: tuple[bool, bool] = (False, False)) -> Phases:
    """Backward round (weight gradients excluded, see `expert_weight_grads`; `reversed_experts` as in
    `moe_forward`).

    Returns (grad_x [T, H], grad_probs [T, K] fp32, BackwardState).
    """
    epoch = view.next_epoch()
    publish(view, grad_out, epoch)
    yield "publish(grad_out)"
    rev1, rev2 = reversed_experts
    b = dispatch_gemm_backward(view, state.layout, state.dispatch, w2, epoch, reversed_experts=rev2,
                               **cfg.dispatch_kwargs(backward=True))
    if local_layer1(view, cfg, b.out, w1.transpose(1, 2)):
        grad_x, grad_probs = local_gemm_combine(state.layout, b.out, w1.transpose(1, 2), state.num_tokens,
                                                view.layout.topk, recv_pair=b.recv_pair, row_scalars=b.grad_prob,
                                                reversed_experts=rev1, **cfg.local_combine_kwargs())
        yield "dispatch_gemm_backward+gemm_combine"
        return grad_x, grad_probs, BackwardState(b, None)
    trace = gemm_combine(view, state.layout, b.out, w1.transpose(1, 2), epoch, recv_pair=b.recv_pair,
                         recv_src=b.recv_src, row_scalars=b.grad_prob, reversed_experts=rev1,
                         **cfg.combine_kwargs())
    yield "dispatch_gemm_backward+gemm_combine"
    grad_x, grad_probs = combine_reduce(view, state.num_tokens, epoch, num_comm=cfg.num_comm_combine,
                                        scalars=True, block_h=cfg.block_h,
                                        topk_idx=state.topk_idx if cfg.pre_reduce else None)
    return grad_x, grad_probs, BackwardState(b, trace)


def expert_weight_grads(fwd: ForwardState, bwd: BackwardState, *, backend: str = "auto",
                        out_dtype: torch.dtype | None = None,
                        out_features_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW1 [El, H, F1], dW2 [El, F, H]) from the saved receive rows; deferrable (no communication).

    dW1[e] = recv_x[e]^T @ d_pre[e];  dW2[e] = (h * p)[e]^T @ grad_out_rows[e] (h * p written by the
    backward's activation backward).
    With `out_features_first`, the same gradients in the [out, in] layout of linear-layer weights
    (dW1 [El, F1, H], dW2 [El, H, F]), computed directly in that layout (no transposed copy).
    """
    offsets = fwd.layout.expert_offsets
    pairs = weight_grad_operands(fwd, bwd, out_features_first=out_features_first)
    dw1, dw2 = (grouped_wgrad(a, b, offsets, backend=backend, out_dtype=out_dtype) for a, b in pairs)
    return dw1, dw2


def weight_grad_operands(fwd: ForwardState, bwd: BackwardState, *, out_features_first: bool = False):
    """[(a1, b1), (a2, b2)]: receive-row operands with dW1[e] = a1[rows_e]^T @ b1[rows_e] and likewise dW2
    (rows_e: `fwd.layout.expert_offsets`), for callers that run the weight-gradient GEMMs themselves."""
    d = fwd.dispatch
    hp = bwd.dispatch.hp  # h * p, written by the backward's activation backward
    pairs = [(d.recv, bwd.dispatch.out), (hp, bwd.dispatch.recv)]
    if out_features_first:
        pairs = [(b, a) for a, b in pairs]
    return pairs


def run_rank(phases: Phases, view=None):
    """Drive one rank's round to the end (real ranks).

    With `view`, the error buffer is read once, when the round is over (one host sync), and a timed-out
    wait raises `SignalTimeout` naming the kernel and the flag. Checking after every phase would add a
    host sync per phase and buys nothing: once a wait of the rank has failed, every later wait of the
    round gives up at once (`signals.wait_until_geq`), so the round ends quickly and nothing hangs.
    Without `view` the caller checks later with `signals.check_errors(view)`.
    """
    try:
        while True:
            next(phases)
    except StopIteration as stop:
        if view is not None:
            check_errors(view)
        return stop.value


def run_ranks(phases: Sequence[Phases], views: Sequence) -> list:
    """Drive emulated ranks phase by phase (every rank finishes phase i before any rank starts i + 1).

    Checks every rank's error buffer after each phase, so a peer that never signals raises
    `signals.SignalTimeout` naming the rank, the phase and the flag.
    """
    results: list = [None] * len(phases)
    live = list(range(len(phases)))
    while live:
        still = []
        for r in live:
            try:
                name = next(phases[r])
                check_errors(views[r], name)
                still.append(r)
            except StopIteration as stop:
                check_errors(views[r], "combine_reduce")
                results[r] = stop.value
        live = still
    return results
