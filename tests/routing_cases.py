"""Drive a comet layer's stages with a chosen routing (bypassing the router), for extreme cases."""

from __future__ import annotations

import torch


def random_routing(tokens: int, experts: int, topk: int, seed: int, skew: float = 0.0, drop: float = 0.0):
    """(probs [T, E] fp32, routing_map [T, E] bool): K distinct experts per token, drawn with a
    preference for low expert ids that grows with `skew`; with `drop`, that share of
    (token, expert) pairs is removed, as capacity dropping does."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(-skew * torch.arange(experts, dtype=torch.float64))
    rmap = torch.zeros(tokens, experts, dtype=torch.bool)
    for t in range(tokens):
        chosen = torch.multinomial(weights, topk, replacement=False, generator=g)
        rmap[t, chosen] = True
    if drop > 0:
        rmap &= torch.rand(tokens, experts, generator=g) >= drop
    probs = torch.rand(tokens, experts, generator=g) * rmap
    return probs.float(), rmap


def run_stages(layer, x: torch.Tensor, probs: torch.Tensor, rmap: torch.Tensor, dy: torch.Tensor):
    """Forward + backward of the layer's MoE stages on a given routing.

    Returns (y, grad_x, grad_probs, {expert param name: grad})."""
    xi = x.clone().requires_grad_(True)
    p = probs.clone().requires_grad_(True)
    for prm in layer.experts.parameters():
        prm.grad = None
    h, pp = layer.preprocess(xi, p, rmap)
    d, pp = layer.dispatch(h, pp)
    o, _ = layer.routed_experts_compute(d, pp)
    o = layer.combine(o)
    y = layer.postprocess(o, None)
    y.backward(dy)
    grads = {n: prm.grad.clone() if prm.grad is not None else torch.zeros_like(prm)
             for n, prm in layer.experts.named_parameters()}
    return y.detach(), xi.grad, p.grad, grads


def build_two(overrides, transport: str, seed: int):
    """(reference-transport comet layer, `transport` comet layer) with identical weights."""
    import comet_megatron
    from comet_megatron import CometConfig
    from comet_megatron.integration import attach
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from moe_cases import make_config

    comet_megatron.enable()
    base = CometConfig(tile_m=16, tile_n=16, tile_k=16, comm_programs=1, wait_timeout_s=30)
    ref_cfg = attach(make_config("comet", **overrides), CometConfig(**{**base.to_dict(), "transport": "nccl"}))
    fus_cfg = attach(make_config("comet", **overrides), CometConfig(**{**base.to_dict(), "transport": transport}))
    spec = get_gpt_layer_local_spec(num_experts=ref_cfg.num_moe_experts, moe_grouped_gemm=False)
    torch.manual_seed(seed)
    ref = spec.submodules.mlp(config=ref_cfg)
    fused = spec.submodules.mlp(config=fus_cfg)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def compare(a, b) -> dict:
    """Relative errors of run_stages results `a` against `b` (NaN patterns must match)."""
    def rel(u, v):
        u, v = u.double(), v.double()
        nan_u, nan_v = torch.isnan(u), torch.isnan(v)
        if not torch.equal(nan_u, nan_v):
            return float("inf")
        u, v = u.masked_fill(nan_u, 0), v.masked_fill(nan_v, 0)
        d = v.norm().item()
        return (u - v).norm().item() / (d if d > 0 else 1.0)

    errs = {"out": rel(a[0], b[0]), "grad_x": rel(a[1], b[1]), "grad_probs": rel(a[2], b[2])}
    for name in b[3]:
        errs[name] = rel(a[3][name], b[3][name])
    return errs
