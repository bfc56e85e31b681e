"""Hooks into `megatron.training` (megatron-core 0.19) used by `comet_megatron.pretrain` on any host.

- `use_prebuilt_dataset_helpers()`: `initialize_megatron` runs `make` in
  `megatron/core/datasets/` to build the C++ dataset helpers, but the megatron-core wheel ships
  them prebuilt (`helpers_cpp`) and no Makefile, so `make` fails and Megatron calls `sys.exit(1)`.
  When `helpers_cpp` imports, compiling is skipped.
- `observe_train_steps(callback)`: `train()` calls `train_step` through the module global of
  `megatron.training.training`; wrapping that global times every step and reads its reduced loss
  without touching the loop.

Each replacement is marked (`_comet_training_hook = True`, `__wrapped__ = original`), logs one
line, and is undone by the function returned (or `remove()`). A moved symbol raises an error that
names it and the installed megatron-core version.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
from typing import Any, Callable

import torch

from comet_megatron.patches.symbols import resolve

logger = logging.getLogger("comet_megatron.patches.megatron_training")

MARKER = "_comet_training_hook"
_replaced: list[tuple[Any, str, Any]] = []


def _resolve(module_path: str, attr: str) -> tuple[Any, Any]:
    return resolve(module_path, attr, patch="patches/megatron_training.py")


def _install(module_path: str, attr: str, replacement: Callable, why: str) -> Callable[[], None]:
    owner, original = _resolve(module_path, attr)
    setattr(replacement, MARKER, True)
    replacement.__wrapped__ = original
    setattr(owner, attr, replacement)
    entry = (owner, attr, original)
    _replaced.append(entry)
    logger.info("training hook: replaced %s.%s (%s)", module_path, attr, why)

    def restore() -> None:
        if entry in _replaced:
            _replaced.remove(entry)
            setattr(owner, attr, original)
            logger.info("training hook: restored %s.%s", module_path, attr)

    return restore


def use_prebuilt_dataset_helpers() -> Callable[[], None]:
    """Skip `compile_helpers()` when the wheel's prebuilt `helpers_cpp` imports."""
    owner, original = _resolve("megatron.core.datasets.utils", "compile_helpers")
    if getattr(original, MARKER, False):
        return lambda: None
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return lambda: None  # a source checkout: let Megatron build them

    def compile_helpers() -> None:
        """The C++ dataset helpers are prebuilt in this megatron-core install."""

    return _install("megatron.core.datasets.utils", "compile_helpers", compile_helpers,
                    "helpers_cpp is prebuilt in the wheel")


def observe_train_steps(callback: Callable[[int, dict, float], None]) -> Callable[[], None]:
    """Call `callback(iteration, loss_dict, step_time_s)` after every training step.

    The loss dict is what `train_step` returns: reduced over data parallel, on the last pipeline
    stage (empty elsewhere). GPU work is synchronized before the clock is read.
    """
    _, original = _resolve("megatron.training.training", "train_step")
    state = {"iteration": 0}

    @functools.wraps(original)
    def train_step(*args: Any, **kwargs: Any):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        state["iteration"] += 1
        loss_dict = result[0] if isinstance(result, tuple) and isinstance(result[0], dict) else {}
        callback(state["iteration"], loss_dict, step_time)
        return result

    return _install("megatron.training.training", "train_step", train_step,
                    "per-step timing and loss for the progress display")


def remove() -> None:
    """Undo every hook installed here, newest first."""
    while _replaced:
        owner, attr, original = _replaced.pop()
        setattr(owner, attr, original)
        logger.info("training hook: restored %s.%s", getattr(owner, "__name__", owner), attr)
