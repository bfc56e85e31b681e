"""`CometMoELayer`: Megatron's `MoELayer` with comet's dispatcher and grouped experts.

Same router (and so the same aux losses), same shared experts, same parameter names and checkpoint
layout. The stage methods `dispatch`, `routed_experts_compute` and `combine` are the seam where
the fused path replaces "dispatch + GEMM0" and "GEMM1 + combine" each by one fused operation;
with the reference transport they run Megatron's stage sequence on `CometTokenDispatcher`.
"""

from __future__ import annotations

import functools
import logging

from megatron.core.transformer.moe.moe_layer import MoELayer

from comet_megatron import patches
from comet_megatron.config import CometConfig, CometConfigError
from comet_megatron.dispatcher import CometTokenDispatcher
from comet_megatron.experts import CometGroupedMLP

log = logging.getLogger("comet_megatron")


def comet_config_of(config) -> CometConfig:
    """The CometConfig of a TransformerConfig: its `comet` attribute, else the enabled default."""
    cfg = getattr(config, "comet", None)
    if cfg is None:
        from comet_megatron import integration

        cfg = integration.default_config()
    if not isinstance(cfg, CometConfig):
        raise CometConfigError(
            f"TransformerConfig.comet must be a comet_megatron.CometConfig, got {type(cfg).__name__}"
        )
    return cfg


def validate_transformer_config(config) -> None:
    """Reject Megatron options the comet layer does not implement, naming flag and fix."""
    problems = patches.current().unsupported_features(config)
    if problems:
        lines = "\n".join(f"  {flag}: {why}" for flag, why in problems)
        raise CometConfigError(
            "--moe-token-dispatcher-type comet cannot be combined with:\n" + lines
        )


class CometMoELayer(MoELayer):
    """Mixture-of-experts layer whose all-to-all is comet's (see module docstring)."""

    def __init__(
        self,
        config,
        submodules=None,
        layer_number=None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
    ):
        validate_transformer_config(config)
        version_patch = patches.current()
        experts_builder = functools.partial(
            CometGroupedMLP,
            submodules=version_patch.local_expert_submodules(
                submodules.experts if submodules is not None else None
            ),
        )
        version_patch.init_moe_layer(
            self,
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
            name=name,
            dispatcher_cls=CometTokenDispatcher,
            experts_builder=experts_builder,
        )
        self.comet_config = comet_config_of(config)
