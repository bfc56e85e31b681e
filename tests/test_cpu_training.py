"""patches/cpu_training.py: CPU stand-ins for megatron.training's CUDA calls, marked and reversible."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.patches import cpu_training

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without a GPU")


@pytest.fixture
def shims():
    assert not cpu_training.is_applied()
    before = {name: getattr(torch.cuda, name) for name in cpu_training._TORCH_CUDA_STANDINS}
    import megatron.training.initialize as minit
    import megatron.training.training as mtraining

    megatron_before = (mtraining.initialize_megatron, minit._initialize_distributed)
    assert cpu_training.apply() is True
    try:
        yield before, megatron_before
    finally:
        cpu_training.remove()


def test_cuda_devices_become_cpu(shims):
    assert torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda().device.type == "cpu" and t.to("cuda").device.type == "cpu"
    assert torch.nn.Linear(2, 2).cuda(0).weight.device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"  # Megatron's optimizer checks this string
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == 0


def test_replacements_are_marked_and_logged(shims, caplog):
    before, _ = shims
    import megatron.training.training as mtraining

    replaced = mtraining.initialize_megatron
    assert getattr(replaced, cpu_training.MARKER) and replaced.__wrapped__ is not None
    for name, original in before.items():
        current = getattr(torch.cuda, name)
        # either ours (marked, pointing at the original) or kept from patches/cpu.py
        assert getattr(current, cpu_training.MARKER, False) or getattr(current, "__comet_shim__", False) \
            or current is original, name
    assert cpu_training.apply() is True  # idempotent


def test_remove_restores_everything():
    import megatron.training.training as mtraining

    from comet_megatron.patches import cpu as cpu_moe

    names = [*cpu_training._TORCH_CUDA_STANDINS, "current_device", "Stream", "synchronize"]
    before = {name: getattr(torch.cuda, name) for name in names}
    moe_shims_were_on = bool(cpu_moe.REPLACED)
    init_before = mtraining.initialize_megatron
    cpu_training.apply()
    assert torch.cuda.Stream is not before["Stream"] or moe_shims_were_on
    cpu_training.remove()
    assert not cpu_training.is_applied()
    assert {name: getattr(torch.cuda, name) for name in before} == before
    assert mtraining.initialize_megatron is init_before
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_moved_symbol_names_megatron_version():
    from comet_megatron.patches.symbols import SymbolMoved

    with pytest.raises(SymbolMoved, match="megatron-core 0.19"):
        cpu_training._resolve("megatron.training.training", "no_such_symbol")
