"""Extremes, randomized routings, bounded waits, repeated use and recomputation of the fused path.

Every case runs the comet layer's fused path (Triton interpreter, gloo ranks sharing /dev/shm
workspaces) against its reference transport (already pinned to Megatron's alltoall dispatcher by
test_layer_parity.py) on the same weights and routing.
"""

from __future__ import annotations

import pytest

from mp import run_distributed

INTERPRET = {"TRITON_INTERPRET": "1"}
TOL = 1e-4


def _extremes_body(rank, world):
    import torch

    from routing_cases import build_two, compare, random_routing, run_stages

    E, K, H = 4, 2, 16
    cases = {
        "all_to_one_expert": dict(tokens=9, rmap="one"),
        "rank0_sends_nothing": dict(tokens=0 if rank == 0 else 7, rmap="random"),
        "topk_equals_experts": dict(tokens=5, rmap="all"),
        "single_token": dict(tokens=1, rmap="random"),
        "not_tile_multiple": dict(tokens=23, rmap="random"),
        "nan_input": dict(tokens=6, rmap="random", nan=True),
        "capacity_dropped_slots": dict(tokens=11, rmap="dropped"),
    }
    results = {}
    for i, (name, case) in enumerate(cases.items()):
        topk = E if case["rmap"] == "all" else K
        ref, fused = build_two(dict(moe_router_topk=topk, num_moe_experts=E), "cuda_ipc", seed=40 + i)
        T = case["tokens"]
        if case["rmap"] == "one":
            rmap = torch.zeros(T, E, dtype=torch.bool)
            rmap[:, E - 1] = True  # every token of every rank to the last rank's expert...
            rmap[:, 0] = True      # ...and to the first (top-2)
            probs = torch.rand(T, E, generator=torch.Generator().manual_seed(i)) * rmap
        elif case["rmap"] == "all":
            rmap = torch.ones(T, E, dtype=torch.bool)
            probs = torch.rand(T, E, generator=torch.Generator().manual_seed(i))
        else:
            probs, rmap = random_routing(T, E, topk, seed=100 * i + rank,
                                         drop=0.3 if case["rmap"] == "dropped" else 0.0)
        g = torch.Generator().manual_seed(1000 * i + rank)
        x = torch.randn(T, H, generator=g)
        if case.get("nan") and T > 2:
            x[2, 3] = float("nan")
        dy = torch.randn(T, H, generator=g)
        a = run_stages(fused, x, probs, rmap, dy)
        b = run_stages(ref, x, probs, rmap, dy)
        results[name] = (fused.transport, compare(a, b))
    return results


@pytest.mark.slow
def test_extreme_routings_match_reference():
    results = run_distributed(_extremes_body, 2, ep=2, env=INTERPRET, world=2)
    for rank, per_rank in enumerate(results):
        for name, (transport, errs) in per_rank.items():
            assert transport == "cuda_ipc", (name, transport)
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            assert not bad, f"rank {rank} {name}: {bad}"


def _random_body(rank, seeds):
    import torch

    from routing_cases import build_two, compare, random_routing, run_stages

    out = []
    g0 = torch.Generator().manual_seed(7)
    for seed in seeds:
        cfg = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
        E = [4, 8][cfg[0] % 2]
        K = 1 + cfg[1] % 3
        T = 1 + cfg[2] % 29
        skew = (cfg[3] % 4) * 0.8
        ref, fused = build_two(dict(moe_router_topk=K, num_moe_experts=E,
                                    gated_linear_unit=bool(seed % 2)), "cuda_ipc", seed=seed)
        probs, rmap = random_routing(T, E, K, seed=seed * 10 + rank, skew=skew)
        g = torch.Generator().manual_seed(seed * 100 + rank)
        x, dy = torch.randn(T, 16, generator=g), torch.randn(T, 16, generator=g)
        errs = compare(run_stages(fused, x, probs, rmap, dy), run_stages(ref, x, probs, rmap, dy))
        out.append((seed, dict(E=E, K=K, T=T, skew=skew), errs))
    del g0
    return out


@pytest.mark.slow
def test_randomized_routings_match_reference():
    results = run_distributed(_random_body, 2, ep=2, env=INTERPRET, seeds=list(range(12)))
    for rank, per_rank in enumerate(results):
        for seed, shape, errs in per_rank:
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            assert not bad, f"rank {rank} seed {seed} {shape}: {bad}"


def _timeout_body(rank, mode):
    import time

    import torch

    from routing_cases import build_two, random_routing, run_stages

    _, fused = build_two(dict(moe_router_topk=2), "cuda_ipc", seed=3)
    probs, rmap = random_routing(6, 4, 2, seed=rank)
    x = torch.randn(6, 16)
    fused._resolve_fused(x)
    ws = fused._fused.workspace
    ws.timeout_s = fused._fused.timeout_s = 2.0
    ws.ensure_capacity(6)  # both ranks allocate the workspace together (a collective)
    ws.view.timeout = 4000  # interpreter spins: a couple of seconds
    if rank == 1:
        if mode in ("stuck", "stuck-nograd", "stuck-no-backward"):  # agrees on the size, never runs kernels
            ws.ensure_capacity(6)
            time.sleep(20)
            return "peer"
        if mode == "stuck-in-backward":  # a whole forward, then never its backward round
            xi = x.clone().requires_grad_(True)
            h, pp = fused.preprocess(xi, probs.clone().requires_grad_(True), rmap)
            d, pp = fused.dispatch(h, pp)
            fused.routed_experts_compute(d, pp)
            time.sleep(20)
            return "peer"
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)  # mode "dead": the process is killed
    t0 = time.time()
    try:
        if mode == "stuck-nograd":  # a forward without autograd checks at its end
            with torch.no_grad():
                h, pp = fused.preprocess(x, probs, rmap)
                d, pp = fused.dispatch(h, pp)
                fused.routed_experts_compute(d, pp)
        elif mode == "stuck-no-backward":  # a forward under autograd whose backward never runs ...
            h, pp = fused.preprocess(x.clone().requires_grad_(True), probs.clone().requires_grad_(True), rmap)
            d, pp = fused.dispatch(h, pp)
            fused.routed_experts_compute(d, pp)
            t0 = time.time()
            run_stages(fused, x, probs, rmap, torch.randn(6, 16))  # ... is checked by the next forward
        else:
            run_stages(fused, x, probs, rmap, torch.randn(6, 16))
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc), time.time() - t0)
    return "no error"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stuck", "dead", "stuck-in-backward", "stuck-nograd", "stuck-no-backward"])
def test_peer_that_never_signals_raises_naming_rank_layer_phase(mode):
    results = run_distributed(_timeout_body, 2, ep=2, env=INTERPRET, timeout=300, mode=mode,
                              may_die=(1,))
    assert results[1] == (None if mode == "dead" else "peer")
    kind, message, seconds = results[0]
    assert kind == "CometTimeout", (kind, message)
    # A forward under autograd and its backward round are checked when the backward pass ends, and raised
    # from y.backward(), naming the round whose wait failed; a dead peer fails the workspace agreement
    # at the start of the forward.
    phase = {"stuck": "during forward (checked at the end of the backward pass)",
             "stuck-in-backward": "during backward (checked at the end of the backward pass)",
             "dead": "forward",
             "stuck-nograd": ", forward: rank 0/2: ",  # checked at the end of the forward
             "stuck-no-backward": "during an earlier forward (checked at the next forward)"}[mode]
    assert "rank 0/2" in message and "layer" in message and phase in message, message
    assert "--comet-wait-timeout-s" in message
    if mode.startswith("stuck") and mode != "stuck-in-backward":
        assert "timed out waiting for" in message, message  # the kernel's bounded wait
    assert seconds < 60, f"took {seconds:.0f}s to give up"


def _repeat_body(rank, calls):
    import torch

    from routing_cases import build_two, compare, random_routing, run_stages

    ref, fused = build_two(dict(moe_router_topk=2), "cuda_ipc", seed=5)
    worst = 0.0
    capacities = []
    for i in range(calls):
        T = 1 + (7 * i + 3 * rank) % 17  # varying, different per rank
        probs, rmap = random_routing(T, 4, 2, seed=i * 2 + rank)
        g = torch.Generator().manual_seed(i * 2 + rank)
        x, dy = torch.randn(T, 16, generator=g), torch.randn(T, 16, generator=g)
        errs = compare(run_stages(fused, x, probs, rmap, dy), run_stages(ref, x, probs, rmap, dy))
        worst = max(worst, max(errs.values()))
        capacities.append(fused._fused.workspace.view.layout.capacity_tokens)
    return worst, capacities, fused._fused.workspace.view.epoch


@pytest.mark.slow
def test_repeated_calls_varying_tokens_no_stale_flags():
    calls = 40
    results = run_distributed(_repeat_body, 2, ep=2, env=INTERPRET, calls=calls)
    for worst, capacities, epoch in results:
        assert worst <= TOL, worst
        assert epoch == 2 * calls  # one forward and one backward round per call
        assert capacities[-1] == capacities[len(capacities) // 2], "workspace kept growing"


def _recompute_body(rank):
    import comet_megatron
    from comet_megatron import CometConfig
    from moe_cases import run_layer_case

    comet_megatron.enable(CometConfig(transport="cuda_ipc", tile_m=16, tile_n=16, tile_k=16, comm_programs=1))
    return run_layer_case(rank, dict(moe_router_topk=2, recompute_granularity="selective",
                                     recompute_modules=["moe"]), "skewed", seed=8, seq=5, batch=2)


@pytest.mark.slow
def test_activation_recomputation_matches_megatron():
    results = run_distributed(_recompute_body, 2, ep=2, env=INTERPRET)
    for rank, res in enumerate(results):
        assert res["transport"] == "cuda_ipc"
        bad = {k: v for k, v in res["errs"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"


def _capacity_body(rank):
    import torch

    from comet_megatron.config import CometConfigError
    from routing_cases import build_two, random_routing, run_stages

    _, fused = build_two(dict(moe_router_topk=2), "cuda_ipc", seed=9)
    fused.comet_config.capacity = 4
    fused.comet_config.grow_workspace = False
    probs, rmap = random_routing(6 if rank == 1 else 3, 4, 2, seed=rank)
    x = torch.randn(rmap.shape[0], 16)
    try:
        run_stages(fused, x, probs, rmap, torch.randn_like(x))
    except CometConfigError as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
def test_workspace_too_small_names_flag_and_size():
    # rank 1 brings 6 tokens, rank 0 only 3: both ranks must refuse (the size is agreed on).
    results = run_distributed(_capacity_body, 2, ep=2, env=INTERPRET)
    for message in results:
        assert "--comet-capacity 6" in message and "--comet-grow-workspace" in message, message


def _fixed_capacity_body(rank):
    """Fixed capacity: the size is agreed on once (allocation); later calls skip the agreement (a host sync
    per call), and a batch that no longer fits is refused by its own rank while the peer's waits give up."""
    import time

    import torch
    import torch.distributed as dist

    from comet_megatron.config import CometConfigError
    from routing_cases import build_two, random_routing, run_stages

    _, fused = build_two(dict(moe_router_topk=2), "cuda_ipc", seed=9)
    fused.comet_config.capacity = 6
    fused.comet_config.grow_workspace = False
    agreements = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        agreements.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    out = {}
    for call, tokens in enumerate([3 + rank, 5 - rank, 4]):  # all fit: one agreement, at allocation
        probs, rmap = random_routing(tokens, 4, 2, seed=10 * call + rank)
        x = torch.randn(tokens, 16)
        run_stages(fused, x, probs, rmap, torch.randn_like(x))
        if call == 0:
            ws = fused._fused.workspace
            ws.timeout_s = fused._fused.timeout_s = 2.0
            ws.view.timeout = 4000  # interpreter spins: a couple of seconds
    out["agreements"] = len(agreements)
    probs, rmap = random_routing(9 if rank == 1 else 4, 4, 2, seed=99 + rank)  # rank 1 no longer fits
    x = torch.randn(rmap.shape[0], 16)
    t0 = time.time()
    try:
        run_stages(fused, x, probs, rmap, torch.randn_like(x))
        out["error"] = ("no error", "")
    except CometConfigError as exc:
        out["error"] = ("CometConfigError", str(exc))
    except Exception as exc:  # noqa: BLE001
        out["error"] = (type(exc).__name__, str(exc))
    out["seconds"] = time.time() - t0
    return out


@pytest.mark.slow
def test_fixed_capacity_agrees_once_and_an_oversized_batch_is_refused():
    results = run_distributed(_fixed_capacity_body, 2, ep=2, env=INTERPRET, timeout=300)
    for rank, res in enumerate(results):
        assert res["agreements"] == 1, res  # only when the workspace was allocated
        assert res["seconds"] < 60, res
    kind, message = results[1]["error"]
    assert kind == "CometConfigError" and "rank 1/2" in message and "--comet-capacity 9" in message, message
    kind, message = results[0]["error"]
    assert kind == "CometTimeout" and "timed out waiting for" in message, message


def _microbatches_body(rank):
    import torch

    from routing_cases import build_two, compare, random_routing

    ref, fused = build_two(dict(moe_router_topk=2), "cuda_ipc", seed=12)

    def forward(layer, x, probs, rmap):
        h, pp = layer.preprocess(x, probs, rmap)
        d, pp = layer.dispatch(h, pp)
        o, _ = layer.routed_experts_compute(d, pp)
        return layer.postprocess(layer.combine(o), None)

    # Three micro-batches in flight, as a pipeline schedule keeps them: all forwards first, then
    # the backwards in another order (1F1B-like); each fused call must keep its own state.
    batches = []
    for i in range(3):
        probs, rmap = random_routing(5 + 3 * i + rank, 4, 2, seed=50 + 10 * i + rank)
        g = torch.Generator().manual_seed(60 + 10 * i + rank)
        x, dy = torch.randn(rmap.shape[0], 16, generator=g), torch.randn(rmap.shape[0], 16, generator=g)
        batches.append((x, probs, rmap, dy))
    results = {}
    for tag, layer in (("fused", fused), ("ref", ref)):
        for p in layer.experts.parameters():
            p.grad = None
        outs, leaves = [], []
        for x, probs, rmap, _ in batches:
            xi, pi = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
            outs.append(forward(layer, xi, pi, rmap))
            leaves.append((xi, pi))
        for i in (1, 2, 0):
            outs[i].backward(batches[i][3])
        grads = {n: p.grad.clone() for n, p in layer.experts.named_parameters()}
        results[tag] = [(o.detach(), xi.grad, pi.grad, grads) for o, (xi, pi) in zip(outs, leaves)]
    return [compare(a, b) for a, b in zip(results["fused"], results["ref"])]


@pytest.mark.slow
def test_micro_batches_in_flight_backward_out_of_order():
    results = run_distributed(_microbatches_body, 2, ep=2, env=INTERPRET)
    for rank, per_rank in enumerate(results):
        for i, errs in enumerate(per_rank):
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            assert not bad, f"rank {rank} micro-batch {i}: {bad}"
