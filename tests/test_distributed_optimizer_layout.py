"""Megatron's distributed optimizer re-homes the expert weights into its parameter buffer in its own order
(reversed, fc1 and fc2 interleaved): evenly spaced in descending order instead of back to back. The comet
layer then views them in reversed expert order (the reference path flips its rows, the fused kernels read
expert El-1-i's weights for view index i) and must compute the same output, input gradient and main_grads as
with the plain DDP layout, without copying the weights (no copy warning). Reference path at EP 1 and the fused
path (Triton interpreter) at EP 2, with the weight gradients handed to main_grad directly and, with the hand-off
switched off, through autograd and DDP's hooks (the stacked gradient un-reversed onto the parameters).

With --overlap-param-gather DDP waits for each module's parameter all-gather in a forward pre-hook of that module;
the grouped GEMMs bypass the expert linears' forward, so the comet experts run those hooks themselves: checked on
both paths against Megatron's own layer (every expert linear's pre-hook runs once per forward)."""

from __future__ import annotations

import pytest

from mp import run_distributed


def _body(rank, fused=False, bias=False):
    import logging

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import comet_megatron
    from comet_megatron import CometConfig, experts
    from comet_megatron.patches import cpu_training
    from moe_cases import make_config, make_input

    import os

    cpu_training.apply()
    comet_megatron.enable(
        CometConfig(transport="cuda_ipc", tile_m=16, tile_n=16, tile_k=16, comm_programs=1) if fused
        else CometConfig(transport="nccl"))
    cfg = make_config("comet", moe_router_topk=2, add_bias_linear=bias)
    flips = {"n": 0}
    real_reversed = experts.ExpertRows.reversed

    def counting(self):
        flips["n"] += 1
        return real_reversed(self)

    experts.ExpertRows.reversed = counting
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False)
    torch.manual_seed(3)
    state = spec.submodules.mlp(config=cfg).state_dict()
    x = make_input(8, 2, cfg.hidden_size, seed=11 + rank)
    dy = torch.randn(8, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(12 + rank))
    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("comet_megatron").addHandler(Catch(level=logging.WARNING))
    out = {}
    for do in (False, True):
        for handoff in ("1", "0"):
            os.environ["COMET_MAIN_GRAD_HANDOFF"] = handoff
            layer = spec.submodules.mlp(config=cfg)
            layer.load_state_dict(state)
            model = DistributedDataParallel(layer.config, DistributedDataParallelConfig(
                use_distributed_optimizer=do, overlap_grad_reduce=False, bucket_size=10**9), layer)
            p1, p2 = layer.experts.fc_params()
            layout = tuple(experts._layout(p) for p in (p1, p2))
            sizes = (p1[0].numel(), p2[0].numel())
            n_warn, n_flips = len(warnings), flips["n"]
            xin = x.clone().requires_grad_(True)
            y, _ = model(xin)
            y.backward(dy)
            copies = [w for w in warnings[n_warn:] if "do not lie back to back" in w]
            mains = [p.main_grad.clone() for p in p1 + p2]
            out[do, handoff] = (layout, sizes, len(copies), y.detach(), xin.grad, mains, layer.transport,
                                flips["n"] - n_flips)
    os.environ.pop("COMET_MAIN_GRAD_HANDOFF")
    return out


def _check(results, transport):
    for res in results:
        layout, sizes, warned, y, dx, mains, used, flips = res[False, "1"]
        assert used == transport
        assert layout == sizes and warned == 0 and flips == 0  # back to back
        assert sum(m.norm().item() > 0 for m in mains) >= len(mains) // 2  # gradients reached main_grad
        for key in ((False, "0"), (True, "1"), (True, "0")):
            layout_k, _, warned_k, y_k, dx_k, mains_k, _, flips_k = res[key]
            if key[0]:  # descending, fc1 and fc2 (and biases) interleaved: each linear's experts that far apart
                assert layout_k[0] == layout_k[1] <= -(sizes[0] + sizes[1]), layout_k
                # the reference path runs the experts in reversed order (rows flipped once per call); the
                # fused kernels read the reversed view directly
                assert flips_k == (0 if transport == "cuda_ipc" else 1), flips_k
            assert warned_k == 0, key
            assert torch_equal(y, y_k) and torch_equal(dx, dx_k), key
            assert all(torch_equal(a, b) for a, b in zip(mains, mains_k)), key


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_distributed_optimizer_layout_gives_the_same_gradients_without_copies(bias):
    _check(run_distributed(_body, 1, env={"TRITON_INTERPRET": "0"}, bias=bias), "nccl")


@pytest.mark.slow
def test_fused_path_reads_the_distributed_optimizer_layout_in_place():
    _check(run_distributed(_body, 2, ep=2, env={"TRITON_INTERPRET": "1"}, fused=True), "cuda_ipc")


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def _param_gather_body(rank, fused=False):
    """Megatron's DDP with the distributed optimizer and --overlap-param-gather: a forward must wait for the
    all-gather of every parameter bucket it reads (DDP's forward pre-hook on each module). The comet experts
    read the expert linears' weights without calling those modules: count the waits on the expert buckets."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import comet_megatron
    from comet_megatron import CometConfig
    from comet_megatron.patches import cpu_training
    from moe_cases import make_config, make_input

    cpu_training.apply()
    comet_megatron.enable(
        CometConfig(transport="cuda_ipc", tile_m=16, tile_n=16, tile_k=16, comm_programs=1) if fused
        else CometConfig(transport="nccl"))
    waits = {}
    real_finish = _ParamAndGradBucketGroup.finish_param_sync

    def counting(self, *args, **kwargs):
        waits[id(self)] = waits.get(id(self), 0) + 1
        return real_finish(self, *args, **kwargs)

    _ParamAndGradBucketGroup.finish_param_sync = counting
    out = {}
    torch.manual_seed(5)
    state = None
    for dispatcher in ("alltoall", "comet"):
        cfg = make_config(dispatcher, moe_router_topk=2)
        layer = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False).submodules.mlp(
            config=cfg)
        if state is None:
            state = layer.state_dict()
        layer.load_state_dict(state)
        model = DistributedDataParallel(layer.config, DistributedDataParallelConfig(
            use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
            bucket_size=10**9), layer)
        assert model.use_forward_hook
        # one more forward pre-hook on each expert linear, next to DDP's: every one must run per forward
        linears = [m for n, m in layer.named_modules() if n.endswith(("linear_fc1", "linear_fc2")) and "experts" in n]
        ran = []
        for m in linears:
            m.register_forward_pre_hook(lambda mod, args: ran.append(mod))
        x = make_input(8, 2, cfg.hidden_size, seed=21 + rank)
        waits.clear()
        y, _ = model(x)
        expert_groups = {id(model.param_to_bucket_group[p]) for n, p in layer.named_parameters() if "experts" in n}
        out[dispatcher] = (sum(waits.get(g, 0) for g in expert_groups), len(expert_groups), y.detach(),
                           len(linears), sorted(map(id, ran)) == sorted(map(id, linears)))
    return out


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["reference", "fused"])
def test_overlap_param_gather_waits_for_the_expert_weights(fused):
    env = {"TRITON_INTERPRET": "1" if fused else "0"}
    results = run_distributed(_param_gather_body, 2 if fused else 1, ep=2 if fused else 1, env=env, fused=fused)
    for res in results:
        megatron_waits, groups, y_ref, n_linears, megatron_all_ran = res["alltoall"]
        comet_waits, _, y, _, comet_all_ran = res["comet"]
        assert n_linears >= 4 and megatron_all_ran  # Megatron's own experts call every linear (and its hooks)
        assert comet_all_ran  # the grouped GEMMs bypass the linears' forward: their pre-hooks still run, once
        assert groups >= 1 and megatron_waits >= groups and comet_waits >= groups, (megatron_waits, comet_waits)
        assert torch_equal(y, y_ref) or _close(y, y_ref)


def _close(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
