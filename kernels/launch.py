"""Launch a `@triton.jit` kernel with less host time per call: `launch(kernel, grid, *args, **kwargs)`.

Triton's `kernel[grid](...)` binds and specialises every argument in Python on every call and builds a
cache key from them (measured on an H100 host: 47-166 us per launch of this package's kernels, the GEMM
kernels dearest with ~40 runtime arguments and ~25 constexprs; docs/BENCHMARKS.md). The fused MoE layer
launches its kernels right after its one host sync, with the GPU idle, so that time is exposed.

`launch` keeps, per kernel, the compiled kernel Triton chose for a *launch signature* computed here from
what Triton specialises on, and relaunches it through the compiled kernel's own launcher:

    tensor            dtype, 16-byte alignment of data_ptr(), on CUDA or not
    int               == 1, divisible by 16, 32-/64-bit range
    TensorDescriptor  dtype, block shape, 16-byte alignment, rank, strides divisible by 16 (Gluon's: and
                      its shared-memory layout)
    other             its type and value (floats, bools, None, strings)
    keyword args      (constexprs, num_warps, num_stages, ...) their values

Two calls with the same signature get the same compiled kernel from Triton (the signature is at least as
fine as Triton's key), so reusing it is exact. CUDA tensors reach the compiled kernel's launcher as their
`data_ptr()` integers: the launcher validates a tensor argument with a `cuPointerGetAttribute` driver call,
an integer it takes as is (a CPU tensor is passed as the tensor, for the launcher to refuse). A new
signature goes through `kernel[grid](...)` once (compile or Triton's own cache) and is remembered. Launch
hooks (profilers) are called as Triton calls them. Anything unusual (Triton's interpreter, an unknown argument
type, a Triton whose compiled-kernel API differs) takes Triton's own path.
`COMET_FAST_LAUNCH=0` turns the shortcut off.
"""

from __future__ import annotations

import os

import torch
import triton

try:  # Triton >= 3.3 (tested: 3.6, 3.8)
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: always Triton's own path
    _knobs = _driver = TensorDescriptor = None
try:  # Gluon's host descriptor (kernels/gluon_gemm.py): like Triton's plus its shared-memory layout
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:  # pragma: no cover - a Triton without Gluon
    GluonTensorDescriptor = None

_INT32 = 2**31
MAX_SIGNATURES = 4096
_cache: dict = {}  # (kernel, launch signature) -> compiled kernel
_off: set = set()  # kernels whose compiled-kernel launch failed once: Triton's path from then on
stats = {"fast": 0, "slow": 0}  # launches through each path (tests)


def enabled() -> bool:
    return (_knobs is not None and os.environ.get("COMET_FAST_LAUNCH", "1") != "0"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def _arg_signature(a):
    """Signature of a non-tensor argument (tensors: `bind`, which reads data_ptr() once for both uses)."""
    if type(a) is int:
        return a == 1, a % 16 == 0, -_INT32 <= a < _INT32, a >= 2**63
    if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
        # not the shape / stride values (runtime arguments: a receive-rows descriptor changes shape every
        # call), their rank and 16-byte divisibility
        return (a.base.dtype, tuple(a.block_shape), a.base.data_ptr() % 16 == 0, len(a.shape),
                tuple(st % 16 == 0 for st in a.strides), a.padding, getattr(a, "round_f32_to_tf32", False))
    if GluonTensorDescriptor is not None and isinstance(a, GluonTensorDescriptor):
        return (GluonTensorDescriptor, a.base.dtype, tuple(a.block_shape), a.layout, a.base.data_ptr() % 16 == 0,
                len(a.shape), tuple(st % 16 == 0 for st in a.strides), a.padding)
    if a is None or isinstance(a, (bool, float, str)):
        return type(a), a
    raise TypeError(type(a))  # unknown: Triton decides


def signature(args: tuple, kwargs: dict) -> tuple:
    """The launch signature of one call (see the module docstring); raises TypeError on an unknown or
    unhashable argument."""
    return bind(args, kwargs)[0]


def bind(args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
    """(launch signature, the runtime arguments as the compiled kernel's launcher gets them): CUDA tensors
    as their `data_ptr()` (one read serves both), everything else as given."""
    sig, values = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            ptr = a.data_ptr()
            cuda = a.is_cuda
            sig.append((a.dtype, ptr % 16 == 0, cuda))
            values.append(ptr if cuda else a)  # a CPU tensor: the launcher's own check refuses it
        else:
            sig.append(_arg_signature(a))
            values.append(a)
    sig = tuple(sig), tuple(kwargs.items())
    hash(sig)
    return sig, tuple(values)


def _layout(kernel):
    """(number of runtime parameters, constexpr names in declaration order), or None when the kernel's
    parameters are not all runtime ones first, then constexprs (the order `launch` passes them in)."""
    lay = _layouts.get(kernel, False)
    if lay is False:
        kinds = [p.is_constexpr for p in kernel.params]
        n_runtime = kinds.index(True) if True in kinds else len(kinds)
        ok = not any(kinds[:n_runtime]) and all(kinds[n_runtime:])
        lay = (n_runtime, tuple(p.name for p in kernel.params[n_runtime:])) if ok else None
        _layouts[kernel] = lay
    return lay


_layouts: dict = {}


def _no_hooks(hook) -> bool:
    """No launch hook: None (Triton < 3.5) or an empty HookChain (its `calls`)."""
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


def launch(kernel, grid: tuple, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, with the per-call argument binding skipped for a launch signature
    seen before. Positional arguments: the kernel's runtime parameters, in order; keyword arguments: its
    constexprs and launch options (num_warps, num_stages, ...)."""
    if not enabled() or kernel in _off:
        stats["slow"] += 1
        return kernel[grid](*args, **kwargs)
    lay = _layout(kernel)
    try:
        if lay is None or len(args) != lay[0]:
            raise TypeError("parameters")
        key, values = bind(args, kwargs)
        sig = (kernel, torch.cuda.current_device(), key)
        compiled = _cache.get(sig)
    except (TypeError, AttributeError):  # an argument this signature does not know: Triton decides
        stats["slow"] += 1
        return kernel[grid](*args, **kwargs)
    if compiled is None:
        stats["slow"] += 1
        compiled = kernel[grid](*args, **kwargs)
        if len(_cache) >= MAX_SIGNATURES:  # a safety valve: signatures are few (specialisation flags only)
            _cache.clear()
        _cache[sig] = compiled
        return compiled
    g = tuple(grid) + (1, 1)
    try:
        # what JITFunction.run passes to the compiled kernel's launcher, launch hooks included (none set,
        # the usual case: no launch metadata to build, as Triton does when its hooks are None)
        all_args = (*values, *[kwargs[name] for name in lay[1]])
        stream = _driver.active.get_current_stream(sig[1])
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        if _no_hooks(enter) and _no_hooks(leave):
            compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *all_args)
        else:
            # hooks (profilers) get the tensors, as from Triton's own launch
            all_args = (*args, *all_args[len(args):])
            compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata,
                         compiled.launch_metadata(grid, stream, *all_args), enter, leave, *all_args)
    except (TypeError, AttributeError, ValueError, KeyError):  # not how this Triton launches: stop trying
        _off.add(kernel)
        stats["slow"] += 1
        return kernel[grid](*args, **kwargs)
    stats["fast"] += 1
    return compiled
