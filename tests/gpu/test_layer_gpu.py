"""The comet MoE layer on a CUDA GPU (bf16): fused path vs Megatron and vs the reference path,
and several ranks on ONE GPU sharing buffers through CUDA IPC.

Run on a GPU machine: `pytest -m gpu tests/gpu -s` (docs/GPU_TESTS.md records when and where).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from mp import run_distributed  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _layers(rank, transport, shape, dtype, seed):
    """(megatron alltoall+SequentialMLP, comet) layers on the GPU with identical weights."""
    import comet_megatron
    from comet_megatron import CometConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from moe_cases import make_config, shape_router

    comet_megatron.enable(CometConfig(transport=transport))
    model_parallel_cuda_manual_seed(seed)
    hidden, ffn, experts, topk = shape
    over = dict(hidden_size=hidden, ffn_hidden_size=ffn, moe_ffn_hidden_size=ffn, num_moe_experts=experts,
                moe_router_topk=topk, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                use_cpu_initialization=False, num_attention_heads=8)
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False)
    torch.manual_seed(seed)
    ref = spec.submodules.mlp(config=make_config("alltoall", **over)).cuda()
    com = spec.submodules.mlp(config=make_config("comet", **over)).cuda()
    shape_router(ref, "skewed")
    com.load_state_dict(ref.state_dict())
    return ref, com


def _fwd_bwd(layer, x, dy):
    xi = x.clone().requires_grad_(True)
    y, _ = layer(xi)
    y.backward(dy)
    return y.detach().float(), xi.grad.float(), {n: p.grad.float() for n, p in layer.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _parity_body(rank, transport, shape, tokens):
    from moe_cases import make_input

    dtype = torch.bfloat16
    ref, com = _layers(rank, transport, shape, dtype, seed=7)
    x = make_input(tokens, 1, shape[0], seed=rank).cuda().to(dtype)
    dy = torch.randn_like(x)
    y0, gx0, gp0 = _fwd_bwd(ref, x, dy)
    y1, gx1, gp1 = _fwd_bwd(com, x, dy)
    errs = {"out": _rel(y1, y0), "grad_x": _rel(gx1, gx0)}
    errs.update({n: _rel(gp1[n], g) for n, g in gp0.items() if g is not None})
    return {"transport": com.transport, "errs": errs}


def _check(results, transport, tol=3e-2):
    for rank, r in enumerate(results):
        assert r["transport"] == transport, r
        bad = {k: v for k, v in r["errs"].items() if not v <= tol}
        assert not bad, f"rank {rank}: {bad}"


def test_fused_layer_bf16_matches_megatron_one_rank():
    results = run_distributed(_parity_body, 1, ep=1, transport="emulated",
                              shape=(1024, 1408, 8, 2), tokens=1000)
    _check(results, "emulated")


@pytest.mark.parametrize("tokens", [16384, 2048])
def test_auto_at_ep_size_1_runs_the_reference_path_and_matches_megatron(tokens):
    # auto at EP size 1: the reference path at every size (with its Triton activation and per-token sums)
    results = run_distributed(_parity_body, 1, ep=1, transport="auto", shape=(512, 704, 8, 2), tokens=tokens)
    _check(results, "nccl")


@pytest.mark.parametrize("transport,world", [("cuda_ipc", 2), ("cuda_ipc", 4), ("symm_mem", 1)])
def test_fused_layer_bf16_several_ranks_one_gpu(transport, world):
    # Each process is one EP rank on the same GPU; buffers are shared through CUDA IPC or torch
    # symmetric memory and the process group is gloo (NCCL refuses two ranks on one GPU, and
    # Megatron's alltoall cannot move CUDA tensors over gloo). The oracle is Megatron's layer with ALL
    # experts on each rank. symm_mem at world 1 checks the allocation/rendezvous path alone (torch
    # refuses two ranks of symmetric memory on one GPU: see the next test).
    results = run_distributed(_ipc_body, world, ep=world, timeout=900, world=world, transport=transport)
    for rank, r in enumerate(results):
        assert r["transport"] == transport, r
        bad = {k: v for k, v in r["errs"].items() if not v <= 3e-2}
        assert not bad, f"rank {rank}: {bad}"


def test_symm_mem_on_a_shared_gpu_is_refused_clearly_and_auto_picks_cuda_ipc():
    results = run_distributed(_shared_gpu_body, 2, ep=2, timeout=300)
    for r in results:
        assert "one GPU per rank" in r["explicit"] and "use cuda_ipc" in r["explicit"], r
        assert r["auto"][0] == "cuda_ipc" and "share one GPU" in r["auto"][1], r
        assert "overlapping devices" in r["torch"], r  # what our message claims torch does


def _shared_gpu_body(rank):
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm
    from megatron.core import parallel_state as ps

    from comet_megatron import CometConfig
    from comet_megatron.transport import TransportUnavailable, resolve_transport

    group, dev = ps.get_expert_model_parallel_group(), torch.device("cuda", 0)
    out = {}
    try:
        resolve_transport(CometConfig(transport="symm_mem"), group, dev, (True, ""))
        out["explicit"] = "no error"
    except TransportUnavailable as exc:
        out["explicit"] = str(exc)
    out["auto"] = resolve_transport(CometConfig(transport="auto"), group, dev, (True, ""))
    buf = symm.empty(1 << 20, dtype=torch.uint8, device=dev)
    try:
        symm.rendezvous(buf, group=group)
        out["torch"] = "rendezvous succeeded"
    except RuntimeError as exc:
        out["torch"] = str(exc)
    dist.barrier()
    return out


def _ipc_body(rank, world, transport="cuda_ipc"):
    """EP=world fused layer vs each rank evaluating the full (all experts) layer itself."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from moe_cases import make_input

    dtype = torch.bfloat16
    shape = (512, 768, 2 * world, 2)
    x = make_input(700 + 37 * rank, 1, shape[0], seed=rank).cuda().to(dtype)
    dy = torch.randn_like(x)
    # Full layer (EP=1) built identically on every rank: the oracle for this rank's tokens.
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=1, create_gloo_process_groups=False)
    full_ref, _ = _layers(rank, "nccl", shape, dtype, seed=11)
    shared = [{k: v.cpu() for k, v in full_ref.state_dict().items() if v is not None}]
    dist.broadcast_object_list(shared, src=0)  # one set of weights for every rank
    state = shared[0]
    full_ref.load_state_dict({k: v.cuda() for k, v in state.items()}, strict=False)
    y0, gx0, gp0 = _fwd_bwd(full_ref, x, dy)
    # Expert-parallel comet layer holding this rank's experts of the same weights.
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=world, create_gloo_process_groups=False)
    import comet_megatron
    from comet_megatron import CometConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from moe_cases import make_config

    comet_megatron.enable(CometConfig(transport=transport))
    hidden, ffn, experts, topk = shape
    cfg = make_config("comet", hidden_size=hidden, ffn_hidden_size=ffn, moe_ffn_hidden_size=ffn,
                      num_moe_experts=experts, moe_router_topk=topk, params_dtype=dtype, bf16=True,
                      use_cpu_initialization=False, num_attention_heads=8)
    com = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False).submodules.mlp(config=cfg).cuda()
    el = experts // world
    local = {}
    for k in com.state_dict():
        src = k
        if ".local_experts." in k:
            i = int(k.split(".local_experts.")[1].split(".")[0])
            src = k.replace(f".local_experts.{i}.", f".local_experts.{rank * el + i}.")
        if src in state:  # (_extra_state entries are None and were not shared)
            local[k] = state[src]
    com.load_state_dict(local, strict=False)
    missing = [k for k, v in com.state_dict().items() if v is not None and k not in local]
    assert not missing, missing
    y1, gx1, gp1 = _fwd_bwd(com, x, dy)
    errs = {"out": _rel(y1, y0), "grad_x": _rel(gx1, gx0)}
    # Expert weight gradients: this rank's experts saw every rank's tokens, so the oracle is the
    # full layer's gradient summed over ranks (reduce every expert, in the same order everywhere).
    totals = {n: g.cpu().clone() for n, g in sorted(gp0.items()) if ".local_experts." in n}
    for total in totals.values():
        dist.all_reduce(total)
    for n, g in gp1.items():
        if ".local_experts." in n:
            i = int(n.split(".local_experts.")[1].split(".")[0])
            src = n.replace(f".local_experts.{i}.", f".local_experts.{rank * el + i}.")
            errs[n] = _rel(g.cpu(), totals[src])
    dist.barrier()
    return {"transport": com.transport, "errs": errs}


def _ddp_body(rank, transport, modes):
    """Megatron's DDP at world size 1 around Megatron's layer and the comet layer: fp32 main_grads after two
    micro-batches, for each way the comet experts hand their weight gradients to main_grad."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from moe_cases import make_input

    dtype = torch.bfloat16
    out = {}
    for mode in ("megatron",) + tuple(modes):
        os.environ["COMET_WGRAD_ACCUMULATION"] = mode if mode in ("gemm", "triton", "gluon", "add") else "auto"
        os.environ["COMET_MAIN_GRAD_HANDOFF"] = "0" if mode == "off" else "1"
        ref, com = _layers(rank, transport, (1024, 1408, 4, 2), dtype, seed=11)
        layer = ref if mode == "megatron" else com
        # no overlapped / final reduction: this group is gloo, which cannot reduce CUDA tensors (and at world
        # size 1 there is nothing to reduce); DDP's per-parameter hooks still run
        # "do": Megatron's distributed optimizer layout (expert weights re-homed descending and interleaved:
        # the reference path views them in reversed expert order and flips its rows)
        model = DistributedDataParallel(layer.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=mode == "do"), layer)
        model.zero_grad_buffer()
        if mode not in ("megatron", "off"):
            # the first micro-batch finds main_grad just zeroed: the comet routes write it, never read it
            # (experts.main_grads_zeroed); NaN here survives any add. The second micro-batch adds.
            for p in layer.experts.parameters():
                p.main_grad.fill_(float("nan"))
        for mb in range(2):
            x = make_input(1024, 1, 1024, seed=mb).cuda().to(dtype)
            dy = torch.randn(x.shape, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(mb))
            y, _ = model(x.clone().requires_grad_(True))
            y.backward(dy)
        out[mode] = {n: p.main_grad.float().clone() for n, p in layer.named_parameters()}
        out[mode + ":grad_left"] = [n for n, p in layer.named_parameters() if p.grad is not None]
        del model, ref, com
    os.environ.pop("COMET_WGRAD_ACCUMULATION")
    os.environ.pop("COMET_MAIN_GRAD_HANDOFF")
    errs = {f"{m}:{n}": _rel(out[m][n], g) for m in modes for n, g in out["megatron"].items()}
    left = {m: out[m + ":grad_left"] for m in modes}
    return {"errs": errs, "left": left, "norm": min(g.norm().item() for g in out[modes[0]].values())}


@pytest.mark.parametrize("transport", ["nccl", "emulated"])
def test_main_grads_under_megatron_ddp_match_megatron(transport):
    """Expert weight gradients into main_grad: per-expert GEMMs accumulating into fp32 main_grad ("gemm",
    the choice for few large experts), the one-launch Triton kernel doing the same for all experts ("triton",
    the choice otherwise), one grouped GEMM + one Triton accumulation launch ("add"), and DDP's own
    per-parameter hooks ("off"), the Hopper Gluon kernel ("gluon"; "add" where it cannot run), and under the distributed optimizer's parameter layout ("do"); reference and
    fused paths. Two micro-batches after `zero_grad_buffer()`: the first writes main_grad (poisoned with NaN
    before it, except where DDP's hook adds: "off"), the second adds."""
    modes = ("gemm", "triton", "gluon", "add", "off", "do")
    (res,) = run_distributed(_ddp_body, 1, ep=1, transport=transport, modes=modes)
    bad = {k: v for k, v in res["errs"].items() if not v <= 3e-2}
    assert not bad, bad
    assert res["norm"] > 0
    assert all(not names for names in res["left"].values()), res["left"]


def _determinism_body(rank):
    from moe_cases import make_input

    _, com = _layers(rank, "nccl", (1024, 1408, 16, 4), torch.bfloat16, seed=5)
    x = make_input(4096, 1, 1024, seed=1).cuda().to(torch.bfloat16)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        for p in com.parameters():
            p.grad = None
        runs.append(_fwd_bwd(com, x, dy))
    (y0, gx0, g0), (y1, gx1, g1) = runs
    same = torch.equal(y0, y1) and torch.equal(gx0, gx1) and all(
        torch.equal(g0[n], g1[n]) for n in g0 if g0[n] is not None)
    return {"transport": com.transport, "same": same, "norm": y0.norm().item()}


def test_reference_path_is_bitwise_reproducible():
    # the reference path sums each token's rows in a fixed order on a GPU (kernels/token_sum.py, no atomics):
    # two identical forward+backward calls give identical outputs and gradients without --comet-deterministic
    (res,) = run_distributed(_determinism_body, 1, ep=1)
    assert res["transport"] == "nccl" and res["norm"] > 0
    assert res["same"]
