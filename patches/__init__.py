"""Megatron-core version-specific code: one module per supported minor version.

`current()` returns the module matching the installed megatron-core, or raises an ImportError that
names the installed version and the supported ones.
"""

from __future__ import annotations

import importlib

SUPPORTED = {"0.19": "megatron_core_0_19"}


def current():
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    minor = ".".join(version.split(".")[:2])
    if minor not in SUPPORTED:
        raise ImportError(
            f"comet-megatron has no patch for megatron-core {version}; supported: "
            f"{', '.join(v + '.x' for v in SUPPORTED)}. "
            "Install one: pip install 'megatron-core>=0.19.2,<0.20'."
        )
    module = importlib.import_module(f"{__name__}.{SUPPORTED[minor]}")
    module.check_installed_version()
    return module
