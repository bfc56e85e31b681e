"""`comet-megatron bench kernels` end to end on the CPU (Triton interpreter): a smoke run that executes
every timed path of the benchmark (world 1 and emulated EP=2), its self-check against a float
reference and its JSON. Timings on the CPU mean nothing; the GPU numbers are in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPE = """\
megatron:
  hidden_size: 32
  moe_ffn_hidden_size: 16
  num_experts: 4
  moe_router_topk: 2
  swiglu: true
"""
TINY = '[{"block_m": 16, "block_n": 16, "block_k": 16, "num_comm_dispatch": 1, "num_comm_combine": 1, ' \
       '"num_compute": 2}, {"block_m": 16, "block_n": 16, "block_k": 16, "num_comm_dispatch": 2, ' \
       '"num_comm_combine": 2, "num_compute": 2, "combine_block_n": 32, "pre_reduce": true}]'


@pytest.mark.parametrize("world", [1, 2])
def test_bench_kernels_cpu_smoke(tmp_path, world):
    rounds = 2 if world == 1 else 1  # interleaved rounds: 1 call per round at world 1, 2 calls in one at world 2
    (tmp_path / "tiny-moe.yaml").write_text(SHAPE)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
           "COMET_COMMIT": "test"}
    proc = subprocess.run(
        [sys.executable, "-m", "comet_megatron.cli", "bench", "kernels", "--shapes", str(tmp_path / "tiny-moe.yaml"),
         "--tokens", "24", "--world", str(world), "--reps", "2", "--rounds", str(rounds), "--warmup", "0",
         "--configs", TINY,
         "--out", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "kernels.json").read_text())
    assert data["meta"]["device"].startswith("cpu-interpreter")
    records = data["records"]
    assert len(records) == 2 and not any("error" in r for r in records), records
    for rec in records:
        assert rec["world"] == world and rec["rows_rank0"] > 0
        assert set(rec["kernels"]) == {"L0 fwd", "L1 fwd", "L0 bwd", "L1 bwd", "wgrad dW1", "wgrad dW2"}
        assert rec["rounds"] == rounds and rec["reps_per_round"] == 2 // rounds
        for name, k in rec["kernels"].items():
            assert k["ms"] > 0 and k["cublas_ms"] > 0, (name, k)
            # the figures are the medians of the rounds' figures (one per round)
            assert len(k["rounds_ms"]) == len(k["cublas_rounds_ms"]) == rounds
            assert k["ms"] == pytest.approx(sorted(k["rounds_ms"])[0] / 2 + sorted(k["rounds_ms"])[-1] / 2)
            assert k["cublas_ms"] == pytest.approx(sum(k["cublas_rounds_ms"]) / rounds)
            assert (k["vs_sm_share"] is None) == name.startswith("wgrad")
            # world 1: the whole unfused pipeline (gather / activation / combine passes) as a second yardstick
            assert ("unfused_ms" in k) == (world == 1 and not name.startswith("wgrad")), (name, k)
            if "unfused_ms" in k:
                assert k["unfused_ms"] > 0 and k["vs_sm_share_unfused"] > 0
    assert f"EP={world}" in proc.stdout or world == 1
