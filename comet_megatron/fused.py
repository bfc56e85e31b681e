"""The fused path of the comet MoE layer: autograd around the fused kernels of `comet_megatron.kernels`.

Forward, per EP rank:  publish tokens -> dispatch_gemm (dispatch + fc1 + activation, overlapped)
                       -> gemm_combine (fc2 + weighted combine, overlapped) -> combine_reduce
Backward:              publish grad_out -> dispatch_gemm_backward (dispatch of output gradients +
                       fc2 dgrad + activation backward) -> gemm_combine (fc1 dgrad + return of input
                       gradients) -> combine_reduce; then the grouped weight-gradient GEMMs (or,
                       with config.delay_wgrad_compute, queued for the experts' backward_dw()).

`FusedExperts` owns the kernel configuration and the symmetric workspace of one layer (workspaces
are shared between layers of equal shapes through `_WORKSPACES`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import torch.nn.functional as F

from comet_megatron.config import CometConfig
from comet_megatron.kernels import (
    KernelConfig,
    SignalTimeout,
    check_errors,
    expert_weight_grads,
    moe_backward,
    moe_forward,
    run_rank,
)
from comet_megatron.experts import WgradHandoff, accumulate_into_mains, fused_wgrad_mains
from comet_megatron.kernels.moe import weight_grad_operands
from comet_megatron.transport import SymmetricWorkspace
from comet_megatron.transport.workspace import PeerUnreachable

log = logging.getLogger("comet_megatron")

ACTIVATION_NAMES = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}

_WORKSPACES: dict = {}

# Without a tuning-cache entry on a Hopper GPU: the tiles `comet-megatron tune` chose for all three
# benchmark shapes on an H100 (2.6-4.1x faster than the kernels' small defaults), with layer 1 on wider
# column chunks and 3 stages (`comet-megatron bench kernels`: 1.1-1.2x faster gemm_combine at those
# shapes; docs/BENCHMARKS.md), and layer 0's backward with its activation backward in the GEMM's
# epilogue (equal to the separate pass or 1.04x faster, one launch less). Elsewhere the kernels' defaults
# stay (their shared-memory needs fit every GPU).
GPU_UNTUNED_DEFAULT = {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4,
                       "combine_block_n": 256, "combine_num_stages": 3, "bwd_block_n": 256, "bwd_num_stages": 3,
                       "fused_act_backward": True}


# the tiles on which the Hopper default's layer-0 backward knobs were measured (see kernel_config)
_BWD_DEFAULT_NEEDS = ("block_m", "block_n", "block_k", "num_warps")


def _is_hopper(device) -> bool:
    dev = torch.device(device or "cpu")
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] == 9


def fused_support(config, expert_tp_size: int, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """(ok, reason) whether the fused kernels implement this layer's expert MLP (activations in `dtype`)."""
    from comet_megatron.kernels.config import INTERPRETER_BF16, interpreter_bf16

    if dtype is not None and interpreter_bf16(dtype):
        return False, INTERPRETER_BF16
    if expert_tp_size != 1:
        return False, f"expert tensor parallel size {expert_tp_size} (fused kernels need 1)"
    if config.activation_func not in ACTIVATION_NAMES:
        return False, f"activation {getattr(config.activation_func, '__name__', config.activation_func)}"
    if config.add_bias_linear:
        return False, "expert biases (--add-bias-linear)"
    if config.gated_linear_unit and (
        config.glu_linear_offset != 0.0 or config.activation_func_clamp_value is not None
    ):
        return False, "GLU offset/clamp"
    if config.moe_apply_probs_on_input:
        return False, "--moe-apply-probs-on-input"
    return True, ""


def kernel_config(cfg: CometConfig, config, *, tokens: int | None = None, device=None, dtype=None,
                  world_size: int = 1) -> KernelConfig:
    """Launch knobs of a layer. Knobs left "auto" come from the tuning cache (`cfg.tune_cache`, entry of
    this shape, world size, dtype and GPU, nearest tokens bucket; see docs/TUNING.md) when `tokens` is
    given and it has one, else the kernels' defaults; explicit values always win."""
    kc = KernelConfig(
        activation=ACTIVATION_NAMES[config.activation_func],
        gated=bool(config.gated_linear_unit),
        trace=cfg.trace,
        pre_reduce=cfg.pre_reduce,
    )
    auto = "auto" in (cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.comm_programs)
    if auto and tokens is not None:
        from comet_megatron import tune

        key = tune.make_key(
            hidden=config.hidden_size, ffn=config.moe_ffn_hidden_size, experts=config.num_moe_experts,
            topk=config.moe_router_topk, gated=kc.gated, world=world_size, tokens=tokens,
            dtype=dtype if dtype is not None else torch.float32, device=device,
        )
        tuned, how = tune.cached_config(cfg.tune_cache, key)
        if tuned is None and _is_hopper(device):
            tuned = dict(GPU_UNTUNED_DEFAULT)
            how += f"; using {GPU_UNTUNED_DEFAULT}"
        elif tuned is not None and _is_hopper(device) and "bwd_block_n" not in tuned and all(
                tuned.get(f) == GPU_UNTUNED_DEFAULT[f] for f in _BWD_DEFAULT_NEEDS):
            # An entry written before the bwd-tiles stage existed, on the default tiles: its layer-0
            # backward gets the default's measured-faster 256 x 3 (docs/BENCHMARKS.md) rather than 128 x 4.
            tuned.update(bwd_block_n=GPU_UNTUNED_DEFAULT["bwd_block_n"],
                         bwd_num_stages=GPU_UNTUNED_DEFAULT["bwd_num_stages"])
            how += "; layer-0 backward tiles from the Hopper default (the entry predates them)"
        for name, value in (tuned or {}).items():
            setattr(kc, name, value)
        tune.log_once(key, how)
    if cfg.tile_m != "auto":
        kc.block_m = cfg.tile_m
    if cfg.tile_n != "auto":  # an explicit tile width applies to every GEMM of both layers
        kc.block_n = cfg.tile_n
        kc.combine_block_n = kc.bwd_block_n = None
    if cfg.tile_k != "auto":
        kc.block_k = cfg.tile_k
    if cfg.comm_programs != "auto":
        kc.num_comm_dispatch = cfg.comm_programs
        kc.num_comm_combine = cfg.comm_programs
    return kc


class CometTimeout(RuntimeError):
    """A comet kernel gave up waiting for a peer: names the rank, the layer and the phase."""


@contextlib.contextmanager
def _reporting(runner, direction: str):
    """Turn a timed-out wait (kernel signal or workspace agreement) into `CometTimeout`."""
    try:
        yield
    except (SignalTimeout, PeerUnreachable) as exc:
        raise CometTimeout(
            f"comet MoE layer {runner.layer_name}, {direction}: {exc}. The peer may have died, "
            f"be stuck, or be running a different layer (all EP ranks must call the same MoE "
            f"layers in the same order). Wait bound: --comet-wait-timeout-s "
            f"{runner.timeout_s:g}."
        ) from exc


def _check_after_backward(runner, view, fwd_epoch: int) -> None:
    """Read `view`'s error buffer when the current backward pass ends (an autograd engine callback per
    layer call; all but the first find the GPU idle and cost one small copy): a timed-out wait of this
    call's forward round (whose check was deferred, see `_FusedMoE.forward`) or backward round raises
    `CometTimeout` from `loss.backward()`, before an optimizer step can use the gradients. Checking at the
    end of each round instead (a host sync) left the GPU idle while the host prepared what followed (profiled
    on an H100: 4.7 ms of idle GPU per forward+backward of a Qwen2-MoE layer before the per-expert
    gradient hand-off)."""

    def phase_of(epoch):
        return ("forward" if epoch <= fwd_epoch else "backward") + " (checked at the end of the backward pass)"

    def check():
        runner.workspace.unchecked_forwards.discard(fwd_epoch)
        with _reporting(runner, "forward+backward"):
            check_errors(view, phase_of=phase_of)

    try:
        torch.autograd.Variable._execution_engine.queue_callback(check)
    except RuntimeError:  # not inside a backward pass (a direct call): check now
        check()


def _check_unchecked_forwards(runner) -> None:
    """Forwards that deferred their error check to a backward that has not run yet (micro-batches in
    flight, or a forward under autograd whose output was dropped): check them now, before this forward
    reuses the workspace (one host sync; a run that alternates forward and backward never gets here)."""
    ws = runner.workspace
    if ws.unchecked_forwards:
        ws.unchecked_forwards.clear()
        with _reporting(runner, "forward"):
            check_errors(ws.view, "an earlier forward (checked at the next forward)")


class _FusedMoE(torch.autograd.Function):
    """x [T, H], router weights [T, K], w1 [El, H, F1], w2 [El, F, H] -> [T, H]; `reversed_experts` (w1's,
    w2's): that weight holds the experts in reversed order (a view over Megatron's distributed optimizer layout).

    With `defer` (delayed weight gradients, `config.delay_wgrad_compute`), w1 and w2 are detached,
    `anchor` (a leaf that requires grad) keeps the node in the graph, and backward hands a callable
    computing (dW1 [El, F1, H], dW2 [El, H, F]) to `defer` instead of returning weight gradients."""

    @staticmethod
    def forward(ctx, x, topk_probs, w1, w2, anchor, topk_idx, runner, defer=None, handoff=None,
                defer_check=False, reversed_experts=(False, False)):
        ctx.defer, ctx.handoff, ctx.reversed_experts = defer, handoff, reversed_experts
        _check_unchecked_forwards(runner)
        with _reporting(runner, "forward"):
            view = runner.workspace.ensure_capacity(x.shape[0])
            phases = moe_forward(view, x, topk_idx, topk_probs.float(), w1, w2, runner.kernel, reversed_experts)
            # With a backward to come, the round's error buffer is read when that backward pass ends
            # (`_check_after_backward`): no host sync at the end of the forward, so the host queues what
            # follows while the round runs. A forward without autograd checks here.
            out, state = run_rank(phases, None if defer_check else view)
        ctx.fwd_epoch = view.epoch
        if defer_check:
            runner.workspace.unchecked_forwards.add(view.epoch)
        if runner.kernel.trace:
            runner.last_trace = (state.dispatch.trace, state.combine_trace, state.layout.max_tiles)
        ctx.runner, ctx.state, ctx.probs_dtype = runner, state, topk_probs.dtype
        ctx.save_for_backward(w1, w2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        w1, w2 = ctx.saved_tensors
        runner, state = ctx.runner, ctx.state
        view = runner.workspace.view
        with _reporting(runner, "backward"):
            phases = moe_backward(view, state, grad_out.contiguous(), w1, w2, runner.kernel, ctx.reversed_experts)
            # No host sync here: the round's error buffer is read once the whole backward pass is over
            # (see _check_after_backward), so the host keeps queueing the weight-gradient hand-off and the
            # other layers' backward while this round runs.
            grad_x, grad_probs, bstate = run_rank(phases, None)
        _check_after_backward(runner, view, ctx.fwd_epoch)
        ctx.state = ctx.runner = None
        grad_probs = grad_probs.to(ctx.probs_dtype)
        # In the parameters' [out, in] layout, so they reach the expert weights without a copy.
        weight_grads = functools.partial(
            expert_weight_grads, state, bstate, out_dtype=w1.dtype, out_features_first=True
        )
        if ctx.defer is not None:
            ctx.defer(weight_grads)  # the received rows and gradients stay alive until backward_dw()
            ctx.defer = None
            return grad_x, grad_probs, None, None, None, None, None, None, None, None, None
        handoff, ctx.handoff = ctx.handoff, None
        if handoff is not None and _accumulate_into_main_grads(handoff, state, bstate):
            # the gradients are in main_grad; placeholders for the stacked views (never written): one expert's
            # worth of memory seen by every expert (each parameter's slice is a dense tensor autograd keeps as
            # is, and DDP's hook drops), not a stack the size of all expert weights
            return (grad_x, grad_probs, _placeholder(w1), _placeholder(w2),
                    None, None, None, None, None, None, None)
        # expert order -> the order of the weight views
        dw1, dw2 = (dw.flip(0) if rev else dw for dw, rev in zip(weight_grads(), ctx.reversed_experts))
        return (grad_x, grad_probs, dw1.transpose(1, 2), dw2.transpose(1, 2),
                None, None, None, None, None, None, None)


def _placeholder(w: torch.Tensor) -> torch.Tensor:
    """A gradient of `w`'s shape ([El, ...]) backed by one expert's memory (stride 0 across experts)."""
    return torch.empty_like(w[0]).expand_as(w)


def _accumulate_into_main_grads(handoff, state, bstate) -> bool:
    """Under Megatron's DDP: the expert weight gradients accumulated straight into the parameters' fp32
    `main_grad`s (`experts.accumulate_into_mains`: per-expert GEMMs for few large experts, one Triton launch
    otherwise), using the receive layout's expert offsets: on the GPU for the Triton kernel, on the host for the
    per-expert GEMMs (read by the forward's host sync, or here at world size 1, where the forward had none)."""
    layout = state.layout
    rows = layout.num_rows()
    (a1, b1), (a2, b2) = weight_grad_operands(state, bstate, out_features_first=True)
    p1, p2 = handoff.params
    m1, m2 = fused_wgrad_mains(p1, a1, rows), fused_wgrad_mains(p2, a2, rows)
    if m1 is None or m2 is None:
        return False
    accumulate_into_mains(p1, m1, a1, b1, layout.expert_offsets_host, layout.expert_offsets)
    accumulate_into_mains(p2, m2, a2, b2, layout.expert_offsets_host, layout.expert_offsets)
    handoff.done = True
    return True


class FusedExperts:
    """Runs one comet layer's experts through the fused kernels over a symmetric workspace."""

    def __init__(self, cfg: CometConfig, config, transport: str, group, device, dtype, layer_name=""):
        self.kernel: KernelConfig | None = None  # set at the first call: the tuning cache is keyed by tokens
        self._kernel_inputs = (cfg, config, device, dtype)
        self.layer_name = layer_name
        self.timeout_s = cfg.wait_timeout_s
        self.last_trace = None  # (dispatch trace, combine trace, max_tiles) of the last forward
        self.topk = config.moe_router_topk
        key = (
            transport, id(group), self.topk, config.hidden_size, config.num_moe_experts, dtype,
            str(device),
        )
        ws = _WORKSPACES.get(key)
        if ws is None:
            capacity = None if cfg.capacity == "auto" else cfg.capacity
            ws = SymmetricWorkspace(
                transport, group, topk=self.topk, hidden=config.hidden_size,
                num_experts=config.num_moe_experts, dtype=dtype, device=device,
                capacity=capacity, grow=cfg.grow_workspace, timeout_s=cfg.wait_timeout_s,
            )
            _WORKSPACES[key] = ws
        self.workspace = ws

    def __call__(self, hidden, routing_map, probs, experts) -> torch.Tensor:
        """[T, H] tokens, router output -> [T, H] weighted sum of this token's experts."""
        if self.kernel is None:
            cfg, config, device, dtype = self._kernel_inputs
            self.kernel = kernel_config(cfg, config, tokens=hidden.shape[0], device=device, dtype=dtype,
                                        world_size=self.workspace.world)
        topk_idx, topk_probs = topk_from_routing(routing_map, probs, self.topk)
        experts.wait_for_weights()  # --overlap-param-gather: the expert linears' forward pre-hooks
        if experts.delays_wgrad():  # weight gradients in experts.backward_dw()
            w1, w2, anchor, reversed_experts = experts.delayed_fc_weights()
            defer, handoff = experts.defer_wgrad, None
        else:
            handoff = WgradHandoff(experts.fc_params())
            # [El, F1, H], [El, H, F] views, in reversed expert order under the distributed optimizer's layout
            (w1, rev1), (w2, rev2) = experts.fc_weight_views(handoff)
            reversed_experts = (rev1, rev2)
            anchor = defer = None
        # COMET_DEFER_FORWARD_CHECK=0: check every forward round at its end (debugging, A/B measurements)
        defer_check = os.environ.get("COMET_DEFER_FORWARD_CHECK", "1") != "0" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, topk_probs, w1, w2, anchor))
        return _FusedMoE.apply(
            hidden.contiguous(), topk_probs, w1.transpose(1, 2), w2.transpose(1, 2), anchor, topk_idx,
            self, defer, handoff, defer_check, reversed_experts,
        )


def topk_from_routing(routing_map: torch.Tensor, probs: torch.Tensor, topk: int):
    """Megatron's dense router output -> ([T, K] expert ids ascending, [T, K] weights).

    A token with fewer than K experts (capacity dropping) fills its free slots with an unused
    expert at weight 0: the slot contributes nothing forward, and `torch.where` keeps its
    gradient away from the router.
    """
    keys = routing_map.to(torch.int32) * 2 - 1  # routed experts first
    _, idx = torch.topk(keys, topk, dim=1, sorted=False)
    idx, _ = idx.sort(dim=1)
    valid = routing_map.gather(1, idx)
    weights = torch.where(valid, probs.gather(1, idx), torch.zeros((), dtype=probs.dtype, device=probs.device))
    return idx.to(torch.int32), weights


def drop_workspaces() -> None:
    """Forget every cached workspace (tests; a changed process group)."""
    _WORKSPACES.clear()
