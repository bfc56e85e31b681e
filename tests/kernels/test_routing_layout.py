"""The one-launch receive layout kernel against the torch-op construction of the same layout."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels import EmulatedGroup
from comet_megatron.kernels.routing import receive_layout, receive_layout_torch
from moe_reference import seed_from

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("world,local_experts,block_m,pattern", [
    (1, 1, 16, "uniform"), (1, 5, 16, "uniform"), (2, 3, 16, "sparse"), (3, 4, 32, "skewed"),
    (4, 2, 16, "uniform"), (8, 3, 16, "sparse"), (2, 7, 64, "empty"), (5, 1, 16, "one_rank"),
    (1, 60, 128, "uniform"),
])
def test_layout_kernel_equals_torch(world, local_experts, block_m, pattern, request):
    g = torch.Generator().manual_seed(seed_from(request.node.nodeid))
    capacity, topk = 40, 2
    group = EmulatedGroup(world, capacity_tokens=capacity, topk=topk, hidden=16,
                          num_experts=world * local_experts, dtype=torch.float32, device=DEVICE)
    # What every source rank sends to every global expert: at most capacity * topk pairs per source.
    experts = world * local_experts
    sent = torch.zeros(world, experts, dtype=torch.int64)
    for s in range(world):
        pairs = int(torch.randint(0, capacity * topk + 1, (1,), generator=g))
        weights = torch.rand(experts, generator=g)
        if pattern == "sparse":
            weights *= torch.rand(experts, generator=g) < 0.4
        elif pattern == "skewed":
            weights[::local_experts] += 20.0
        elif pattern == "one_rank" and s != 1 % world:
            pairs = 0
        if pattern == "empty" or weights.sum() == 0:
            pairs = 0
            weights = torch.ones(experts)
        sent[s] = torch.bincount(torch.multinomial(weights, pairs, replacement=True, generator=g)
                                 if pairs else torch.zeros(0, dtype=torch.int64), minlength=experts)
    for r, view in enumerate(group.views):
        view.regions["recv_counts"].copy_(sent[:, r * local_experts:(r + 1) * local_experts].to(torch.int32))
        view.regions["inputs_ready"].fill_(1)
    for view in group.views:
        got = receive_layout(view, 1, block_m)
        want = receive_layout_torch(view, 1, block_m)
        n = int(want.num_tiles[0])
        assert got.num_tiles.tolist() == want.num_tiles.tolist()  # live tiles, tiles of only local rows
        assert got.max_tiles == want.max_tiles
        for name in ("seg_start", "seg_count", "expert_offsets"):
            assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name
        for name in ("tile_expert", "tile_row_start", "tile_row_end"):
            assert torch.equal(getattr(got, name)[:n].cpu(), getattr(want, name)[:n].cpu()), name
