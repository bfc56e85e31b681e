"""`kernels.token_sum`: each token's rows summed in send order, against float64 sums and against the same
fp32 additions done one by one in that order (bitwise), on outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels.token_sum import sum_rows_by_token, token_row_order
from moe_reference import seed_from


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_from(request.node.nodeid))


def _routing(gen, tokens, experts, max_rows):
    """Send order of a routing: (expert, token) pairs expert-major; tokens with 0 to max_rows rows."""
    per_token = torch.randint(0, max_rows + 1, (tokens,), generator=gen)
    pairs = []
    for t in range(tokens):
        for e in torch.randperm(experts, generator=gen)[: int(per_token[t])].tolist():
            pairs.append((e, t))
    pairs.sort()
    return torch.tensor([t for _, t in pairs], dtype=torch.int64)


@pytest.mark.parametrize("tokens,hidden,max_rows", [(13, 40, 4), (1, 1, 1), (30, 1100, 6), (7, 64, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_rows_by_token(tokens, hidden, max_rows, dtype, gen):
    token = _routing(gen, tokens, 8, max_rows)
    rows = torch.randn(token.numel(), hidden, generator=gen).to(dtype)
    order, starts = token_row_order(token, tokens)
    assert order.dtype == starts.dtype == torch.int64 and starts.numel() == tokens + 1
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    sum_rows_by_token(rows, order, starts, out=out)
    want = torch.zeros(tokens, hidden, dtype=torch.float64).index_add_(0, token, rows.double())
    # the same fp32 additions, one by one in send order (expert ascending within a token), rounded once
    in_order = torch.zeros(tokens, hidden, dtype=torch.float32)
    for r in range(token.numel()):
        in_order[token[r]] += rows[r].float()
    if dtype == torch.float32:
        assert torch.equal(out, in_order)
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    else:  # one conversion of the fp32 sum (the interpreter truncates, a GPU rounds to nearest)
        assert ((out.double() - in_order.double()).abs() <= in_order.double().abs() * 2**-7).all()
    counts = torch.bincount(token, minlength=tokens)
    assert (out[counts == 0] == 0).all()


def test_token_row_order_is_stable():
    token = torch.tensor([3, 0, 3, 1, 0, 3])
    order, starts = token_row_order(token, 5)
    assert order.tolist() == [1, 4, 3, 0, 2, 5] and starts.tolist() == [0, 2, 3, 3, 6, 6]


def test_sum_rows_by_token_rejects_bad_input(gen):
    rows = torch.randn(4, 3, generator=gen)
    order, starts = token_row_order(torch.tensor([0, 1, 1, 0]), 2)
    with pytest.raises(ValueError, match="3 entries for 4 rows"):
        sum_rows_by_token(rows, order[:3], starts)
    with pytest.raises(ValueError, match="contiguous rows"):
        sum_rows_by_token(torch.randn(3, 4).t(), order, starts)
    with pytest.raises(ValueError, match="must be 1-D"):
        token_row_order(torch.zeros(2, 2, dtype=torch.int64), 2)
