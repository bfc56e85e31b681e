"""Registration of the comet dispatcher with Megatron-core: `enable`, `disable`, argument parsing.

Everything version-specific is delegated to `comet_megatron.patches` (one module per megatron-core
minor version); this module only decides what to install and keeps the active default config.
"""

from __future__ import annotations

import argparse
import logging

from comet_megatron import patches
from comet_megatron.config import CometConfig, add_arguments

log = logging.getLogger("comet_megatron")

_default: CometConfig | None = None


def default_config() -> CometConfig:
    """The config layers use when their TransformerConfig carries none (`enable`'s argument)."""
    return _default if _default is not None else CometConfig()


def enable(config: CometConfig | None = None) -> CometConfig:
    """Idempotently make Megatron build `CometMoELayer` for `moe_token_dispatcher_type="comet"`."""
    global _default
    from comet_megatron.layer import CometMoELayer

    if config is not None and not isinstance(config, CometConfig):
        raise TypeError("comet_megatron.enable(config): config must be a CometConfig")
    patches.current().install_moe_layer_redirect(CometMoELayer)
    if config is not None or _default is None:
        _default = config if config is not None else CometConfig()
    return _default


def disable() -> None:
    """Undo `enable`: Megatron's MoELayer is restored; layers already built stay as they are."""
    global _default
    patches.current().uninstall_moe_layer_redirect()
    _default = None


def is_enabled() -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    new = MoELayer.__dict__.get("__new__")
    return bool(new is not None and getattr(new, patches.current().MARKER, False))


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: `--moe-token-dispatcher-type comet` and the `--comet-*` flags."""
    patches.current().add_dispatcher_choice(parser)
    return add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> CometConfig:
    """The CometConfig of parsed Megatron args (raises CometConfigError naming the bad flag)."""
    return CometConfig.from_args(args)


def attach(transformer_config, comet_config: CometConfig | None = None):
    """Give a TransformerConfig its own CometConfig (else the layer uses `enable`'s default)."""
    transformer_config.comet = comet_config if comet_config is not None else default_config()
    return transformer_config
