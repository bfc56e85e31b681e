"""Everything comet-megatron knows about megatron-core 0.19's private layout.

- `MoELayer.__new__` is replaced so that `MoELayer(config=...)` with
  `config.moe_token_dispatcher_type == "comet"` builds a `CometMoELayer` (a subclass). This catches
  every spec path (local, Transformer Engine, layer spec, decoder-block spec, user partials) with
  one marked, reversible replacement.
- `init_moe_layer` is `MoELayer.__init__` of 0.19 with the dispatcher and expert choice made by
  comet (0.19 picks the dispatcher with a hard-coded if/elif that rejects unknown types).
- `add_dispatcher_choice` makes Megatron's argument parser accept `--moe-token-dispatcher-type comet`
  (0.19 derives the choices from the `Literal` type of the config field).
"""

from __future__ import annotations

import argparse
import functools
import logging

log = logging.getLogger("comet_megatron.patches")

VERSION_PREFIX = "0.19."
MARKER = "__comet_megatron_patch__"


def _moe_module():
    from megatron.core.transformer.moe import moe_layer

    for symbol in ("MoELayer", "BaseMoELayer", "MoECudaGraphTensorStore"):
        if not hasattr(moe_layer, symbol):
            raise ImportError(
                f"megatron.core.transformer.moe.moe_layer.{symbol} not found: "
                f"comet-megatron's 0.19 patch does not match this megatron-core."
            )
    return moe_layer


# --------------------------------------------------------------------------- MoELayer redirect
_state: dict = {}


def install_moe_layer_redirect(comet_layer_cls) -> bool:
    """Make `MoELayer(...)` build `comet_layer_cls` when the dispatcher type is "comet".

    Returns False if it was already installed (idempotent)."""
    moe_layer = _moe_module()
    MoELayer = moe_layer.MoELayer
    current = MoELayer.__dict__.get("__new__")
    if current is not None and getattr(current, MARKER, False):
        return False

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("config", args[0] if args else None)
        if (
            cls is MoELayer
            and getattr(config, "moe_token_dispatcher_type", None) == "comet"
        ):
            cls = comet_layer_cls
        return object.__new__(cls)

    setattr(__new__, MARKER, True)
    __new__.__wrapped__ = current  # None: MoELayer had no __new__ of its own
    _state["had_new"] = current is not None
    MoELayer.__new__ = __new__
    log.info("comet-megatron: patched %s.MoELayer.__new__ (comet dispatcher)", moe_layer.__name__)
    return True


def uninstall_moe_layer_redirect() -> None:
    moe_layer = _moe_module()
    MoELayer = moe_layer.MoELayer
    current = MoELayer.__dict__.get("__new__")
    if current is None or not getattr(current, MARKER, False):
        return
    if current.__wrapped__ is None:
        del MoELayer.__new__
    else:
        MoELayer.__new__ = current.__wrapped__
    log.info("comet-megatron: restored %s.MoELayer.__new__", moe_layer.__name__)


# --------------------------------------------------------------------------- layer construction
def init_moe_layer(
    layer,
    *,
    config,
    submodules,
    layer_number,
    pg_collection,
    is_mtp_layer,
    name,
    dispatcher_cls,
    experts_builder,
) -> None:
    """0.19's `MoELayer.__init__`, with comet's dispatcher and experts.

    Features that 0.19 only offers through paths comet does not implement (latent projections,
    inference-optimized dispatchers) are rejected earlier, by `validate_transformer_config`.
    """
    moe_layer = _moe_module()
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.typed_torch import not_none

    layer.submodules = not_none(submodules)
    if pg_collection is None:
        pg_collection = get_default_pg_collection()
    moe_layer.BaseMoELayer.__init__(
        layer,
        config=config,
        layer_number=layer_number,
        pg_collection=pg_collection,
        is_mtp_layer=is_mtp_layer,
    )
    layer.moe_layer_recompute = (
        config.recompute_granularity == "selective"
        and "moe" in config.recompute_modules
        and config.cuda_graph_impl != "local"
    )
    layer.shared_experts_recompute = (
        config.recompute_granularity == "selective"
        and "shared_experts" in config.recompute_modules
    )
    layer.tp_group = pg_collection.tp
    layer.router = layer.submodules.router(
        config=layer.config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer
    )
    layer.token_dispatcher = dispatcher_cls(
        layer.num_local_experts,
        layer.local_expert_indices,
        config=layer.config,
        pg_collection=pg_collection,
    )
    layer.experts = experts_builder(
        layer.num_local_experts,
        layer.config,
        pg_collection=pg_collection,
        name=(name + ".experts") if name is not None else None,
    )
    if layer.use_shared_expert:
        assert layer.submodules.shared_experts is not None, (
            "Shared experts builder is not provided in the module spec."
        )
        layer.shared_experts = layer.submodules.shared_experts(
            config=layer.config,
            pg_collection=pg_collection,
            gate=layer.config.moe_shared_expert_gate,
            name=(name + ".shared_experts") if name is not None else None,
        )
    layer.cudagraph_tensor_store = moe_layer.MoECudaGraphTensorStore()
    layer.fwd_execution_map = ["route", "expert_compute", "postprocess"]
    layer.setup_delayed_wgrad_for_dispatch_backward_overlap()


def local_expert_submodules(experts_builder):
    """The MLPSubmodules (linear classes) for comet's experts.

    Reuses the spec's SequentialMLP submodules when the spec has them; otherwise (Transformer
    Engine's grouped experts) uses Megatron's local parallel linears: comet runs the GEMMs itself,
    the linears only hold the parameters and define the checkpoint layout.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    if isinstance(experts_builder, functools.partial) and experts_builder.func is SequentialMLP:
        sub = experts_builder.keywords.get("submodules")
        if isinstance(sub, MLPSubmodules):
            return MLPSubmodules(linear_fc1=sub.linear_fc1, linear_fc2=sub.linear_fc2)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


# --------------------------------------------------------------------------- config checks
def unsupported_features(config) -> list[tuple[str, str]]:
    """(Megatron flag, why/fix) for every set option the comet layer does not implement."""
    out = []
    if getattr(config, "moe_latent_size", None):
        out.append(("--moe-latent-size", "latent MoE projections need Transformer Engine "
                    "paths comet does not implement; drop the flag or use --moe-token-dispatcher-type alltoall"))
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        out.append(("--fp8-format/--fp4-format", "comet kernels run bf16/fp16/fp32; "
                    "drop the FP8/FP4 flags or use --moe-token-dispatcher-type alltoall"))
    if getattr(config, "moe_shared_expert_overlap", False):
        out.append(("--moe-shared-expert-overlap", "comet computes shared experts without "
                    "dispatcher overlap; drop the flag"))
    if getattr(config, "transformer_impl", "") == "inference_optimized":
        out.append(("--transformer-impl inference_optimized", "inference-optimized MoE "
                    "dispatchers are Megatron's own; use transformer_engine or local"))
    if getattr(config, "moe_router_padding_for_quantization", False):
        out.append(("--moe-router-padding-for-quantization", "only needed for FP8/FP4 experts; drop it"))
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        out.append(("--overlap-moe-expert-parallel-comm", "Megatron's combined-1F1B EP overlap "
                    "splits its own alltoall dispatcher into stages; comet overlaps inside its "
                    "kernels: drop the flag"))
    # Options of other dispatchers: silently ignoring them would hide a misconfiguration.
    if getattr(config, "moe_permute_fusion", False):
        out.append(("--moe-permute-fusion", "an alltoall/flex dispatcher option (Transformer "
                    "Engine permutation kernels); comet permutes inside its own kernels: drop it"))
    if getattr(config, "moe_enable_deepep", False):
        out.append(("--moe-enable-deepep", "selects the flex dispatcher's DeepEP backend; "
                    "drop it to use comet, or use --moe-token-dispatcher-type flex"))
    return out


# --------------------------------------------------------------------------- argparse
def add_dispatcher_choice(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept `comet` for `--moe-token-dispatcher-type` in Megatron's parser (if it has the flag)."""
    for action in parser._actions:  # argparse keeps no public accessor for an option's action
        if "--moe-token-dispatcher-type" in action.option_strings:
            if action.choices is not None and "comet" not in action.choices:
                action.choices = [*action.choices, "comet"]
    return parser


def install_parse_args_hook(provider) -> bool:
    """Make `megatron.training.arguments.parse_args` always apply `provider` after the caller's.

    Megatron parses `sys.argv` in `initialize_megatron` and again in `pretrain`
    (`ft_integration.setup`, with no extra-args provider): with the hook, both accept
    `--moe-token-dispatcher-type comet` and the `--comet-*` flags without any change to the user's
    training script. `provider` must be idempotent. Returns False when already installed or when
    `megatron.training` is not importable.
    """
    try:
        from megatron.training import arguments
    except ImportError:
        return False
    current = arguments.parse_args
    if getattr(current, MARKER, False):
        return False

    @functools.wraps(current)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        def both(parser):
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            return provider(parser)

        return current(both, ignore_unknown_args)

    setattr(parse_args, MARKER, True)
    arguments.parse_args = parse_args
    log.info("comet-megatron: patched megatron.training.arguments.parse_args (comet flags)")
    return True


def uninstall_parse_args_hook() -> None:
    try:
        from megatron.training import arguments
    except ImportError:
        return
    current = arguments.parse_args
    if getattr(current, MARKER, False):
        arguments.parse_args = current.__wrapped__
        log.info("comet-megatron: restored megatron.training.arguments.parse_args")


def parsed_megatron_args():
    """Megatron's global args once `megatron.training` has parsed them, else None."""
    try:
        from megatron.training import global_vars
    except ImportError:
        return None
    return getattr(global_vars, "_GLOBAL_ARGS", None)


def check_installed_version() -> str:
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if not version.startswith(VERSION_PREFIX):
        raise ImportError(
            f"comet-megatron supports megatron-core 0.19.x; found {version}. "
            "Install a supported version: pip install 'megatron-core>=0.19.2,<0.20'."
        )
    _moe_module()
    return version
