"""CPU shims that let `megatron.training`'s pretrain loop run on a machine without a GPU.

megatron.training (0.19) assumes CUDA throughout: `device='cuda'` tensors in the training loop,
timers and data-loader broadcasts, `model.cuda(torch.cuda.current_device())`, DDP's
`torch.cuda.Stream()`, `torch.cuda.synchronize()` in timers, memory statistics in logging.
Instead of patching each call site, two small mechanisms cover them all:

1. `torch.cuda` stand-ins: `apply()` first applies the MoE layer's shims (`patches/cpu.py`:
   `current_device`, `Stream`, `Event`, `stream`, `synchronize`, the CUDA RNG state and
   `CudaRNGStatesTracker.fork`), then replaces the other `torch.cuda.*` functions
   megatron.training calls unconditionally (`set_device`, `empty_cache`, memory statistics).
2. `CudaToCpuMode`: a `TorchFunctionMode` that rewrites a CUDA device argument (`device='cuda'`,
   `device=0`, `.cuda()`, `.to('cuda')`) to the CPU for tensor factories and moves, and makes
   `t.type()` name the CUDA tensor type (`torch.cuda.FloatTensor`) for the string checks in
   Megatron's optimizer. It is active only while `apply()` is in effect, in that process.

Plus two Megatron symbols:
- `pretrain` calls `initialize_megatron` without `allow_no_cuda`: the CPU version passes it;
- `_initialize_distributed` builds the model-parallel groups only when
  `torch.cuda.device_count() > 0`: the CPU version reports one device while it runs.

Everything here is applied only when `torch.cuda.is_available()` is False, is idempotent (each
replacement carries `_comet_cpu_shim = True` and `__wrapped__ = original`), logs one line per
replaced symbol (INFO level: `COMET_LOG_LEVEL=INFO` shows them in the main job), and is undone
by `remove()`. If a megatron-core symbol moved, the error names
the symbol path and the installed megatron-core version.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from comet_megatron.patches.symbols import resolve

logger = logging.getLogger("comet_megatron.patches.cpu_training")

MARKER = "_comet_cpu_shim"

# (owner object, attribute name, original value) for every replacement in effect.
_replaced: list[tuple[Any, str, Any]] = []
_mode: "CudaToCpuMode | None" = None
_applied_cpu_moe = False  # whether apply() installed patches/cpu.py's shims (remove() undoes them)


def _resolve(module_path: str, attr: str) -> tuple[Any, Any]:
    """(owner, current value) of `module_path.attr`; a clear error if it moved."""
    return resolve(module_path, attr, patch="patches/cpu_training.py")


def _replace(module_path: str, attr: str, replacement: Callable | type, why: str) -> None:
    owner, original = _resolve(module_path, attr)
    if getattr(original, MARKER, False):
        return
    if getattr(original, "__comet_shim__", False):
        # replaced by the MoE-layer shims of `patches/cpu.py`: keep theirs
        logger.info("cpu shim: kept %s.%s (patches/cpu.py replaced it)", module_path, attr)
        return
    setattr(replacement, MARKER, True)
    setattr(replacement, "__wrapped__", original)
    setattr(owner, attr.split(".")[-1], replacement)
    _replaced.append((owner, attr.split(".")[-1], original))
    logger.info("cpu shim: replaced %s.%s (%s)", module_path, attr, why)


# ---------------------------------------------------------------- torch.cuda stand-ins
def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _memory_stats(*args: Any, **kwargs: Any) -> dict:
    return {}


def _mem_get_info(*args: Any, **kwargs: Any) -> tuple[int, int]:
    return (0, 0)


# name -> (replacement, why)
_TORCH_CUDA_STANDINS: dict[str, tuple[Callable | type, str]] = {
    "set_device": (_noop, "no device to select"),
    "empty_cache": (_noop, "no CUDA caching allocator"),
    "set_stream": (_noop, "no streams on CPU"),
    "memory_allocated": (_zero, "no GPU memory"),
    "max_memory_allocated": (_zero, "no GPU memory"),
    "memory_reserved": (_zero, "no GPU memory"),
    "max_memory_reserved": (_zero, "no GPU memory"),
    "reset_peak_memory_stats": (_noop, "no GPU memory"),
    "memory_stats": (_memory_stats, "no GPU memory"),
    "mem_get_info": (_mem_get_info, "no GPU memory"),
    "set_rng_state": (_noop, "no CUDA generator"),
}


# ---------------------------------------------------------------- device rewriting mode
def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU (factories, `.to`, `.cuda`, `pin_memory`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory or func is torch.Tensor.is_pinned:
            return args[0] if func is torch.Tensor.pin_memory else False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron checks `t.type() == 'torch.cuda.FloatTensor'` (grad clipping, the
            # mixed-precision optimizer): inside this mode the CPU plays the CUDA device's role.
            name = func(*args)
            return "torch.cuda." + name[len("torch."):] if name.startswith("torch.") and \
                not name.startswith("torch.cuda.") else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


# ---------------------------------------------------------------- megatron-core symbols
def _make_initialize_megatron(original: Callable) -> Callable:
    def initialize_megatron(*args: Any, **kwargs: Any):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _make_initialize_distributed(original: Callable) -> Callable:
    def _initialize_distributed(*args: Any, **kwargs: Any):
        # Megatron builds its model-parallel groups only `if device_count > 0`; on CPU one
        # "device" per process lets it build them (over gloo). set_device is a no-op here.
        device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = device_count

    return _initialize_distributed


# ---------------------------------------------------------------- public API
def is_applied() -> bool:
    return _mode is not None


def apply(force: bool = False) -> bool:
    """Install the CPU shims when no GPU is present (or `force`). Returns whether they are active.

    Idempotent. Call before `megatron.training.pretrain` in every process.
    """
    global _mode, _applied_cpu_moe
    if torch.cuda.is_available() and not force:
        return False
    if _mode is not None:
        return True
    from comet_megatron.patches import cpu as cpu_moe

    _applied_cpu_moe = not cpu_moe.REPLACED
    cpu_moe.apply()
    for name, (replacement, why) in _TORCH_CUDA_STANDINS.items():
        # a fresh function object per symbol so MARKER/__wrapped__ do not collide
        if isinstance(replacement, type):
            replacement = type(replacement.__name__, (replacement,), {})
        else:
            replacement = _copy_function(replacement)
        _replace("torch.cuda", name, replacement, why)
    _, init_original = _resolve("megatron.training.training", "initialize_megatron")
    _replace(
        "megatron.training.training",
        "initialize_megatron",
        _make_initialize_megatron(init_original),
        "allow_no_cuda=True: skip the 'Megatron requires CUDA' assertion",
    )
    _, dist_original = _resolve("megatron.training.initialize", "_initialize_distributed")
    _replace(
        "megatron.training.initialize",
        "_initialize_distributed",
        _make_initialize_distributed(dist_original),
        "build the model-parallel groups although torch.cuda.device_count() == 0",
    )
    _mode = CudaToCpuMode()
    _mode.__enter__()
    logger.info("cpu shim: CudaToCpuMode active (device='cuda' -> cpu for factories and moves)")
    return True


def remove() -> None:
    """Undo every replacement `apply` made, in reverse order, and leave the device mode."""
    global _mode, _applied_cpu_moe
    if _mode is not None:
        _mode.__exit__(None, None, None)
        _mode = None
    while _replaced:
        owner, name, original = _replaced.pop()
        setattr(owner, name, original)
        logger.info("cpu shim: restored %s.%s", getattr(owner, "__name__", owner), name)
    if _applied_cpu_moe:
        from comet_megatron.patches import cpu as cpu_moe

        cpu_moe.restore()
        _applied_cpu_moe = False


def _copy_function(fn: Callable) -> Callable:
    import functools
    import types

    new = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    functools.update_wrapper(new, fn)
    del new.__wrapped__
    return new
