"""CPU shims: let Megatron-core's MoE layer (router, dispatchers, experts) run without a GPU.

Megatron-core 0.19 calls `torch.cuda.current_device()` for allocations (router gating, aux-loss
tracking, mappings) and creates `torch.cuda.Stream()`s in the alltoall dispatcher. On a machine
with no CUDA device those calls fail, although every tensor could live on the CPU. `apply()`
replaces exactly those `torch.cuda` entry points with CPU equivalents, and only when
`torch.cuda.is_available()` is false: on a GPU machine it does nothing.

Every replacement is recorded (`REPLACED`), logged, marked with `__comet_shim__` and undone by
`restore()`. Tests and the CPU main job call `apply()`; library code never does.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("comet_megatron.patches.cpu")

# (owner object, attribute name) -> original value
REPLACED: dict[tuple[object, str], object] = {}


class _CpuStream:
    """Stands in for `torch.cuda.Stream`: work on the CPU is synchronous, so every op is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_CPU_STREAM = _CpuStream()


def _no_rng_state(*args, **kwargs):
    return torch.empty(0, dtype=torch.uint8)


def _current_device():
    return torch.device("cpu")


def _replace(owner: object, name: str, value: object) -> None:
    key = (owner, name)
    if key in REPLACED:
        return
    REPLACED[key] = getattr(owner, name)
    try:
        value.__comet_shim__ = True  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        pass
    setattr(owner, name, value)
    log.debug("comet cpu shim: replaced %s.%s", getattr(owner, "__name__", owner), name)


def apply() -> bool:
    """Install the CPU shims if no CUDA device is present. Returns True when installed."""
    if torch.cuda.is_available():
        return False
    _replace(torch.cuda, "current_device", _current_device)
    _replace(torch.cuda, "Stream", _CpuStream)
    _replace(torch.cuda, "Event", _CpuEvent)
    _replace(torch.cuda, "current_stream", lambda *a, **k: _CPU_STREAM)
    _replace(torch.cuda, "default_stream", lambda *a, **k: _CPU_STREAM)
    _replace(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _replace(torch.cuda, "synchronize", lambda *a, **k: None)
    # Megatron's checkpoint() (activation recomputation) saves and restores the CUDA RNG state;
    # with no CUDA generator there is none (restoring goes through torch's lazy, never-run queue).
    _replace(torch.cuda, "get_rng_state", _no_rng_state)
    _replace(torch.cuda.random, "get_rng_state", _no_rng_state)
    _patch_megatron_dtoh()
    _patch_megatron_rng_fork()
    return True


def _patch_megatron_rng_fork() -> None:
    """`CudaRNGStatesTracker.fork()` swaps CUDA generator states (dropout inside TP regions);
    with no CUDA generator there is nothing to swap: make it a no-op context."""
    from megatron.core.tensor_parallel import random as mrandom

    @contextlib.contextmanager
    def fork(self, name=None):
        yield

    _replace(mrandom.CudaRNGStatesTracker, "fork", fork)


def _patch_megatron_dtoh() -> None:
    """The alltoall dispatcher turns split sizes into numpy only for CUDA tensors
    (`moe_utils.maybe_move_tensor_to_cpu`); on the CPU the splits stay tensors, which
    `all_to_all_single` rejects. Convert CPU tensors as well."""
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    _replace(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


def restore() -> None:
    """Undo every shim `apply()` installed."""
    for (owner, name), original in list(REPLACED.items()):
        setattr(owner, name, original)
        del REPLACED[(owner, name)]
