"""Registration with Megatron: enable/disable, argument parsing, config checks, expert math."""

from __future__ import annotations

import argparse
import types

import pytest
import torch

from mp import run_distributed


def test_enable_is_idempotent_and_disable_restores():
    import comet_megatron
    from comet_megatron import integration
    from megatron.core.transformer.moe.moe_layer import MoELayer

    comet_megatron.disable()
    assert "__new__" not in MoELayer.__dict__
    cfg = comet_megatron.enable()
    first = MoELayer.__dict__["__new__"]
    assert comet_megatron.enable() is cfg
    assert MoELayer.__dict__["__new__"] is first, "a second enable() must not wrap again"
    assert integration.is_enabled()
    custom = comet_megatron.CometConfig(comm_programs=8)
    assert comet_megatron.enable(custom) is custom
    assert integration.default_config() is custom
    comet_megatron.disable()
    assert "__new__" not in MoELayer.__dict__
    assert not integration.is_enabled()


def test_megatron_parser_accepts_comet_and_generated_flags():
    from megatron.training.arguments import add_megatron_arguments

    from comet_megatron import CometConfig, CometConfigError
    from comet_megatron.integration import config_from_args, extra_args_provider

    parser = extra_args_provider(add_megatron_arguments(argparse.ArgumentParser()))
    args = parser.parse_args(
        ["--moe-token-dispatcher-type", "comet", "--comet-comm-programs", "24",
         "--no-comet-overlap", "--comet-transport", "nccl", "--comet-tile-m", "64"]
    )
    assert args.moe_token_dispatcher_type == "comet"
    cfg = config_from_args(args)
    assert cfg == CometConfig(comm_programs=24, overlap=False, transport="nccl", tile_m=64)
    with pytest.raises(SystemExit):
        parser.parse_args(["--moe-token-dispatcher-type", "cometx"])
    bad = parser.parse_args(["--comet-tile-m", "48"])
    with pytest.raises(CometConfigError, match="--comet-tile-m"):
        config_from_args(bad)


def test_unsupported_megatron_options_are_named():
    from comet_megatron import CometConfigError
    from comet_megatron.layer import validate_transformer_config

    cfg = types.SimpleNamespace(
        moe_latent_size=None, fp8="hybrid", fp4=None, moe_shared_expert_overlap=True,
        transformer_impl="local", moe_router_padding_for_quantization=False,
        overlap_moe_expert_parallel_comm=False, moe_permute_fusion=True, moe_enable_deepep=False,
    )
    with pytest.raises(CometConfigError) as info:
        validate_transformer_config(cfg)
    message = str(info.value)
    assert "--fp8-format" in message and "--moe-shared-expert-overlap" in message
    assert "--moe-permute-fusion" in message  # another dispatcher's option
    assert "alltoall" in message  # names the fallback


def test_unsupported_megatron_version_is_named(monkeypatch):
    import megatron.core

    from comet_megatron import patches

    monkeypatch.setattr(megatron.core, "__version__", "0.42.0")
    with pytest.raises(ImportError, match=r"0\.42\.0.*0\.19\.x"):
        patches.current()


def _experts_body(rank, gated, bias, activation):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import comet_megatron
    from comet_megatron.experts import CometGroupedMLP
    from moe_cases import make_config

    comet_megatron.enable()
    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation]
    cfg = make_config(
        "comet", gated_linear_unit=gated, add_bias_linear=bias, activation_func=act,
        bias_activation_fusion=False, num_moe_experts=3,
    )
    spec = get_gpt_layer_local_spec(num_experts=3, moe_grouped_gemm=False)
    torch.manual_seed(3)
    layer = spec.submodules.mlp(config=cfg)
    experts = layer.experts
    assert isinstance(experts, CometGroupedMLP)
    for p in experts.parameters():  # biases start at zero: make them matter
        torch.nn.init.normal_(p, std=0.3)
    counts = [5, 0, 4]  # an expert with no tokens
    x = torch.randn(sum(counts), 16, requires_grad=True)
    probs = torch.rand(sum(counts), requires_grad=True)
    y, _ = experts(x, torch.tensor(counts), probs)
    dy = torch.randn_like(y)
    y.backward(dy)
    # float64 reference, written from Megatron's MLP semantics
    rows, start = [], 0
    xd, pd = x.detach().double().requires_grad_(True), probs.detach().double().requires_grad_(True)
    params = {n: p.detach().double().requires_grad_(True) for n, p in experts.named_parameters()}
    for e, n in enumerate(counts):
        xe, pe = xd[start:start + n], pd[start:start + n, None]
        w1 = params[f"local_experts.{e}.linear_fc1.weight"]
        w2 = params[f"local_experts.{e}.linear_fc2.weight"]
        pre = xe @ w1.t()
        if bias:
            pre = pre + params[f"local_experts.{e}.linear_fc1.bias"]
        if gated:
            a, b = pre.chunk(2, dim=-1)
            h = act(a) * b
        else:
            h = act(pre)
        out = (h * pe) @ w2.t()
        if bias:
            out = out + params[f"local_experts.{e}.linear_fc2.bias"] * pe
        rows.append(out)
        start += n
    ref = torch.cat(rows)
    ref.backward(dy.double())
    errs = {"out": (y.double() - ref).norm().item() / ref.norm().item(),
            "grad_x": (x.grad.double() - xd.grad).norm().item() / xd.grad.norm().item(),
            "grad_probs": (probs.grad.double() - pd.grad).norm().item() / pd.grad.norm().item()}
    for n, p in experts.named_parameters():
        ref_grad = params[n].grad
        if ref_grad.norm() == 0:
            errs[n] = (p.grad.double() - ref_grad).norm().item()
        else:
            errs[n] = (p.grad.double() - ref_grad).norm().item() / ref_grad.norm().item()
    return errs


@pytest.mark.parametrize(
    "gated,bias,activation",
    [(True, False, "silu"), (True, True, "silu"), (False, True, "gelu"), (False, False, "relu")],
)
def test_grouped_experts_match_float64_reference(gated, bias, activation):
    (errs,) = run_distributed(_experts_body, 1, gated=gated, bias=bias, activation=activation)
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    assert not bad, bad


def test_enable_makes_every_megatron_parse_accept_comet_flags(monkeypatch):
    """megatron-core 0.19 parses sys.argv twice (initialize, then pretrain's ft_integration) with
    no provider the second time: after enable() both accept the flags, and the layers' default
    config is what was parsed."""
    import sys

    from megatron.training import arguments, global_vars

    import comet_megatron
    from comet_megatron import integration

    comet_megatron.disable()
    monkeypatch.setattr(sys, "argv", ["train.py", "--moe-token-dispatcher-type", "comet",
                                      "--comet-comm-programs", "12", "--no-comet-overlap"])
    with pytest.raises(SystemExit):
        arguments.parse_args(ignore_unknown_args=True)  # without enable(): 'comet' is rejected
    comet_megatron.enable()
    try:
        args = arguments.parse_args(ignore_unknown_args=True)
        assert args.moe_token_dispatcher_type == "comet"
        again = arguments.parse_args(integration.extra_args_provider)  # composes, no duplicates
        assert again.comet_comm_programs == "12"
        monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
        cfg = integration.default_config()
        assert cfg.comm_programs == 12 and cfg.overlap is False
    finally:
        comet_megatron.disable()
    assert not getattr(arguments.parse_args, "__comet_megatron_patch__", False)


def test_stacked_expert_weights_are_views_with_per_parameter_gradients():
    from comet_megatron.experts import _back_to_back, stack_weight_views

    base = torch.randn(3, 4, 5)
    params = [torch.nn.Parameter(torch.empty(4, 5)) for _ in range(3)]
    stacked = torch.zeros(3, 4, 5)
    for i, p in enumerate(params):
        p.data = stacked[i]
        p.data.copy_(base[i])
    assert _back_to_back(params)
    w, _ = stack_weight_views(params)
    assert w.data_ptr() == params[0].data_ptr() and torch.equal(w, base)
    g = torch.randn(3, 4, 5)
    (w * g).sum().backward()
    for i, p in enumerate(params):
        assert torch.equal(p.grad, g[i])
    loose = [torch.nn.Parameter(base[i].clone()) for i in range(3)]
    assert not _back_to_back(loose)
    w2, _ = stack_weight_views(loose)
    assert torch.equal(w2, base) and w2.data_ptr() != loose[0].data_ptr()


def _spec_helpers_body(rank):
    import comet_megatron
    from comet_megatron import specs
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from moe_cases import make_config, make_input, rel_err

    comet_megatron.disable()  # the helpers must not depend on enable()
    moe_from_helper = comet_megatron.get_moe_module_spec(num_experts=4)(config=make_config("comet"))
    layer_spec = specs.get_gpt_layer_spec(num_experts=4, use_te=False)
    moe_from_layer_spec = layer_spec.submodules.mlp(config=make_config("comet"))
    torch.manual_seed(0)
    ref = get_gpt_layer_local_spec(num_experts=4).submodules.mlp(config=make_config("alltoall"))
    x = make_input(8, 2, 16, seed=rank)
    errs = {}
    for name, layer in (("moe spec", moe_from_helper), ("layer spec", moe_from_layer_spec)):
        layer.load_state_dict(ref.state_dict())
        errs[name] = (type(layer).__name__, rel_err(layer(x)[0].detach(), ref(x)[0].detach()))
    return errs


def test_spec_helpers_build_comet_layers_equal_to_megatron():
    (errs,) = run_distributed(_spec_helpers_body, 1)
    for name, (kind, err) in errs.items():
        assert kind == "CometMoELayer", (name, kind)
        assert err <= 1e-6, (name, err)
