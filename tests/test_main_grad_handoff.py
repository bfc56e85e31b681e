"""Expert weight gradients under Megatron's DistributedDataParallel, without the delay: the comet experts
add the stacked gradient into the parameters' `main_grad`s in one multi-tensor operation
(`experts.hand_to_main_grads`) and DDP's per-parameter hooks only drop the placeholders.

Checked on CPU with Megatron's real DDP (gloo, EP=2, float32), two iterations of two micro-batches (the
first under `no_sync`), `--overlap-grad-reduce` on: every `main_grad` of the comet layer equals Megatron's
alltoall + SequentialMLP layer's, with the hand-off on (and it ran: counted), with it switched off
(`COMET_MAIN_GRAD_HANDOFF=0`), through the one-launch Triton accumulation (`kernels.accumulate`,
interpreter) and torch's foreach add, and when a parameter asks DDP to add zeros (`zero_out_wgrad`: the hand-off
must step aside, else DDP would add the gradient twice), and with the per-expert GEMMs that accumulate into
`main_grad` themselves (`COMET_WGRAD_ACCUMULATION=gemm`, forced here: on a GPU they are chosen for few large
experts), and with the one-launch Triton kernel that does the same for all experts (`triton`, the GPU's choice
otherwise; interpreter). Reference path and fused path (interpreter).

The first micro-batch of each iteration finds the `main_grad`s just zeroed by `zero_grad_buffer()` (flag
`grad_added_to_main_grad` cleared): the comet routes then WRITE the gradient instead of adding it
(`experts.main_grads_zeroed`). To show that nothing reads the buffer then, the comet experts' `main_grad`s are
poisoned with NaN right after `zero_grad_buffer()` wherever a comet route writes them (an add would keep the
NaN); the second micro-batch must add (else the first one's gradient would be lost, which the comparison with
Megatron sees). `overwrite_off` (`COMET_MAIN_GRAD_OVERWRITE=0`) adds in both, on an unpoisoned buffer;
`overwrite_check` (`=check`) verifies the zeros before writing (they are zero: no error).
"""

from __future__ import annotations

import pytest

from mp import run_distributed

INTERPRET = {"TRITON_INTERPRET": "1"}


def _body(rank, fused):
    import contextlib
    import os

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import comet_megatron
    from comet_megatron import CometConfig, experts
    from comet_megatron.patches import cpu_training
    from moe_cases import make_config, make_input, rel_err, shape_router

    cpu_training.apply()
    comet_megatron.enable(
        CometConfig(transport="cuda_ipc", tile_m=16, tile_n=16, tile_k=16, comm_programs=1) if fused
        else CometConfig(transport="nccl")
    )
    calls = {"handed": 0, "declined": 0}
    real = experts.hand_to_main_grads

    def counting(params, grad):
        done = real(params, grad)
        calls["handed" if done else "declined"] += 1
        return done

    experts.hand_to_main_grads = counting
    from comet_megatron.kernels import accumulate

    def count_calls(module, name, key):
        real_fn = getattr(module, name)

        def wrapper(*args):
            calls[key] += 1
            return real_fn(*args)

        calls[key] = 0
        setattr(module, name, wrapper)

    count_calls(accumulate, "accumulate_into", "one_launch")
    count_calls(experts, "accumulate_wgrad_gemms", "gemm")
    count_calls(experts, "accumulate_wgrad_triton", "triton")
    overrides = dict(moe_router_topk=2)
    ref_cfg = make_config("alltoall", **overrides)
    spec = get_gpt_layer_local_spec(num_experts=ref_cfg.num_moe_experts, moe_grouped_gemm=False)
    torch.manual_seed(7)
    ref = spec.submodules.mlp(config=ref_cfg)
    shape_router(ref, "skewed")
    state = ref.state_dict()

    def run(layer, tag):
        model = DistributedDataParallel(
            layer.config, DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=10**9), layer)
        if tag == "zero_out":
            for p in layer.experts.parameters():
                p.zero_out_wgrad = True
        os.environ["COMET_MAIN_GRAD_HANDOFF"] = "0" if tag == "switched_off" else "1"
        os.environ["COMET_WGRAD_ACCUMULATION"] = tag if tag in ("gemm", "triton") else "add"
        os.environ["COMET_MAIN_GRAD_OVERWRITE"] = {"overwrite_off": "0", "overwrite_check": "check"}.get(tag, "1")
        # routes that write main_grad in the first micro-batch (DDP's hook adds in switched_off / zero_out)
        poison = tag in ("handoff", "gemm", "triton")
        before = dict(calls)
        per_iter = []
        # the memory behind the placeholder gradients DDP's hooks receive (they are never read): at most one
        # expert's weight, not a stack of all experts' (comet layers whose GEMMs accumulate into main_grad; in
        # the "add" hand-off the slices are of the stacked gradient itself, which exists anyway)
        seen, hooks = [], []
        if tag in ("gemm", "triton"):
            for p in layer.experts.parameters():
                hooks.append(p.register_hook(lambda g, p=p: seen.append(
                    (g.untyped_storage().nbytes(), p.numel() * p.element_size()))))
        for it in range(2):
            model.zero_grad_buffer()
            if poison:
                for p in layer.experts.parameters():
                    p.main_grad.fill_(float("nan"))
            for mb in range(2):
                gen = torch.Generator().manual_seed(1000 * it + 10 * mb + rank)
                x = make_input(6, 2, layer.config.hidden_size, 100 * it + mb + 31 * rank)
                dy = torch.randn(x.shape, generator=gen)
                with model.no_sync() if mb == 0 else contextlib.nullcontext():
                    y = model(x.clone().requires_grad_(True))[0]
                    y.backward(dy)
            model.finish_grad_sync()
            per_iter.append({n: p.main_grad.clone() for n, p in layer.named_parameters()})
        left = [n for n, p in layer.named_parameters() if p.grad is not None]
        for h in hooks:
            h.remove()
        oversized = [(got, size) for got, size in seen if got > size]
        return per_iter, {k: calls[k] - before[k] for k in calls}, left, (len(seen), oversized)

    out = {"ref": run(ref, "ref")}
    for tag in ("handoff", "switched_off", "zero_out", "gemm", "triton", "overwrite_off", "overwrite_check"):
        layer = spec.submodules.mlp(config=make_config("comet", **overrides))
        layer.load_state_dict(state, strict=True)
        out[tag] = run(layer, tag)
    os.environ.pop("COMET_MAIN_GRAD_HANDOFF", None)
    os.environ.pop("COMET_WGRAD_ACCUMULATION", None)
    os.environ.pop("COMET_MAIN_GRAD_OVERWRITE", None)
    errs = {}
    for tag in ("handoff", "switched_off", "zero_out", "gemm", "triton", "overwrite_off", "overwrite_check"):
        for it in range(2):
            for n, g in out["ref"][0][it].items():
                errs[f"{tag}:{it}:{n}"] = rel_err(out[tag][0][it][n], g)
    expert_norm = min(g.norm().item() for n, g in out["handoff"][0][1].items() if n.startswith("experts."))
    return {
        "errs": errs,
        "calls": {tag: out[tag][1] for tag in out},
        "grad_left": {tag: out[tag][2] for tag in out},
        "placeholders": {tag: out[tag][3] for tag in out},
        "expert_norm": expert_norm,
        "transport": layer.transport,
    }


def _check(results, transport, one_launch):
    for rank, res in enumerate(results):
        assert res["transport"] == transport, res["transport"]
        bad = {k: v for k, v in res["errs"].items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"
        assert res["expert_norm"] > 0, res
        # 2 iterations x 2 micro-batches x (fc1, fc2) stacked gradients
        # the one-launch Triton accumulation where Triton runs (here: the interpreter), else torch's foreach
        launches = 8 if one_launch else 0
        none = {"handed": 0, "declined": 0, "one_launch": 0, "gemm": 0, "triton": 0}
        assert res["calls"]["handoff"] == {**none, "handed": 8, "one_launch": launches}, res["calls"]
        assert res["calls"]["zero_out"] == {**none, "declined": 8}, res["calls"]
        # per-expert GEMMs accumulating into main_grad: no stacked gradient handed anywhere
        assert res["calls"]["gemm"] == {**none, "gemm": 8}, res["calls"]
        # the grouped Triton kernel accumulating into main_grad where Triton runs, else the hand-off (forced
        # modes that cannot run fall back to it)
        want = {**none, "triton": 8} if one_launch else {**none, "handed": 8}
        assert res["calls"]["triton"] == want, res["calls"]
        assert res["calls"]["switched_off"]["handed"] == 0, res["calls"]
        assert res["calls"]["overwrite_off"] == res["calls"]["handoff"], res["calls"]
        assert res["calls"]["overwrite_check"] == res["calls"]["handoff"], res["calls"]
        # DDP's hooks dropped every placeholder gradient
        assert all(not names for names in res["grad_left"].values()), res["grad_left"]
        # ... each backed by at most one expert's memory (2 iterations x 2 micro-batches x 2 experts x 2 linears)
        for tag in ("gemm", "triton") if one_launch else ("gemm",):  # forced "triton" fell back to "add" above
            count, oversized = res["placeholders"][tag]
            assert count == 16 and not oversized, (tag, res["placeholders"][tag])


def test_reference_path_main_grad_handoff_matches_megatron_ddp():
    # without the interpreter (another test module may have set it for this process): torch's foreach add
    _check(run_distributed(_body, 2, ep=2, env={"TRITON_INTERPRET": "0"}, fused=False), "nccl", one_launch=False)


@pytest.mark.slow
def test_reference_path_triton_wgrad_matches_megatron_ddp():
    # the interpreter: the Triton accumulation kernels run (the GPU's path for many small experts)
    _check(run_distributed(_body, 2, ep=2, env=INTERPRET, fused=False), "nccl", one_launch=True)


@pytest.mark.slow
def test_fused_path_main_grad_handoff_matches_megatron_ddp():
    _check(run_distributed(_body, 2, ep=2, env=INTERPRET, fused=True), "cuda_ipc", one_launch=True)


@pytest.mark.parametrize("experts,rows,overwrite,want", [
    (8, 4096, False, "gemm"), (8, 4096, True, "gemm"),          # Mixtral, 2048 tokens: 512 rows per expert
    (8, 8192, False, "gemm"),                                   # Mixtral, 4096 tokens: 1024 rows each
    (16, 4096, False, "triton"), (16, 4096, True, "gemm"),      # Phi-3.5-MoE, 2048 tokens: 256 rows each
    (16, 8192, False, "gemm"), (16, 2048, True, "triton"),      # Phi-3.5-MoE 4096 tokens; 128 rows each
    (16, 16384, False, "gemm"),                                 # Phi-3.5-MoE 8192 tokens: 1024 rows each
    (64, 8192, False, "triton"), (64, 8192, True, "triton"),    # Qwen2-MoE: many experts
    (64, 131072, False, "add"), (64, 131072, True, "add"),      # many experts with many rows: compute-bound
])
def test_auto_weight_gradient_route(experts, rows, overwrite, want):
    """The measured policy (H100, examples/bench_wgrad.py with and without --overwrite, docs/BENCHMARKS.md): per-
    expert cuBLAS GEMMs for few experts from 512 rows each when adding, from 256 when writing (a step's first
    micro-batch); the one-launch Triton kernel for many or small experts; the grouped GEMM + add beyond."""
    from comet_megatron.experts import auto_wgrad_route

    assert auto_wgrad_route(experts, rows, overwrite) == want
    assert auto_wgrad_route(experts, rows, overwrite, gemm_ok=False) in ("triton", "add")
    assert auto_wgrad_route(experts, rows, overwrite, gemm_ok=False, triton_ok=False) == "add"


@pytest.mark.parametrize("experts,rows,overwrite,want", [
    (8, 4096, False, "gluon"), (8, 4096, True, "gemm"),         # Mixtral, 2048 tokens: 512 rows per expert
    (8, 8192, False, "gluon"), (8, 16384, False, "gemm"),      # Mixtral, 4096 / 8192 tokens: 1024 / 2048 rows each
    (16, 4096, False, "gluon"), (16, 4096, True, "gemm"),       # Phi-3.5-MoE, 2048 tokens: 256 rows each
    (16, 8192, False, "gluon"), (16, 2048, True, "gluon"),      # Phi-3.5-MoE 4096 tokens; 128 rows each
    (16, 16384, False, "gluon"), (16, 16448, False, "gemm"),   # Phi-3.5-MoE 8192 tokens: 1024 rows each
    (60, 8192, False, "triton"), (60, 8192, True, "gluon"),     # Qwen2-MoE 2048 tokens: ~136 rows each
    (60, 16384, False, "gluon"), (60, 32768, False, "gluon"),   # Qwen2-MoE 4096 / 8192 tokens
    (60, 131072, False, "add"), (60, 131072, True, "add"),      # many experts with many rows: compute-bound
])
def test_auto_weight_gradient_route_with_gluon(experts, rows, overwrite, want):
    """Where the Hopper Gluon kernel can run (H100, examples/bench_wgrad.py --rows routed, docs/BENCHMARKS.md
    fourteenth and fifteenth sessions): adding, it takes 192-1024 mean rows per expert from the per-expert GEMMs
    and the Triton kernel; writing, it takes the Triton kernel's cases and leaves the per-expert GEMMs theirs."""
    from comet_megatron.experts import auto_wgrad_route

    assert auto_wgrad_route(experts, rows, overwrite, gluon_ok=True) == want
    assert auto_wgrad_route(experts, rows, overwrite, gluon_ok=False) != "gluon"
    assert auto_wgrad_route(experts, rows, overwrite, gemm_ok=False, triton_ok=False, gluon_ok=True) == "add"


def test_main_grads_zeroed_trusts_the_flag_and_checks_on_request(monkeypatch):
    """`main_grads_zeroed`: write only when every weight carries DDP's cleared flag; COMET_MAIN_GRAD_OVERWRITE=0
    never writes; `check` also verifies the buffers are zero and names the fix when they are not."""
    import torch

    from comet_megatron.experts import main_grads_zeroed

    def weight(flag, value=0.0):
        p = torch.nn.Parameter(torch.zeros(3, 2))
        p.main_grad = torch.full((3, 2), value)
        if flag is not None:
            p.grad_added_to_main_grad = flag
        return p

    monkeypatch.delenv("COMET_MAIN_GRAD_OVERWRITE", raising=False)
    assert main_grads_zeroed([weight(False), weight(False)])
    assert not main_grads_zeroed([weight(False), weight(True)])  # one already holds a gradient
    assert not main_grads_zeroed([weight(False), weight(None)])  # not under Megatron's DDP
    assert not main_grads_zeroed([])
    dirty = [weight(False), weight(False, 1.5)]
    assert main_grads_zeroed(dirty)  # the flag is trusted (no device read)
    monkeypatch.setenv("COMET_MAIN_GRAD_OVERWRITE", "check")
    assert main_grads_zeroed([weight(False), weight(False)])
    with pytest.raises(RuntimeError, match=r"weights \[1\].*COMET_MAIN_GRAD_OVERWRITE=0"):
        main_grads_zeroed(dirty)
    monkeypatch.setenv("COMET_MAIN_GRAD_OVERWRITE", "0")
    assert not main_grads_zeroed([weight(False), weight(False)])
    monkeypatch.setenv("COMET_MAIN_GRAD_OVERWRITE", "yes")
    with pytest.raises(ValueError, match="use 1, 0 or check"):
        main_grads_zeroed([weight(False)])


def test_wgrad_tma_out_switch(monkeypatch):
    """COMET_WGRAD_TMA_OUT: the TMA epilogue of the weight-gradient kernel is opt-in (1); 0 or unset: the
    register epilogue; anything else names the choices."""
    from comet_megatron.experts import wgrad_tma_out

    monkeypatch.delenv("COMET_WGRAD_TMA_OUT", raising=False)
    assert wgrad_tma_out() is False
    monkeypatch.setenv("COMET_WGRAD_TMA_OUT", "1")
    assert wgrad_tma_out() is True
    monkeypatch.setenv("COMET_WGRAD_TMA_OUT", "yes")
    with pytest.raises(ValueError, match="use 0 .* or 1"):
        wgrad_tma_out()
