"""The per-call checks of the expert module are cached for host time (`_main_grads`, `_back_to_back`); the
caches must follow what they check: a new main_grad buffer (a re-created DDP), a frozen expert, a moved
parameter."""

from __future__ import annotations

import torch

from comet_megatron.experts import _back_to_back, _main_grads, stacked_weights_no_grad


def _params(n=3, shape=(4, 5)):
    stacked = torch.randn(n, *shape)
    params = [torch.nn.Parameter(stacked[i]) for i in range(n)]
    for p in params:
        p.main_grad = torch.zeros(shape)
        p.grad_added_to_main_grad = False
    return params


def test_main_grads_cache_follows_buffers_and_flags():
    params = _params()
    first = _main_grads(params)
    assert [id(m) for m in first] == [id(p.main_grad) for p in params]
    assert _main_grads(params) is not None  # cached verdict
    params[1].main_grad = torch.zeros(4, 5)  # a re-created DDP buffer
    again = _main_grads(params)
    assert again[1] is params[1].main_grad
    params[2].requires_grad_(False)  # a frozen expert
    assert _main_grads(params) is None
    params[2].requires_grad_(True)
    assert _main_grads(params) is not None
    params[0].main_grad = torch.zeros(5, 4)  # wrong shape
    assert _main_grads(params) is None


def test_back_to_back_cache_follows_moved_parameters():
    params = _params()
    assert _back_to_back(params)
    view = stacked_weights_no_grad(params)
    assert view.data_ptr() == params[0].data_ptr() and torch.equal(view[2], params[2])
    params[1].data = params[1].data.clone()  # moved out of the shared storage
    assert not _back_to_back(params)
    copy = stacked_weights_no_grad(params)
    assert copy.data_ptr() != params[0].data_ptr() and torch.equal(copy[1], params[1])
    assert not copy.requires_grad
