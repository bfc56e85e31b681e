"""Workspace layout contract, routing send plans and the grouped weight-gradient kernel."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels import WorkspaceLayout, grouped_wgrad, send_plan
from comet_megatron.kernels.workspace_layout import REGION_ALIGN
from moe_reference import seed_from


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_from(request.node.nodeid))


def test_workspace_regions_are_aligned_and_disjoint():
    lay = WorkspaceLayout(capacity_tokens=100, topk=4, hidden=48, num_experts=16, world_size=4,
                          dtype=torch.bfloat16, max_comm_programs=32)
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in lay.regions.values())
    assert all(start % REGION_ALIGN == 0 for start, _, _ in spans)
    assert all(end <= nxt for (_, end, _), (nxt, _, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= lay.nbytes
    assert lay.regions["combine"].nbytes == 100 * 4 * 48 * 2
    assert lay.regions["arrival"].shape == (4, 32)
    views = lay.region_views(torch.zeros(lay.nbytes, dtype=torch.uint8))
    assert views["recv_counts"].shape == (4, 4) and views["recv_counts"].dtype == torch.int32
    with pytest.raises(ValueError, match="not divisible"):
        WorkspaceLayout(8, 2, 16, num_experts=6, world_size=4, dtype=torch.float32)


def test_send_plan_is_stable_by_expert(gen):
    idx = torch.randint(0, 5, (9, 3), generator=gen)
    plan = send_plan(idx, 6)
    flat = idx.reshape(-1)
    assert plan.counts.tolist() == torch.bincount(flat, minlength=6).tolist()
    expected = sorted(range(flat.numel()), key=lambda pair: (int(flat[pair]), pair))
    assert plan.order.tolist() == expected
    assert plan.offsets.tolist() == [0] + torch.cumsum(plan.counts, 0).tolist()


@pytest.mark.parametrize("backend", ["triton", "loop"])
def test_grouped_wgrad_matches_per_expert_products(backend, gen):
    rows_per_expert = [5, 0, 17, 3]  # includes an expert without rows
    a = torch.randn(sum(rows_per_expert), 20, generator=gen)
    b = torch.randn(sum(rows_per_expert), 12, generator=gen)
    offsets = torch.tensor([0] + torch.cumsum(torch.tensor(rows_per_expert), 0).tolist(), dtype=torch.int32)
    got = grouped_wgrad(a, b, offsets, backend=backend, block_m=16, block_n=16, block_k=16)
    for e in range(len(rows_per_expert)):
        s, t = offsets[e].item(), offsets[e + 1].item()
        torch.testing.assert_close(got[e], a[s:t].t() @ b[s:t], rtol=1e-5, atol=1e-5)
