"""Megatron ModuleSpecs that build comet MoE layers directly.

With `comet_megatron.enable()` any Megatron spec builds comet layers whenever
`moe_token_dispatcher_type == "comet"`; these helpers are for code that assembles specs itself.
"""

from __future__ import annotations

import functools

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from comet_megatron.experts import CometGroupedMLP
from comet_megatron.layer import CometMoELayer


def get_moe_module_spec(num_experts: int | None = None, **_ignored):
    """`functools.partial(CometMoELayer, submodules=...)`: the MoE entry of a layer spec."""
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    experts = functools.partial(CometGroupedMLP, submodules=linears)
    shared = functools.partial(SharedExpertMLP, submodules=linears)
    return functools.partial(
        CometMoELayer, submodules=MoESubmodules(experts=experts, shared_experts=shared)
    )


def get_gpt_layer_spec(num_experts: int, use_te: bool | None = None, **kwargs):
    """A GPT transformer-layer spec (local or Transformer Engine) whose MLP is the comet MoE layer."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        from megatron.core.extensions.transformer_engine import HAVE_TE

        use_te = HAVE_TE
    build = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        if use_te
        else gpt_layer_specs.get_gpt_layer_local_spec
    )
    spec = build(num_experts=num_experts, **kwargs)
    spec.submodules.mlp = get_moe_module_spec(num_experts)
    return spec
