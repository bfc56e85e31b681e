"""Megatron's distributed optimizer re-homes the expert weights into its parameter buffer in its own order
(reversed, fc1 and fc2 interleaved): evenly spaced in descending order instead of back to back. The comet
layer then views them in reversed expert order (flipping its rows) and must compute the same output and
main_grads as with the plain DDP layout, without copying the weights (no copy warning)."""

from __future__ import annotations

from mp import run_distributed


def _body(rank):
    import logging

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import comet_megatron
    from comet_megatron import CometConfig, experts
    from comet_megatron.patches import cpu_training
    from moe_cases import make_config, make_input

    cpu_training.apply()
    comet_megatron.enable(CometConfig(transport="nccl"))
    cfg = make_config("comet", moe_router_topk=2)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False)
    torch.manual_seed(3)
    state = spec.submodules.mlp(config=cfg).state_dict()
    x = make_input(8, 2, cfg.hidden_size, seed=11)
    dy = torch.randn(8, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(12))
    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("comet_megatron").addHandler(Catch(level=logging.WARNING))
    out = {}
    for do in (False, True):
        layer = spec.submodules.mlp(config=cfg)
        layer.load_state_dict(state)
        model = DistributedDataParallel(layer.config, DistributedDataParallelConfig(
            use_distributed_optimizer=do, overlap_grad_reduce=False, bucket_size=10**9), layer)
        p1, p2 = layer.experts.fc_params()
        layout = tuple(experts._layout(p) for p in (p1, p2))
        sizes = (p1[0].numel(), p2[0].numel())
        n_warn = len(warnings)
        y, _ = model(x.clone().requires_grad_(True))
        y.backward(dy)
        copies = [w for w in warnings[n_warn:] if "do not lie back to back" in w]
        mains = [p.main_grad.clone() for p in p1 + p2]
        out[do] = (layout, sizes, len(copies), y.detach(), mains)
    return out


def test_distributed_optimizer_layout_gives_the_same_gradients_without_copies():
    (res,) = run_distributed(_body, 1)
    layout, sizes, warned, y, mains = res[False]
    layout_do, _, warned_do, y_do, mains_do = res[True]
    assert layout == sizes and warned == 0  # back to back
    # descending, fc1 and fc2 interleaved: each linear's experts one fc1 + fc2 apart
    assert layout_do == (-(sizes[0] + sizes[1]),) * 2 and warned_do == 0
    assert torch_equal(y, y_do)
    assert all(torch_equal(a, b) for a, b in zip(mains, mains_do))


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
