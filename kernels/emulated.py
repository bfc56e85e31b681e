"""N virtual ranks in one process: a transport for tests and for single-device experiments.

Each rank's symmetric buffer is a separate zero-filled torch tensor; the address tables hold their
`data_ptr()`s. This is exactly the contract of `workspace_layout.RankView` that a real transport
(torch symmetric memory, CUDA IPC) fulfils, so the kernels cannot tell the difference. On the CPU the
kernels run in Triton's interpreter (set TRITON_INTERPRET=1 before importing triton); on one GPU the
compiled kernels run, one rank at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import KernelConfig
from .moe import expert_weight_grads, moe_backward, moe_forward, run_ranks
from .workspace_layout import RankView, WorkspaceLayout


class EmulatedGroup:
    """`world_size` ranks sharing one process; `views[r]` is rank r's `RankView`."""

    def __init__(self, world_size: int, *, capacity_tokens: int, topk: int, hidden: int, num_experts: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", max_comm_programs: int = 64,
                 timeout: int | None = None):
        self.layout = WorkspaceLayout(capacity_tokens, topk, hidden, num_experts, world_size, dtype,
                                      max_comm_programs)
        self.buffers = [torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
                        for _ in range(world_size)]
        bases = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64, device=device)
        self.views = [RankView.from_symmetric_buffer(r, world_size, self.layout, self.buffers[r], bases, timeout)
                      for r in range(world_size)]

    @property
    def world_size(self) -> int:
        return len(self.views)

    def forward(self, xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor],
                topk_probs: Sequence[torch.Tensor], w1: Sequence[torch.Tensor], w2: Sequence[torch.Tensor],
                cfg: KernelConfig, reversed_experts: tuple[bool, bool] = (False, False)) -> list[tuple]:
        """Forward round on every rank: [(out_r, ForwardState_r)] (per-rank inputs and local weights;
        `reversed_experts` as in `moe_forward`)."""
        return run_ranks([moe_forward(v, xs[r], topk_idx[r], topk_probs[r], w1[r], w2[r], cfg, reversed_experts)
                          for r, v in enumerate(self.views)], self.views)

    def backward(self, states: Sequence, grad_outs: Sequence[torch.Tensor], w1: Sequence[torch.Tensor],
                 w2: Sequence[torch.Tensor], cfg: KernelConfig, *, wgrad_backend: str = "auto",
                 reversed_experts: tuple[bool, bool] = (False, False)) -> list[tuple]:
        """Backward round on every rank: [(grad_x_r, grad_probs_r, dW1_r, dW2_r)] (dW in expert order)."""
        results = run_ranks([moe_backward(v, states[r], grad_outs[r], w1[r], w2[r], cfg, reversed_experts)
                             for r, v in enumerate(self.views)], self.views)
        grads = []
        for r, (grad_x, grad_probs, bwd) in enumerate(results):
            dw1, dw2 = expert_weight_grads(states[r], bwd, backend=wgrad_backend, out_dtype=w1[r].dtype)
            grads.append((grad_x, grad_probs, dw1, dw2))
        return grads
