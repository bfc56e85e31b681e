"""The EP-size-1 reference path without a host sync: the routing plan built from a known pair count equals the
one built from the counts read on the host, and `ExpertRows` serves the grouped GEMMs from device counts
(offsets on the device; the host list only when a fallback asks, and then the same)."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.experts import ExpertRows, grouped_linear, grouped_linear_wgrad
from comet_megatron.routing import build_routing_plan


@pytest.mark.parametrize("topk", [1, 2, 4])
def test_plan_from_known_rows_equals_plan_from_host_counts(topk):
    gen = torch.Generator().manual_seed(topk)
    tokens, experts = 37, 8
    scores = torch.rand(tokens, experts, generator=gen)
    scores[:, 3] -= 2.0  # an expert nobody picks
    idx = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, idx, True)
    probs = torch.softmax(torch.randn(tokens, experts, generator=gen), dim=1) * routing_map
    kw = dict(ep_group=None, tp_group=None, num_local_experts=experts)
    want = build_routing_plan(routing_map, probs, **kw)
    got = build_routing_plan(routing_map, probs, known_rows=tokens * topk, **kw)
    assert torch.equal(got.send_token_index, want.send_token_index)
    assert torch.equal(got.send_probs, want.send_probs)
    assert got.tokens_per_expert.tolist() == want.tokens_per_expert.tolist()
    assert got.tokens_per_expert[3] == 0 and got.regroup_index is None and want.regroup_index is None


def _device_rows(counts):
    """ExpertRows whose counts 'live on the device' (a CPU tensor standing in for one: same code path)."""
    from comet_megatron.kernels.host_copy import AsyncHostCopy

    rows = ExpertRows([0])
    rows._dev, rows._host, rows._offs, rows._rows = torch.tensor(counts, dtype=torch.int64), None, {}, None
    rows._copy = AsyncHostCopy(rows._dev)
    rows._dev.mul_(1)  # the copy is a snapshot: later writes to the device tensor do not reach it
    return rows


def test_expert_rows_from_device_counts():
    counts = [3, 0, 5, 2]
    rows = _device_rows(counts)
    assert len(rows) == 4
    offs = rows.device_offsets("cpu")
    assert offs.dtype == torch.int32 and offs.tolist() == [0, 3, 3, 8, 10]
    assert rows.device_offsets("cpu", leading_zero=False).tolist() == [3, 3, 8, 10]
    assert rows._host is None  # nothing read back so far
    assert rows.host() == counts and rows.offsets() == [0, 3, 3, 8, 10]
    host = ExpertRows(torch.tensor(counts))  # a CPU tensor: host counts
    assert host.host() == counts and host.device_offsets("cpu").tolist() == [0, 3, 3, 8, 10]
    assert ExpertRows.of(rows) is rows


def test_grouped_linear_same_from_device_and_host_counts():
    gen = torch.Generator().manual_seed(3)
    counts = [4, 0, 7, 1]
    x = torch.randn(sum(counts), 6, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    gy = torch.randn(sum(counts), 5, generator=gen, dtype=torch.float64)
    want = torch.cat([x[s:e] @ w[i].t() for i, (s, e) in enumerate(zip([0, 4, 4, 11], [4, 4, 11, 12]))])
    for rows in (counts, ExpertRows(counts), _device_rows(counts)):
        torch.testing.assert_close(grouped_linear(x, w, rows), want)
        dw = grouped_linear_wgrad(gy, x, rows, torch.float64)
        torch.testing.assert_close(dw[2], gy[4:11].t() @ x[4:11])
        assert torch.equal(dw[1], torch.zeros(5, 6, dtype=torch.float64))


def test_expert_rows_refuse_counts_that_disagree_with_the_sized_rows():
    """Device counts whose total is not what the dispatcher sized the rows for (a router that dropped or padded
    pairs behind its back) raise a clear error when they reach the host, instead of misaligned GEMM segments."""
    rows = _device_rows([3, 0, 5])
    rows._rows = 9
    with pytest.raises(RuntimeError, match="capacity-factor"):
        rows.host()
    ok = _device_rows([3, 0, 5])
    ok._rows = 8
    assert ok.host() == [3, 0, 5]
