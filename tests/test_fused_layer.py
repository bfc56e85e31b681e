"""The comet layer's fused path (Triton interpreter, CPU) == Megatron's alltoall dispatcher.

Ranks are gloo processes; the fused kernels reach peers through the `cuda_ipc` transport, which on
the CPU maps each rank's workspace from /dev/shm (world 1 uses the in-process `emulated` one).
"""

from __future__ import annotations

import pytest

from mp import run_distributed

INTERPRET = {"TRITON_INTERPRET": "1"}


def _body(rank, transport, cases, pre_reduce=False):
    import comet_megatron
    from comet_megatron import CometConfig
    from moe_cases import run_layer_case

    comet_megatron.enable(CometConfig(transport=transport, tile_m=16, tile_n=16, tile_k=16, comm_programs=1,
                                      pre_reduce=pre_reduce))
    out = []
    for i, (overrides, routing) in enumerate(cases):
        res = run_layer_case(rank, overrides, routing, seed=31 + i, seq=6, batch=2)
        out.append((overrides, routing, res))
    return out


CASES = [
    (dict(moe_router_topk=2), "skewed"),
    (dict(moe_router_topk=1), "uniform"),
    (dict(moe_router_topk=4, gated_linear_unit=False), "zero"),
    (dict(moe_router_topk=2, moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True), "uniform"),
]


@pytest.mark.slow
@pytest.mark.parametrize("world,transport", [(1, "emulated"), (2, "cuda_ipc"), (4, "cuda_ipc")])
def test_fused_layer_matches_megatron_alltoall(world, transport):
    results = run_distributed(_body, world, ep=world, env=INTERPRET, transport=transport, cases=CASES)
    for rank, per_rank in enumerate(results):
        for overrides, routing, res in per_rank:
            assert res["transport"] == transport, res
            bad = {k: v for k, v in res["errs"].items() if not v <= 1e-4}
            assert not bad, f"rank {rank} {overrides} {routing}: {bad}"


@pytest.mark.slow
def test_fused_layer_pre_reduce_matches_megatron_alltoall():
    """--comet-pre-reduce at EP=2: top-4 of 8 experts puts several of a token's experts on each rank."""
    cases = [(dict(moe_router_topk=4), "uniform"), (dict(moe_router_topk=2), "skewed"),
             # dropped tokens: their free slots carry an unused expert at weight 0, grouped like any other
             (dict(moe_router_topk=2, moe_expert_capacity_factor=1.0), "skewed")]
    results = run_distributed(_body, 2, ep=2, env=INTERPRET, transport="cuda_ipc", cases=cases, pre_reduce=True)
    for rank, per_rank in enumerate(results):
        for overrides, routing, res in per_rank:
            assert res["transport"] == "cuda_ipc" and res["pre_reduce"], res
            bad = {k: v for k, v in res["errs"].items() if not v <= 1e-4}
            assert not bad, f"rank {rank} {overrides} {routing}: {bad}"
