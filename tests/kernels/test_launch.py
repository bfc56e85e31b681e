"""kernels/launch.py on the CPU: the launch signature separates what Triton specialises on, and anything the
shortcut cannot vouch for takes Triton's own path. (The cached relaunch itself needs a GPU:
tests/kernels/gpu/test_gpu_kernels.py::test_fast_launch_same_results.)"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from comet_megatron.kernels import launch as fast
from comet_megatron.kernels.launch import signature


def test_signature_separates_what_triton_specialises_on():
    base = torch.empty(64, dtype=torch.bfloat16)
    assert signature((base,), {}) == signature((torch.empty(8, dtype=torch.bfloat16),), {})
    assert signature((base,), {}) != signature((base[1:],), {})  # 2 bytes off: no 16-byte alignment
    assert signature((base,), {}) != signature((base.float(),), {})  # dtype
    ints = [signature((v,), {}) for v in (1, 16, 17, 2**31, 2**63)]
    assert len(set(ints)) == len(ints)  # == 1, % 16, 64-bit range, unsigned range
    assert signature((3,), {}) == signature((5,), {})
    assert signature((3,), {"BM": 64}) != signature((3,), {"BM": 128})  # constexprs and launch options
    assert signature((True,), {}) != signature((1,), {})


def test_signature_of_tensor_descriptors():
    from triton.tools.tensor_descriptor import TensorDescriptor

    w = torch.empty(4, 64, 128, dtype=torch.bfloat16)
    d = TensorDescriptor.from_tensor(w.view(-1, 128), [64, 64])
    same = TensorDescriptor.from_tensor(torch.empty(4, 64, 128, dtype=torch.bfloat16).view(-1, 128), [64, 64])
    assert signature((d,), {}) == signature((same,), {})
    assert signature((d,), {}) != signature((TensorDescriptor.from_tensor(w.view(-1, 128), [32, 64]),), {})
    # a descriptor's shape is a runtime argument (receive rows change every call): one signature for all
    assert signature((d,), {}) == signature((TensorDescriptor.from_tensor(w[:2].reshape(-1, 128), [64, 64]),), {})
    odd = torch.empty(4, 64, 136, dtype=torch.bfloat16)[..., :128]  # row stride 136 elements: not 16-divisible
    assert signature((d,), {}) != signature((TensorDescriptor(odd, [256, 128], [136, 1], [64, 64]),), {})


def test_bind_hands_cpu_tensors_over_as_tensors():
    """Only CUDA tensors become bare pointers (the launcher's own check must see a CPU tensor to refuse it)."""
    x = torch.empty(8)
    sig, values = fast.bind((x, 3, None), {"B": 4})
    assert values[0] is x and values[1:] == (3, None)
    assert sig == signature((x, 3, None), {"B": 4})
    assert sig[0][0] == (torch.float32, x.data_ptr() % 16 == 0, False)


def test_signature_refuses_unknown_arguments():
    with pytest.raises(TypeError):
        signature(([1, 2],), {})
    with pytest.raises(TypeError):  # unhashable constexpr value
        signature((), {"X": [1]})


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def test_interpreter_takes_tritons_path(monkeypatch):
    """Under Triton's interpreter (the CPU tests) every launch goes through `kernel[grid](...)` and runs
    exactly once."""
    if not isinstance(_add_one_kernel, triton.runtime.interpreter.InterpretedFunction):
        pytest.skip("needs TRITON_INTERPRET=1 at import (set by tests/kernels/conftest.py)")
    x = torch.zeros(37)
    slow = fast.stats["slow"]
    for _ in range(3):
        fast.launch(_add_one_kernel, (triton.cdiv(37, 16),), x, 37, BLOCK=16)
    assert torch.equal(x, torch.full((37,), 3.0))
    assert fast.stats["slow"] - slow == 3


def test_no_hooks_recognises_empty_hook_chains():
    from comet_megatron.kernels.launch import _no_hooks

    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert _no_hooks(None) and _no_hooks(Chain([]))
    assert not _no_hooks(Chain([print])) and not _no_hooks(print)
