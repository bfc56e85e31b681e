"""Trace mode -> timeline: a traced fused forward yields well-formed events and a PNG."""

from __future__ import annotations

from mp import run_distributed


def _body(rank, path):
    import torch

    import comet_megatron
    from comet_megatron import CometConfig, timeline
    from routing_cases import build_two, random_routing, run_stages

    comet_megatron.enable()
    _, fused = build_two(dict(moe_router_topk=2), "cuda_ipc", seed=2)
    fused.comet_config.trace = True
    probs, rmap = random_routing(21, 4, 2, seed=rank)
    x, dy = torch.randn(21, 16), torch.randn(21, 16)
    run_stages(fused, x, probs, rmap, dy)
    evts = timeline.events(*fused._fused.last_trace)
    if rank == 0:
        timeline.plot(evts, path)
    kinds = sorted({(e.kernel, e.role) for e in evts})
    return {"kinds": kinds, "ordered": all(e.end >= e.start >= 0 for e in evts),
            "n": len(evts), "summary": timeline.summary(evts), "cfg": CometConfig().trace}


def test_trace_gives_timeline(tmp_path):
    path = tmp_path / "timeline.png"
    results = run_distributed(_body, 2, ep=2, env={"TRITON_INTERPRET": "1"}, path=str(path))
    for r in results:
        assert r["cfg"] is False  # trace mode is off by default
        assert r["kinds"] == [("dispatch_gemm", "comm"), ("dispatch_gemm", "compute"),
                              ("gemm_combine", "comm"), ("gemm_combine", "compute")], r["kinds"]
        assert r["ordered"], "an event ends before it starts"
        assert set(r["summary"]) == {"dispatch_gemm", "gemm_combine"}
    assert path.exists() and path.stat().st_size > 10_000
