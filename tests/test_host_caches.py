"""The per-call checks of the expert module are cached for host time (`_main_grads`, `_back_to_back`); the
caches must follow what they check: a new main_grad buffer (a re-created DDP), a frozen expert, a moved
parameter."""

from __future__ import annotations

import torch

from comet_megatron.experts import ExpertRows, _back_to_back, _layout, _main_grads, expert_weights, grouped_linear


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


def test_back_to_back_cache_follows_moved_parameters(caplog):
    params = _params()
    assert _back_to_back(params)
    view, _ = expert_weights(params)
    assert view.data_ptr() == params[0].data_ptr() and torch.equal(view[2], params[2])
    params[1].data = params[1].data.clone()  # moved out of the shared storage
    assert not _back_to_back(params)
    with caplog.at_level("WARNING", logger="comet_megatron"):
        copy, _ = expert_weights(params)
        expert_weights(params)
    assert copy.data_ptr() != params[0].data_ptr() and torch.equal(copy[1], params[1])
    assert not copy.requires_grad
    # a copy on every call is said once, with the cause
    warned = [r for r in caplog.records if "do not lie back to back" in r.getMessage()]
    assert len(warned) == 1 and "distributed optimizer" in warned[0].getMessage()


def test_fc_params_reads_the_registries_like_attribute_access():
    """`CometGroupedMLP.fc_params` reads `_modules` / `_parameters` directly (host time); it must give what
    attribute access gives, also for a linear whose weight is a property (not a registered parameter)."""
    import types

    from comet_megatron.experts import CometGroupedMLP

    class PropertyLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(3, 4, bias=False)

        @property
        def weight(self):
            return self.inner.weight

    experts = torch.nn.ModuleList()
    for i in range(3):
        e = torch.nn.Module()
        e.linear_fc1 = torch.nn.Linear(4, 6, bias=False) if i != 1 else PropertyLinear()
        e.linear_fc2 = torch.nn.Linear(3, 4, bias=False)
        experts.append(e)
    w1, w2 = CometGroupedMLP.fc_params(types.SimpleNamespace(local_experts=experts))
    assert all(a is b for a, b in zip(w1, [e.linear_fc1.weight for e in experts])) and len(w1) == 3
    assert all(a is b for a, b in zip(w2, [e.linear_fc2.weight for e in experts])) and len(w2) == 3


def test_expert_weights_view_evenly_spaced_layouts():
    """Weights evenly spaced in one storage, ascending with gaps or descending (the distributed optimizer's
    layout), are viewed, not copied; `grouped_linear` with the reversed view gives the per-expert products."""
    gen = torch.Generator().manual_seed(4)
    experts, out_f, in_f, gap = 3, 5, 4, 7
    size = out_f * in_f
    buf = torch.randn(experts * (size + gap), generator=gen)
    asc = [buf[i * (size + gap):][:size].view(out_f, in_f) for i in range(experts)]
    desc = asc[::-1]
    assert _layout(asc) == size + gap and _layout(desc) == -(size + gap)
    assert not _back_to_back(asc)
    w, rev = expert_weights(asc, rows=1)
    assert not rev and w.data_ptr() == asc[0].data_ptr() and all(torch.equal(w[i], asc[i]) for i in range(experts))
    w, rev = expert_weights(desc, rows=1)  # flipping one row is cheaper than copying three weights
    assert rev and all(torch.equal(w[j], desc[experts - 1 - j]) for j in range(experts))
    assert w.data_ptr() == desc[-1].data_ptr()  # a view
    counts = [2, 0, 3]
    x = torch.randn(sum(counts), in_f, generator=gen)
    got = grouped_linear(x, w, ExpertRows(counts), reversed_experts=True)
    want = torch.cat([xe @ desc[e].t() for e, xe in enumerate(torch.split(x, counts))])
    torch.testing.assert_close(got, want)
    # many rows: flipping them would cost more than one copy of the weights
    w, rev = expert_weights(desc, rows=100)
    assert not rev and w.data_ptr() != desc[-1].data_ptr() and all(torch.equal(w[i], desc[i]) for i in range(experts))
    assert ExpertRows(counts).device_offsets_reversed("cpu").tolist() == [3, 3, 5]
    # unevenly spaced: no layout
    assert _layout([asc[0], asc[2], asc[1]]) is None
