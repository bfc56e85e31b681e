"""`bench layer`'s floor: GEMM FLOPs at the dense rate, and under DDP for forward+backward at least the fp32
main_grad traffic (checked against the arithmetic written out by hand for a small shape); the
--distributed-optimizer flag refused without --ddp."""

from __future__ import annotations

import pytest

from comet_megatron.bench import Record, Shape, add_ratios, floor_ms


def test_floor_is_the_larger_of_gemms_and_main_grad_traffic():
    s = Shape("s", hidden=4, ffn=3, experts=2, topk=2, gated=True)
    # fc1 [6, 4] + fc2 [4, 3] per expert: 36 weights; 2 experts; fp32 read + write = 8 bytes each
    assert s.main_grad_bytes() == 8 * 2 * 36
    # forward: 2 FLOPs x 10 tokens x top-2 x 36 weights = 1440; forward+backward 3x
    assert s.flops(10, False) == 1440 and s.flops(10, True) == 4320
    tflops, gbs = 1e-9, 1e-9  # 1 kFLOP/s and 1 byte/s: floors in seconds x 1e3
    assert floor_ms(s, 10, "fwd", tflops, gbs) == pytest.approx(1440 / 1e3 * 1e3)
    assert floor_ms(s, 10, "fwd+bwd", tflops, None) == pytest.approx(4320.0)
    # traffic 576 bytes at 1 byte/s = 576 s, GEMMs 4320 / 1000 = 4.32 s: the traffic bounds it
    assert floor_ms(s, 10, "fwd+bwd", 1e-9, 1e-9) == pytest.approx(576e3)
    assert floor_ms(s, 10, "fwd+bwd", 1e-9, 1.0) == pytest.approx(4320.0)  # fast memory: the GEMMs bound it


def test_add_ratios_uses_the_shapes_floor():
    s = Shape("s", hidden=4, ffn=3, experts=2, topk=2, gated=True)
    recs = [Record("s", 10, "megatron+grouped", "fwd+bwd", ms=8000.0, tflops=0.0),
            Record("s", 10, "comet-reference", "fwd+bwd", ms=4000.0, tflops=0.0)]
    add_ratios(recs, 1e-9, [s], copy_gbs=1e-6)  # GEMMs 4320 ms, traffic 576 ms
    assert recs[1].vs_grouped == 2.0
    assert recs[0].vs_floor == pytest.approx(4320 / 8000) and recs[1].vs_floor == pytest.approx(4320 / 4000)


def test_distributed_optimizer_flag_needs_ddp(capsys):
    # the layout is DDP's parameter buffer: asking for it without --ddp is refused with the fix, before any GPU work
    from comet_megatron.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--distributed-optimizer", "--shapes", "mixtral-8x7b"])
    assert exit_info.value.code == 2
    assert "--distributed-optimizer needs --ddp" in capsys.readouterr().err


def test_first_microbatch_floor_counts_the_main_grad_write_only():
    # a step's first micro-batch finds main_grad zeroed: the least traffic is writing it (4 of the 8 bytes)
    s = Shape("s", hidden=4, ffn=3, experts=2, topk=2, gated=True)
    assert s.flops(10, "fwd+bwd:first") == s.flops(10, "fwd+bwd") == 4320 and s.flops(10, "fwd") == 1440
    assert floor_ms(s, 10, "fwd+bwd:first", 1e-9, 1e-9) == pytest.approx(288e3)
    assert floor_ms(s, 10, "fwd+bwd:first", 1e-9, 1.0) == pytest.approx(4320.0)


def test_first_microbatch_mode_needs_ddp(capsys):
    from comet_megatron.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--modes", "fwd+bwd:first", "--shapes", "mixtral-8x7b"])
    assert exit_info.value.code == 2
    assert "fwd+bwd:first needs --ddp" in capsys.readouterr().err


def test_first_microbatch_runs_zero_the_grad_buffer_untimed():
    """The closure timed in mode fwd+bwd:first carries DDP's zero_grad_buffer as its untimed setup; other modes
    carry none; a layer outside DDP is refused naming the fix."""
    from comet_megatron.bench import _with_zeroed_grads

    class FakeDDP:
        zeroed = 0

        def zero_grad_buffer(self):
            self.zeroed += 1

    wrapper = FakeDDP()

    def run():
        pass

    assert _with_zeroed_grads(run, wrapper, "fwd+bwd:first").setup == wrapper.zero_grad_buffer

    def later():
        pass

    assert not hasattr(_with_zeroed_grads(later, wrapper, "fwd+bwd"), "setup")
    with pytest.raises(ValueError, match="--ddp"):
        _with_zeroed_grads(lambda: None, object(), "fwd+bwd:first")
