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
    """Mixture-of-experts layer whose all-to-all is comet's (see module docstring).

    `backward_dw(routed_experts=True, shared_experts=False)` is MoELayer's: with
    `config.delay_wgrad_compute` it reaches `CometGroupedMLP.backward_dw`, which computes the
    expert weight gradients both paths queued in backward (docs/ARCHITECTURE.md).
    """

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
        self.token_dispatcher.deterministic = self.comet_config.deterministic

    # ------------------------------------------------------------------ fused path
    # The reference path is MoELayer's own stage sequence on CometTokenDispatcher. When the
    # transport resolves to a symmetric workspace, the stages below collapse "dispatch + GEMM0"
    # and "GEMM1 + combine" into the fused operation run by `routed_experts_compute`.
    _fused = None
    _transport: str | None = None
    _announced = False  # class-wide: whether a layer of this process logged its transport

    @property
    def transport(self) -> str | None:
        """The resolved transport (None until the first forward)."""
        return self._transport

    def _resolve_fused(self, hidden_states):
        if self._transport is not None:
            return self._fused
        from comet_megatron.fused import FusedExperts, fused_support
        from comet_megatron.transport import resolve_transport

        support = fused_support(self.config, self.token_dispatcher.tp_size, hidden_states.dtype)
        transport, why = resolve_transport(self.comet_config, self.ep_group, hidden_states.device, support)
        if transport != "nccl":
            self._fused = FusedExperts(
                self.comet_config, self.config, transport, self.ep_group,
                hidden_states.device, hidden_states.dtype, layer_name=str(self.layer_number),
            )
        self._transport = transport
        path = "fused" if self._fused is not None else "reference"
        # The first layer of a process says it at INFO; the others only at DEBUG.
        level = logging.DEBUG if CometMoELayer._announced else logging.INFO
        CometMoELayer._announced = True
        log.log(level, "comet: MoE layer %s uses the %s transport (%s path)%s",
                self.layer_number, transport, path, f": {why}" if why else "")
        return self._fused

    def preprocess(self, hidden_states, probs, routing_map):
        if self._resolve_fused(hidden_states) is None:
            return super().preprocess(hidden_states, probs, routing_map)
        self._hidden_shape = hidden_states.shape
        self._routing_map = routing_map
        return hidden_states.reshape(-1, hidden_states.shape[-1]), probs

    def dispatch(self, hidden_states, probs):
        if self._fused is None:
            return super().dispatch(hidden_states, probs)
        return hidden_states, probs  # the fused operation dispatches inside its GEMM0 kernel

    def routed_experts_compute(self, hidden_states, probs):
        if self._fused is None:
            return super().routed_experts_compute(hidden_states, probs)
        routing_map, self._routing_map = self._routing_map, None
        return self._fused(hidden_states, routing_map, probs, self.experts), None

    def combine(self, output):
        if self._fused is None:
            return super().combine(output)
        return output  # combined inside the fused GEMM1 kernel

    def postprocess(self, output, shared_expert_output):
        if self._fused is None:
            return super().postprocess(output, shared_expert_output)
        output = output.view(self._hidden_shape)
        if shared_expert_output is not None:
            output = output + shared_expert_output
        return output
