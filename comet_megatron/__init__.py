"""comet-megatron: fine-grained overlapped MoE dispatch/combine + expert GEMMs for Megatron-core.

Public API:
    enable(config=None)         register the `comet` token dispatcher with Megatron (idempotent)
    disable()                   undo every replacement `enable` made
    CometConfig                 every knob (also the `--comet-*` flags and the YAML `comet:` section)
    add_arguments(parser)       add `--comet-*` flags (+ `comet` dispatcher choice) to an argparse parser
    get_moe_module_spec(...)    Megatron ModuleSpec of the comet MoE layer
"""

from comet_megatron.config import CometConfig, CometConfigError, add_arguments  # noqa: F401

__version__ = "0.1.0"


def enable(config: CometConfig | None = None) -> CometConfig:
    """Make Megatron build comet MoE layers wherever `moe_token_dispatcher_type == "comet"`.

    Idempotent; returns the active default `CometConfig` (used by layers whose TransformerConfig
    carries no `comet` attribute of its own).
    """
    from comet_megatron import integration

    return integration.enable(config)


def disable() -> None:
    """Restore every Megatron symbol that `enable` replaced."""
    from comet_megatron import integration

    integration.disable()


def get_moe_module_spec(*args, **kwargs):
    """ModuleSpec of `CometMoELayer` (see `comet_megatron.specs.get_moe_module_spec`)."""
    from comet_megatron import specs

    return specs.get_moe_module_spec(*args, **kwargs)
