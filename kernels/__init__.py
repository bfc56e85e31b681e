"""Fused Triton kernels of comet-megatron (Triton + torch only; no Megatron imports).

Per rank of an expert-parallel group, one forward round is
    publish -> receive_layout -> dispatch_gemm -> gemm_combine -> combine_reduce
and one backward round is
    publish(grad_out) -> dispatch_gemm_backward -> gemm_combine -> combine_reduce (+ expert_weight_grads).
`moe.moe_forward` / `moe.moe_backward` chain them; `emulated.EmulatedGroup` runs N ranks in one process;
`workspace_layout` is the contract with a transport; `config.KernelConfig` holds the launch knobs;
`signals` is the only module with memory-ordering code. See docs/KERNELS.md.
"""

from .config import KernelConfig
from .dispatch_gemm import ACTIVATIONS, DispatchResult, dispatch_gemm, dispatch_gemm_backward
from .emulated import EmulatedGroup
from .gemm_combine import combine_reduce, gemm_combine
from .moe import BackwardState, ForwardState, expert_weight_grads, moe_backward, moe_forward, run_rank, run_ranks
from .routing import ReceiveLayout, SendPlan, publish, receive_layout, send_plan
from .signals import SignalTimeout, barrier, check_errors
from .wgrad import grouped_wgrad
from .workspace_layout import RankView, Region, WorkspaceLayout

__all__ = [
    "ACTIVATIONS", "BackwardState", "DispatchResult", "EmulatedGroup", "ForwardState", "KernelConfig",
    "RankView", "ReceiveLayout", "Region", "SendPlan", "SignalTimeout", "WorkspaceLayout", "barrier",
    "check_errors", "combine_reduce", "dispatch_gemm", "dispatch_gemm_backward", "expert_weight_grads",
    "gemm_combine", "grouped_wgrad", "moe_backward", "moe_forward", "publish", "receive_layout", "run_rank",
    "run_ranks", "send_plan",
]
