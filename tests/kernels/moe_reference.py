"""Float64 torch reference of the MoE expert block and random test problems for the kernel tests."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def seed_from(name: str) -> int:
    """Stable per-test seed (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


@dataclass
class Problem:
    world: int
    topk: int
    hidden: int
    ffn: int
    num_experts: int
    gated: bool
    activation: str
    xs: list[torch.Tensor]          # per rank [T_r, H]
    topk_idx: list[torch.Tensor]    # per rank [T_r, K] int64 global expert ids
    topk_probs: list[torch.Tensor]  # per rank [T_r, K] fp32
    w1: torch.Tensor                # [E, H, F1] all experts (rank r holds experts r*El:(r+1)*El)
    w2: torch.Tensor                # [E, F, H]

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.world

    def local_w1(self, r: int, dtype: torch.dtype) -> torch.Tensor:
        el = self.local_experts
        return self.w1[r * el:(r + 1) * el].to(dtype).contiguous()

    def local_w2(self, r: int, dtype: torch.dtype) -> torch.Tensor:
        el = self.local_experts
        return self.w2[r * el:(r + 1) * el].to(dtype).contiguous()


def make_problem(seed: int, *, world: int, tokens: list[int], topk: int, hidden: int, ffn: int,
                 experts_per_rank: int, gated: bool = True, activation: str = "silu",
                 routing: str = "uniform") -> Problem:
    """Random problem. routing: "uniform", "skewed" (most pairs on expert 0), "sparse" (half the
    experts get nothing)."""
    g = torch.Generator().manual_seed(seed)
    e = world * experts_per_rank
    f1 = 2 * ffn if gated else ffn
    xs, idxs, probs = [], [], []
    for t in tokens:
        scores = torch.rand(t, e, generator=g)
        if routing == "skewed":
            scores[:, 0] += 2.0 * (torch.rand(t, generator=g) < 0.8)
        elif routing == "sparse":
            scores[:, 1::2] = -1.0
        idx = scores.topk(topk, dim=1).indices
        xs.append(torch.randn(t, hidden, generator=g))
        idxs.append(idx)
        probs.append(torch.softmax(torch.randn(t, topk, generator=g), dim=1))
    w1 = torch.randn(e, hidden, f1, generator=g) / hidden ** 0.5
    w2 = torch.randn(e, ffn, hidden, generator=g) / ffn ** 0.5
    return Problem(world, topk, hidden, ffn, e, gated, activation, xs, idxs, probs, w1, w2)


def reference_forward(p: Problem, x: torch.Tensor, idx: torch.Tensor, probs: torch.Tensor,
                      w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k probs[t,k] * act(x[t] @ w1[e_tk]) @ w2[e_tk] (differentiable, dtype of inputs)."""
    act = ACT[p.activation]
    out = torch.zeros_like(x)
    for k in range(p.topk):
        pre = torch.einsum("th,thf->tf", x, w1[idx[:, k]])
        h = act(pre[:, :p.ffn]) * pre[:, p.ffn:] if p.gated else act(pre)
        out = out + probs[:, k:k + 1] * torch.einsum("tf,tfh->th", h, w2[idx[:, k]])
    return out


def reference_rank_outputs(p: Problem) -> list[torch.Tensor]:
    w1, w2 = p.w1.double(), p.w2.double()
    return [reference_forward(p, p.xs[r].double(), p.topk_idx[r], p.topk_probs[r].double(), w1, w2)
            for r in range(p.world)]


def reference_grads(p: Problem, grad_outs: list[torch.Tensor]):
    """float64 autograd: per rank (grad_x, grad_probs), and global (dW1 [E,H,F1], dW2 [E,F,H])."""
    w1 = p.w1.double().requires_grad_()
    w2 = p.w2.double().requires_grad_()
    xs = [x.double().requires_grad_() for x in p.xs]
    ps = [q.double().requires_grad_() for q in p.topk_probs]
    total = sum((reference_forward(p, xs[r], p.topk_idx[r], ps[r], w1, w2) * grad_outs[r].double()).sum()
                for r in range(p.world))
    total.backward()
    return [(xs[r].grad, ps[r].grad) for r in range(p.world)], w1.grad, w2.grad


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in norm; NaNs (an unwritten poisoned slot) give inf."""
    actual = actual.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    denom = expected.double().norm().item()
    diff = (actual - expected.double()).norm().item()
    return diff / denom if denom > 0 else diff
