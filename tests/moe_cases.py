"""Shared builders for MoE parity tests: Megatron's alltoall+SequentialMLP layer vs the comet layer
with identical weights, routing shaped on purpose (skewed, zero-token experts)."""

from __future__ import annotations

import torch

BASE = dict(
    num_layers=1,
    hidden_size=16,
    num_attention_heads=2,
    ffn_hidden_size=24,
    moe_ffn_hidden_size=24,
    num_moe_experts=4,
    moe_router_topk=2,
    use_cpu_initialization=True,
    add_bias_linear=False,
    gated_linear_unit=True,
    bf16=False,
    params_dtype=torch.float32,
    moe_aux_loss_coeff=0.0,
    moe_router_load_balancing_type="none",
)


def make_config(dispatcher: str, **overrides):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(BASE)
    kw.update(overrides)
    kw.setdefault("tensor_model_parallel_size", ps.get_tensor_model_parallel_world_size())
    kw.setdefault("expert_model_parallel_size", ps.get_expert_model_parallel_world_size())
    kw.setdefault(
        "expert_tensor_parallel_size", ps.get_expert_tensor_parallel_world_size()
    )
    if kw["moe_router_topk"] == 1:
        kw.setdefault("moe_router_pre_softmax", True)  # Megatron requires it for top-1
    if kw["tensor_model_parallel_size"] > 1:
        kw.setdefault("sequence_parallel", True)
    kw["moe_token_dispatcher_type"] = dispatcher
    return TransformerConfig(**kw)


def build_pair(overrides, routing: str, seed: int):
    """(megatron_layer, comet_layer) with the comet layer's weights copied from Megatron's."""
    import comet_megatron
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    comet_megatron.enable()
    ref_cfg = make_config("alltoall", **overrides)
    com_cfg = make_config("comet", **overrides)
    spec = get_gpt_layer_local_spec(num_experts=ref_cfg.num_moe_experts, moe_grouped_gemm=False)
    torch.manual_seed(seed)
    ref = spec.submodules.mlp(config=ref_cfg)
    com = spec.submodules.mlp(config=com_cfg)
    shape_router(ref, routing)
    com.load_state_dict(ref.state_dict(), strict=True)
    return ref, com


def shape_router(layer, routing: str) -> None:
    """Make routing uniform-random, skewed to expert 0, or with expert E-1 never chosen.

    Inputs from `make_input` carry a constant component along `direction()`; router rows aligned
    with it (or against it) attract (or repel) every token.
    """
    w = layer.router.weight.data
    u = direction(w.shape[1]).to(w.device, w.dtype)
    if routing in ("skewed", "zero"):
        w[0] += 1.5 * u  # logit +3: most tokens pick expert 0, the softmax stays unsaturated
    if routing == "zero":
        w[-1] -= 8.0 * u
    if routing not in ("uniform", "skewed", "zero"):
        raise ValueError(routing)


def direction(hidden: int) -> torch.Tensor:
    u = torch.ones(hidden)
    return u / u.norm()


def make_input(seq: int, batch: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, batch, hidden, generator=g)
    return x + 2.0 * direction(hidden)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def run_layer_case(rank: int, overrides: dict, routing: str, seed: int, seq: int = 8, batch: int = 2):
    """Forward + backward of both layers on the same input; relative errors of everything.

    The router's weight gradient is x^T (softmax Jacobian . dprobs), a sum of terms that largely
    cancel: its rounding error scales with |x| |dprobs|, not with its own (often tiny) norm. Its
    error is therefore measured against that scale, and the gradient of the router's output
    probabilities (what the dispatcher and experts produce) is compared directly.
    """
    ref, com = build_pair(overrides, routing, seed)
    hidden = ref.config.hidden_size
    x = make_input(seq, batch, hidden, seed * 1000 + rank)
    g = torch.Generator().manual_seed(seed * 7 + rank)
    dy = torch.randn(seq, batch, hidden, generator=g)
    outs = {}
    for tag, layer in (("ref", ref), ("com", com)):
        captured = {}

        def keep_probs(module, inputs, output):
            if output[0].requires_grad:  # with recomputation: the pass that builds the graph
                output[0].retain_grad()
                captured["probs"] = output[0]

        handle = layer.router.register_forward_hook(keep_probs)
        xi = x.clone().requires_grad_(True)
        y, bias = layer(xi)
        assert bias is None
        y.backward(dy)
        handle.remove()  # after backward: recomputation runs the router again there
        grads = {n: p.grad for n, p in layer.named_parameters()}
        outs[tag] = (y.detach(), xi.grad, grads, captured["probs"].grad)
    errs = {
        "out": rel_err(outs["com"][0], outs["ref"][0]),
        "grad_x": rel_err(outs["com"][1], outs["ref"][1]),
        "grad_router_probs": rel_err(outs["com"][3], outs["ref"][3]),
    }
    router_scale = x.norm().item() * outs["ref"][3].norm().item()
    for name, grad in outs["ref"][2].items():
        other = outs["com"][2][name]
        if grad is None and other is None:
            continue
        if grad is None or other is None:
            errs[name] = float("inf")
            continue
        if name.startswith("router."):
            errs[name] = (other - grad).double().norm().item() / max(grad.norm().item(), router_scale, 1e-30)
        else:
            errs[name] = rel_err(other, grad)
    return {
        "errs": errs,
        "type": type(com).__name__,
        "ref_type": type(ref).__name__,
        "transport": getattr(com, "transport", None),
        "pre_reduce": bool(getattr(getattr(getattr(com, "_fused", None), "kernel", None), "pre_reduce", False)),
    }
