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
_explicit = False  # enable() was given a config: it wins over parsed flags


def default_config() -> CometConfig:
    """The config layers use when their TransformerConfig carries none.

    `enable(config)`'s argument if one was given; else the `--comet-*` flags Megatron parsed
    (`megatron.training` keeps them in its global args); else the defaults.
    """
    if _default is not None and _explicit:
        return _default
    args = patches.current().parsed_megatron_args()
    if args is not None and hasattr(args, "comet_overlap"):
        return CometConfig.from_args(args)
    return _default if _default is not None else CometConfig()


def enable(config: CometConfig | None = None) -> CometConfig:
    """Idempotently make Megatron build `CometMoELayer` for `moe_token_dispatcher_type="comet"`."""
    global _default, _explicit
    from comet_megatron.layer import CometMoELayer

    if config is not None and not isinstance(config, CometConfig):
        raise TypeError("comet_megatron.enable(config): config must be a CometConfig")
    version_patch = patches.current()
    version_patch.install_moe_layer_redirect(CometMoELayer)
    version_patch.install_parse_args_hook(extra_args_provider)
    if config is not None:
        _default, _explicit = config, True
    elif _default is None:
        _default = CometConfig()
    return _default


def disable() -> None:
    """Undo `enable`: Megatron's MoELayer is restored; layers already built stay as they are."""
    global _default, _explicit
    patches.current().uninstall_moe_layer_redirect()
    patches.current().uninstall_parse_args_hook()
    _default, _explicit = None, False


def is_enabled() -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    new = MoELayer.__dict__.get("__new__")
    return bool(new is not None and getattr(new, patches.current().MARKER, False))


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: `--moe-token-dispatcher-type comet` and the `--comet-*` flags.

    Idempotent: a parser that already has the flags is returned unchanged, so it composes with
    the parse hook `enable()` installs.
    """
    patches.current().add_dispatcher_choice(parser)
    if "--comet-overlap" in parser._option_string_actions:  # argparse has no public lookup
        return parser
    return add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> CometConfig:
    """The CometConfig of parsed Megatron args (raises CometConfigError naming the bad flag)."""
    return CometConfig.from_args(args)


def attach(transformer_config, comet_config: CometConfig | None = None):
    """Give a TransformerConfig its own CometConfig (else the layer uses `enable`'s default)."""
    transformer_config.comet = comet_config if comet_config is not None else default_config()
    return transformer_config
