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


def reversed_main_grads(el, m_dim, n_dim, gap, gen, overwrite):
    """(buffer, main_grads, float64 values before) for `el` fp32 [M, N] main_grads in reverse order in one
    NaN-filled buffer with `gap` elements between them, as Megatron's DDP buffer holds expert weights; random
    values, or NaN with `overwrite` (the kernel must not read them; `before` is then zero)."""
    n = m_dim * n_dim
    buffer = torch.full((el * (n + gap) + gap,), float("nan"), device=gen.device)
    mains = [buffer[gap + (el - 1 - e) * (n + gap):][:n].view(m_dim, n_dim) for e in range(el)]
    for m in mains:
        m.normal_(generator=gen)
        if overwrite:
            m.fill_(float("nan"))
    before = [torch.zeros_like(m, dtype=torch.float64) if overwrite else m.double() for m in mains]
    return buffer, mains, before


@dataclass
class WgradCase:
    """Operands and main_grads for an expert weight-gradient kernel: a [R + pad, M], b [R + pad, N] with rows of
    inf past the last expert's (a partial last block must not reach them), row offsets, and the experts'
    main_grads reversed in one NaN-gapped buffer (`reversed_main_grads`) with their flat base and offsets."""
    a: torch.Tensor
    b: torch.Tensor
    offsets: list
    buffer: torch.Tensor
    mains: list
    before: list
    base: torch.Tensor
    out_offsets: torch.Tensor
    gap: int

    @property
    def device_offsets(self) -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=torch.int32, device=self.a.device)

    def check(self, times: int = 1, tol: float = 1e-5) -> None:
        """Every main_grad = its value before + times * a_e^T b_e (float64); the gaps still NaN."""
        o = self.offsets
        for e, main in enumerate(self.mains):
            want = self.before[e] + times * (self.a[o[e]:o[e + 1]].double().t() @ self.b[o[e]:o[e + 1]].double())
            assert rel_err(main.double(), want) < tol, e
        assert int(torch.isnan(self.buffer).sum()) == self.gap * (len(self.mains) + 1)  # the gaps were not written


def wgrad_case(rows, m_dim, n_dim, gap, gen, overwrite, dtype=torch.bfloat16, pad=40) -> WgradCase:
    """A `WgradCase` with len(rows) experts of rows[e] rows each (random operands from `gen`, on its device)."""
    from comet_megatron.kernels import accumulate

    total = sum(rows)
    a = torch.randn(total + pad, m_dim, device=gen.device, generator=gen).to(dtype)
    b = torch.randn(total + pad, n_dim, device=gen.device, generator=gen).to(dtype)
    a[total:] = float("inf")
    b[total:] = float("inf")
    buffer, mains, before = reversed_main_grads(len(rows), m_dim, n_dim, gap, gen, overwrite)
    base = accumulate.flat_base(mains)
    out_offsets = torch.tensor(accumulate.element_offsets(base, mains), dtype=torch.int64, device=gen.device)
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + r)
    return WgradCase(a, b, offsets, buffer, mains, before, base, out_offsets, gap)

