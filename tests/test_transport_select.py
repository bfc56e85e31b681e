"""Transport selection (`comet_megatron.transport.select`): where ranks and GPUs are, what each
`--comet-transport` value then does. No GPU needed: the placement is given, CUDA is not touched."""

from __future__ import annotations

import pytest
import torch

from comet_megatron import CometConfig
from comet_megatron.transport import TransportUnavailable, resolve_transport
from comet_megatron.transport import select


def _all_access(a, b):
    return True


@pytest.mark.parametrize("placement,rank,want", [
    ([("h", 0)], 0, (True, "", False)),
    ([("h", 0), ("h", 1)], 1, (True, "", False)),
    ([("h", 0), ("h", 0)], 0, (True, "", True)),
    ([("h", 0), ("h", 1), ("h", 1), ("h", 2)], 3, (True, "", True)),
])
def test_check_placement_reachable(placement, rank, want):
    assert select.check_placement(placement, rank, _all_access) == want


def test_check_placement_other_host_or_no_peer_access():
    reach, why, _ = select.check_placement([("a", 0), ("b", 0)], 0, _all_access)
    assert not reach and "several hosts" in why
    reach, why, _ = select.check_placement([("h", 0), ("h", 3)], 0, lambda a, b: (a, b) != (0, 3))
    assert not reach and "GPU 0 cannot access GPU 3" in why


@pytest.fixture
def placed(monkeypatch):
    """resolve_transport on a pretend 2-rank group whose placement the test sets."""
    state = {"placement": [("h", 0), ("h", 1)], "symm": (True, "")}
    monkeypatch.setattr(select, "_group_size", lambda group: len(state["placement"]))
    monkeypatch.setattr(select, "_peers_reachable",
                        lambda group, device: select.check_placement(state["placement"], 0, _all_access))
    monkeypatch.setattr(select, "_symm_mem_available", lambda: state["symm"])
    return state


CUDA0 = torch.device("cuda", 0)  # a device object only: nothing runs on it


def test_auto_at_ep_size_1_runs_the_reference_path(monkeypatch):
    monkeypatch.setattr(select, "_group_size", lambda group: 1)
    for support in ((True, ""), (False, "GLU offset/clamp")):
        transport, why = resolve_transport(CometConfig(transport="auto"), None, CUDA0, support)
        assert transport == "nccl"
        assert why == (select.EP1_REASON if support[0] else "the fused kernels do not implement GLU offset/clamp")
    assert "EP size 1" in select.EP1_REASON and "--comet-transport emulated" in select.EP1_REASON
    # the fused kernels stay one flag away at EP size 1
    assert resolve_transport(CometConfig(transport="emulated"), None, CUDA0, (True, ""))[0] == "emulated"


def test_auto_prefers_symm_mem_one_gpu_per_rank(placed):
    assert resolve_transport(CometConfig(transport="auto"), None, CUDA0, (True, "")) == ("symm_mem", "")


def test_auto_uses_cuda_ipc_when_ranks_share_a_gpu(placed):
    placed["placement"] = [("h", 0), ("h", 0)]
    transport, why = resolve_transport(CometConfig(transport="auto"), None, CUDA0, (True, ""))
    assert transport == "cuda_ipc" and "share one GPU" in why


def test_auto_uses_cuda_ipc_without_symmetric_memory(placed):
    placed["symm"] = (False, "torch.distributed._symmetric_memory is not importable (x)")
    transport, why = resolve_transport(CometConfig(transport="auto"), None, CUDA0, (True, ""))
    assert transport == "cuda_ipc" and "not importable" in why


def test_auto_falls_back_to_the_reference_path_across_hosts(placed):
    placed["placement"] = [("a", 0), ("b", 0)]
    transport, why = resolve_transport(CometConfig(transport="auto"), None, CUDA0, (True, ""))
    assert transport == "nccl" and "several hosts" in why


def test_explicit_symm_mem_on_a_shared_gpu_names_the_fix(placed):
    placed["placement"] = [("h", 0), ("h", 0)]
    with pytest.raises(TransportUnavailable, match="one GPU per rank.*use cuda_ipc"):
        resolve_transport(CometConfig(transport="symm_mem"), None, CUDA0, (True, ""))
    # cuda_ipc shares the GPU fine
    assert resolve_transport(CometConfig(transport="cuda_ipc"), None, CUDA0, (True, "")) == ("cuda_ipc", "")


def test_explicit_transport_across_hosts_is_refused(placed):
    placed["placement"] = [("a", 0), ("b", 1)]
    for transport in ("symm_mem", "cuda_ipc"):
        with pytest.raises(TransportUnavailable, match="several hosts"):
            resolve_transport(CometConfig(transport=transport), None, CUDA0, (True, ""))


def test_explicit_transport_needs_a_gpu_or_the_interpreter(placed, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TransportUnavailable, match="needs a CUDA GPU"):
        resolve_transport(CometConfig(transport="cuda_ipc"), None, torch.device("cpu"), (True, ""))
    with pytest.raises(TransportUnavailable, match="fused kernels cannot run"):
        resolve_transport(CometConfig(transport="symm_mem"), None, CUDA0, (False, "expert tensor parallelism"))
    assert resolve_transport(CometConfig(transport="auto"), None, CUDA0,
                             (False, "expert tensor parallelism")) == (
        "nccl", "the fused kernels do not implement expert tensor parallelism")


def test_bench_auto_rows_copy_what_auto_runs():
    """`bench layer`'s "comet (auto)" rows repeat the measured variant `auto` picks at EP size 1 (the reference
    path), each right after its group; none where a comet variant was not measured."""
    from comet_megatron.bench import AUTO, Record, Shape, add_auto

    small, large = Shape("small", 2048, 1408, 64, 4), Shape("large", 4096, 14336, 8, 2)
    recs = []
    for shape in (small, large):
        for tokens in (8192, 16384):
            for v, ms in (("megatron+grouped", 3.0), ("comet-reference", 2.0), ("comet-fused", 1.0)):
                recs.append(Record(shape.name, tokens, v, "fwd+bwd", ms + tokens / 1e5, 1.0))
    recs.append(Record("small", 4096, "comet-reference", "fwd+bwd", 2.0, 1.0))  # fused not measured there
    out = add_auto(list(recs))
    auto = {(r.shape, r.tokens): r.picks for r in out if r.variant == AUTO}
    assert auto == {("small", 8192): "comet-reference", ("small", 16384): "comet-reference",
                    ("large", 8192): "comet-reference", ("large", 16384): "comet-reference"}
    for i, r in enumerate(out):
        if r.variant == AUTO:  # right after its group, with the picked row's time
            assert out[i - 1].shape == r.shape and out[i - 1].tokens == r.tokens
            assert r.ms == next(q.ms for q in out if (q.shape, q.tokens, q.variant) == (r.shape, r.tokens, r.picks))


def test_fused_support_names_bf16_under_the_interpreter(monkeypatch):
    """bf16 activations in Triton's interpreter: the fused kernels would compute wrong products, so the layer's
    fused path is declined with that reason (auto then runs the reference path, an explicit transport errs)."""
    from types import SimpleNamespace

    import torch

    from comet_megatron.fused import fused_support

    config = SimpleNamespace(activation_func=torch.nn.functional.silu, add_bias_linear=False, gated_linear_unit=True,
                             glu_linear_offset=0.0, activation_func_clamp_value=None, moe_apply_probs_on_input=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = fused_support(config, 1, torch.bfloat16)
    assert not ok and "interpreter" in why and "fp32 or fp16" in why
    assert fused_support(config, 1, torch.float32) == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fused_support(config, 1, torch.bfloat16) == (True, "")
