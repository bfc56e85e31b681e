"""`comet-megatron bench ep`: the --cpu-smoke plumbing (2 gloo processes under torchrun) and the
ratio arithmetic on made-up numbers. The timings themselves need GPUs (examples/run_ep_matrix.sh)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comet_megatron import bench_ep

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- arithmetic
def test_hidden_share_and_bound():
    # compute 10 ms, comm 4 ms: fully serial layer = 14 ms, perfect overlap = 10 ms
    assert bench_ep.hidden_share(10.0, 4.0, 14.0) == pytest.approx(0.0)
    assert bench_ep.hidden_share(10.0, 4.0, 10.0) == pytest.approx(1.0)
    assert bench_ep.hidden_share(10.0, 4.0, 11.0) == pytest.approx(0.75)
    assert bench_ep.hidden_share(10.0, 4.0, 16.0) == pytest.approx(-0.5)  # worse than serial
    assert bench_ep.vs_bound(11.0, 10.0, 4.0) == pytest.approx(1.1)
    assert bench_ep.vs_bound(6.0, 2.0, 5.0) == pytest.approx(1.2)  # comm-bound
    assert bench_ep.speedup(12.0, 8.0) == pytest.approx(1.5)
    for bad in (None, float("nan"), float("inf")):
        assert bench_ep.hidden_share(bad, 4.0, 10.0) is None
        assert bench_ep.speedup(bad, 1.0) is None
        assert bench_ep.vs_bound(bad, 1.0, 1.0) is None
    assert bench_ep.hidden_share(1.0, 0.0, 1.0) is None  # no communication: undefined
    assert bench_ep.speedup(1.0, 0.0) is None


def _rec(variant, ms, mode="fwd", status="ok", note=None):
    return {"shape": "s", "tokens": 64, "mode": mode, "variant": variant, "ms": ms,
            "ms_per_rank": [ms], "status": status, "note": note}


def test_summarize_on_made_up_numbers():
    records = [
        _rec("megatron", 30.0), _rec("megatron+grouped", 15.0), _rec("comet-fused", 11.0),
        _rec("megatron+ep-overlap", None, status="n/a", note="why"),
        _rec(bench_ep.COMPUTE, 10.0), _rec(bench_ep.COMM, 4.0),
    ]
    (row,) = bench_ep.summarize(records, ep=8)
    assert set(bench_ep.SUMMARY_FIELDS) <= set(row)
    assert row["ep"] == 8 and row["bound_ms"] == 10.0
    assert row["speedup_comet_vs"] == pytest.approx({"megatron": 30 / 11, "megatron+grouped": 15 / 11})
    assert row["hidden_share"]["comet-fused"] == pytest.approx(0.75)
    assert row["hidden_share"]["megatron+grouped"] == pytest.approx(-0.25)
    assert row["vs_bound"]["comet-fused"] == pytest.approx(1.1)
    assert row["ms"]["megatron+ep-overlap"] is None
    assert row["hidden_share"]["megatron+ep-overlap"] is None
    assert row["notes"] == {"megatron+ep-overlap": "why"}


def test_summarize_failed_measurement_gives_none():
    records = [_rec("megatron+grouped", 15.0), _rec("comet-fused", None, status="error", note="boom"),
               _rec(bench_ep.COMPUTE, 10.0), _rec(bench_ep.COMM, 4.0)]
    (row,) = bench_ep.summarize(records, ep=2)
    assert row["speedup_comet_vs"]["megatron+grouped"] is None
    assert row["hidden_share"]["comet-fused"] is None
    assert row["notes"]["comet-fused"] == "boom"


# ---------------------------------------------------------------- end-to-end helper
PRETRAIN_LOG = """\
comet-megatron: launching ...
INFO:comet_megatron:comet: layer 1 uses the symm_mem transport (fused path)
step 1/4 loss 11.9000 tokens/s 1000.0 step_time_ms 65.5
step 2/4 loss 11.5000 tokens/s 2000.0 step_time_ms 32.7
\x1b[1mstep     3/4\x1b[0m  loss \x1b[36m 10.5000\x1b[0m  \x1b[32m    2100.0\x1b[0m tokens/s  step     31.2 ms
step 4/4 loss nan tokens/s 2200.0 step_time_ms 29.8
summary: steps 4 ...
COMET_SUMMARY {"steps": 4, "mean_tokens_per_s": 2150.0, "final_loss": 10.2, "mean_step_time_s": 0.03}
"""


def test_parse_pretrain_log_plain_and_rich_lines():
    parsed = bench_ep.parse_pretrain_log(PRETRAIN_LOG)
    steps = parsed["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert steps[0] == {"step": 1, "loss": 11.9, "tokens_per_s": 1000.0, "step_time_ms": 65.5}
    assert steps[2]["loss"] == 10.5 and steps[2]["tokens_per_s"] == 2100.0
    assert math.isnan(steps[3]["loss"])
    assert parsed["summary"]["mean_tokens_per_s"] == 2150.0
    assert parsed["comet_transports"] == ["symm_mem"]


def test_compare_e2e():
    runs = {"comet": {"summary": {"mean_tokens_per_s": 3000.0, "final_loss": 7.0}},
            "alltoall": {"summary": {"mean_tokens_per_s": 2000.0, "final_loss": 7.1}},
            "alltoall+ep-overlap": {"summary": None}}
    cmp_ = bench_ep.compare_e2e(runs)
    assert cmp_["speedup_comet_vs"]["alltoall"] == pytest.approx(1.5)
    assert cmp_["speedup_comet_vs"]["alltoall+ep-overlap"] is None
    assert cmp_["final_loss_diff_comet_minus"]["alltoall"] == pytest.approx(-0.1)
    assert cmp_["median_speedup_comet_vs"]["alltoall"] is None  # no per-step records


def test_compare_e2e_medians_resist_a_slow_step():
    """Per-step tokens/s after the warm-up steps: one slow step moves the mean, not the median."""
    def run(tps, warmup=2):
        steps = [{"step": i + 1, "loss": 1.0, "tokens_per_s": t, "step_time_ms": None} for i, t in enumerate(tps)]
        kept = tps[warmup:]
        return {"steps": steps, "summary": {"warmup_steps": warmup, "mean_tokens_per_s": sum(kept) / len(kept),
                                            "final_loss": 1.0}}

    runs = {"comet": run([10.0, 300.0, 300.0, 310.0, 290.0]),
            "alltoall": run([5.0, 9000.0, 200.0, 20.0, 210.0, 190.0])}  # step 2: warm-up; step 4: a slow step
    cmp_ = bench_ep.compare_e2e(runs)
    assert cmp_["median_tokens_per_s"] == {"comet": 300.0, "alltoall": 195.0}
    assert cmp_["median_speedup_comet_vs"]["alltoall"] == pytest.approx(300.0 / 195.0)
    assert cmp_["speedup_comet_vs"]["alltoall"] == pytest.approx(300.0 / 155.0)
    assert bench_ep.median_tokens_per_s({"steps": [], "summary": None}) is None


def test_launch_command_and_env():
    cmd = bench_ep.launch_command(4, ["--nproc", "4", "--tokens", "2048", "--nproc=3"])
    assert cmd[-3:] == ["comet_megatron.bench_ep", "--tokens", "2048"]
    assert "--nproc-per-node=4" in cmd
    env = bench_ep.launch_env(False)
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


# ---------------------------------------------------------------- the smoke run
@pytest.mark.slow
def test_cpu_smoke_writes_every_field(tmp_path):
    """`comet-megatron bench ep --cpu-smoke`: 2 gloo processes, the fused path under the Triton
    interpreter over cuda_ipc (/dev/shm); ep.json holds every record and summary field."""
    out = tmp_path / "ep"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, "-m", "comet_megatron.cli", "bench", "ep", "--cpu-smoke", "--tokens", "16",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=85,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plumbing only" in proc.stdout
    data = json.loads((out / "ep.json").read_text())
    assert (out / "ep.png").stat().st_size > 0
    meta = data["meta"]
    assert set(bench_ep.META_FIELDS) <= set(meta)
    assert meta["smoke"] is True and meta["world_size"] == 2 and meta["ep"] == 2
    assert meta["timer"] == "host perf_counter"
    assert meta["resolved_transports"]["smoke-tiny"]["comet-fused"] == "cuda_ipc"
    variants = set(bench_ep.DEFAULT_VARIANTS) | {bench_ep.COMPUTE, bench_ep.COMM}
    seen = {(r["mode"], r["variant"]) for r in data["records"]}
    assert seen == {(m, v) for m in bench_ep.MODES for v in variants}
    for r in data["records"]:
        assert set(bench_ep.RECORD_FIELDS) <= set(r)
        if r["variant"] == "megatron+ep-overlap":
            assert r["status"] == "n/a" and "combined-1F1B" in r["note"]
        else:
            assert r["status"] == "ok", r
            assert r["ms"] > 0 and len(r["ms_per_rank"]) == 2 and r["ms"] == max(r["ms_per_rank"])
    assert len(data["summary"]) == 2  # one token count x two modes
    for row in data["summary"]:
        assert set(bench_ep.SUMMARY_FIELDS) <= set(row)
        assert row["t_compute_ms"] > 0 and row["t_comm_ms"] > 0
        assert set(row["speedup_comet_vs"]) == set(bench_ep.BASELINES)
        for b in bench_ep.BASELINES:
            assert row["speedup_comet_vs"][b] == pytest.approx(row["ms"][b] / row["ms"]["comet-fused"])
        share = row["hidden_share"]["comet-fused"]
        expect = (row["t_compute_ms"] + row["t_comm_ms"] - row["ms"]["comet-fused"]) / row["t_comm_ms"]
        assert share == pytest.approx(expect)
        assert row["vs_bound"]["comet-fused"] == pytest.approx(
            row["ms"]["comet-fused"] / max(row["t_compute_ms"], row["t_comm_ms"]))


def test_run_bounded_stops_the_whole_process_group():
    """A pretraining run past its time limit: the launcher and what it started (torchrun and its
    workers) are all stopped; the output so far is kept."""
    child = "import os, sys, time; print('grandchild', os.getpid(), flush=True); time.sleep(60)"
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "time.sleep(60)")
    text, rc = bench_ep.run_bounded([sys.executable, "-c", parent], dict(os.environ), timeout_s=3)
    assert rc == "timeout"
    pid = int(text.split("grandchild", 1)[1].split()[0])
    import time

    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} still runs")
    text, rc = bench_ep.run_bounded([sys.executable, "-c", "print('hi')"], dict(os.environ), timeout_s=30)
    assert rc == 0 and text.strip() == "hi"
