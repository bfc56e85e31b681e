"""Expert tensor parallelism (ETP=2, TP=2 with sequence parallel) against the ETP=1 layout.

Megatron's alltoall dispatcher cannot all-gather uneven splits on gloo, so the oracle here is
Megatron's own layer with expert-TP 1 (full expert weights on each TP rank), then the comet layer
with expert-TP 2 holding the matching shards: same outputs, same input and router gradients, and
each shard's weight gradient equal to the matching slice of the full gradient summed over TP ranks.
"""

from __future__ import annotations

import pytest

from mp import run_distributed


def _shard_fc1(w, q, tp, gated):
    if not gated:
        return w.chunk(tp, dim=0)[q]
    gate, up = w.chunk(2, dim=0)
    return __import__("torch").cat([gate.chunk(tp, dim=0)[q], up.chunk(tp, dim=0)[q]])


def _body(rank, gated, topk):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import comet_megatron
    from moe_cases import make_config, make_input, rel_err, shape_router

    comet_megatron.enable()
    over = dict(gated_linear_unit=gated, moe_router_topk=topk)
    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    x = make_input(8, 2, 16, seed=rank)
    dy = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(50 + rank))

    torch.manual_seed(0)
    ref = spec.submodules.mlp(config=make_config("alltoall", **over))
    shape_router(ref, "skewed")
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)[0]
    y_ref.backward(dy)
    full_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for n, g in full_grads.items():
        if "experts" in n:  # each TP rank saw its own tokens: the total gradient is the sum
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
    full_state = {k: (v.clone() if v is not None else None) for k, v in ref.state_dict().items()}

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=2, expert_tensor_parallel_size=2, create_gloo_process_groups=False
    )
    q = ps.get_expert_tensor_parallel_rank()
    com = spec.submodules.mlp(config=make_config("comet", **over))
    sharded = {}
    for k, v in full_state.items():
        if k.endswith("linear_fc1.weight"):
            v = _shard_fc1(v, q, 2, gated)
        elif k.endswith("linear_fc2.weight"):
            v = v.chunk(2, dim=1)[q]
        sharded[k] = v
    com.load_state_dict(sharded, strict=True)
    xc = x.clone().requires_grad_(True)
    y_com = com(xc)[0]
    y_com.backward(dy)
    errs = {"out": rel_err(y_com, y_ref), "grad_x": rel_err(xc.grad, xr.grad)}
    for n, p in com.named_parameters():
        g = full_grads[n]
        if n.endswith("linear_fc1.weight"):
            g = _shard_fc1(g, q, 2, gated)
        elif n.endswith("linear_fc2.weight"):
            g = g.chunk(2, dim=1)[q]
        errs[n] = rel_err(p.grad, g)
    return errs


@pytest.mark.parametrize("gated,topk", [(True, 2), (False, 1)])
def test_expert_tensor_parallel_matches_full_weights(gated, topk):
    results = run_distributed(_body, 2, tp=2, ep=1, etp=1, gated=gated, topk=topk)
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"
