"""Finding the Megatron (or torch) symbol a patch replaces: one place, one kind of error.

`resolve("megatron.training.training", "train_step")` returns (owner, current value); a module or
attribute that is not there raises `SymbolMoved` naming the path, the installed megatron-core and
torch versions, and the patch module to update.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch


class SymbolMoved(RuntimeError):
    """A symbol a comet-megatron patch replaces is missing in the installed megatron-core/torch."""


def megatron_core_version() -> str:
    try:
        import megatron.core

        return getattr(megatron.core, "__version__", "unknown")
    except ImportError:
        return "not installed"


def resolve(module_path: str, attr: str, *, patch: str) -> tuple[Any, Any]:
    """(owner, value) of `module_path.attr` (`attr` may be dotted: `Class.method`)."""
    versions = f"megatron-core {megatron_core_version()}, torch {torch.__version__}"
    try:
        owner = importlib.import_module(module_path)
    except ImportError as exc:
        raise SymbolMoved(
            f"comet-megatron ({patch}): cannot import {module_path} ({versions}): {exc}. "
            "These patches target megatron-core 0.19."
        ) from exc
    parts = attr.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            break
    if owner is None or not hasattr(owner, parts[-1]):
        raise SymbolMoved(
            f"comet-megatron ({patch}): {module_path}.{attr} not found ({versions}). These "
            f"patches target megatron-core 0.19; the symbol moved: update {patch}."
        )
    return owner, getattr(owner, parts[-1])
