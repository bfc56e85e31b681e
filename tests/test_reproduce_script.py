"""`examples/reproduce_single_gpu.sh`: the one-GPU reproduction of the README's figures. On the CPU: its commands
(DRY_RUN=1) are ones the CLI accepts, it covers the three stages and honours its knobs, and without a GPU it stops
at once with the fix instead of failing stage by stage."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "reproduce_single_gpu.sh"


def _commands(tmp_path, **env):
    out = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, check=True,
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env})
    lines = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    prefix = [sys.executable, "-m", "comet_megatron.cli"]
    cmds = [shlex.split(line) for line in lines]
    # CLI subcommands (returned without the prefix), or scripts of examples/ (returned from the script's path on)
    assert all(c[:3] == prefix or (c[0] == sys.executable and c[1].startswith("examples/")) for c in cmds), lines
    return [c[3:] if c[:3] == prefix else c[1:] for c in cmds]


def test_dry_run_lists_the_stages_with_arguments_the_cli_accepts(tmp_path, monkeypatch, capsys):
    from comet_megatron import bench_ep, cli

    cmds = _commands(tmp_path, SHAPES="mixtral-8x7b qwen2-moe-a2.7b", TOKENS="2048 4096")
    layers = [c for c in cmds if c[:2] == ["bench", "layer"]]
    kernels = [c for c in cmds if c[:2] == ["bench", "kernels"]]
    wgrad = [c for c in cmds if c[0] == "examples/bench_wgrad.py"]
    e2e = [c for c in cmds if c[:3] == ["bench", "ep", "e2e"]]
    assert len(layers) == 2 and len(kernels) == 1 and len(wgrad) == 2 and len(e2e) == 1 and len(cmds) == 6, cmds
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import bench_wgrad
    finally:
        sys.path.remove(str(ROOT / "examples"))
    for c in wgrad:  # parsed by the script itself: without CUDA it stops after parsing, saying so
        assert "--rows" in c and c[c.index("--tokens") + 1:][:2] == ["2048", "4096"] and "--ws-configs" in c
        assert bench_wgrad.main(c[1:]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    assert sum("--target" in c for c in wgrad) == 1  # main_grad (default) and the fresh bf16 gradient
    for c in layers:  # parsed by the real CLI; on a machine without CUDA the benchmark stops after parsing
        assert "fwd+bwd:first" in c and "--ddp" in c and c[c.index("--tokens") + 1:][:2] == ["2048", "4096"]
        assert cli.main(c) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else bench kernels would run its CPU smoke test
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        cli.main(kernels[0])
    args = bench_ep.e2e_parser().parse_args(e2e[0][3:])
    assert args.nproc == 1 and args.runs == ["comet", "alltoall"]
    assert args.extra[-2:] == ["--expert-model-parallel-size", "1"]
    assert Path(args.config).name == "qwen2-moe-a2.7b-4l.yaml" and (ROOT / args.config).exists()


def test_knobs_skip_stages(tmp_path):
    cmds = _commands(tmp_path, SHAPES="phi-3.5-moe", SKIP_KERNELS="1", SKIP_E2E="1", SKIP_WGRAD="1")
    assert [c[:2] for c in cmds] == [["bench", "layer"]]
    cmds = _commands(tmp_path, SHAPES="phi-3.5-moe mixtral-8x7b", SKIP_LAYER="1")
    assert [c[:2] for c in cmds] == [["bench", "kernels"], ["examples/bench_wgrad.py", "--rows"],
                                     ["examples/bench_wgrad.py", "--rows"], ["bench", "ep"]]


def test_without_a_gpu_it_stops_with_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    env["NVIDIA_SMI"] = str(tmp_path / "no-nvidia-smi")  # the GPU probe the script runs, absent here
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "no NVIDIA GPU here (DRY_RUN=1 prints the commands)" in out.stderr
    assert not (tmp_path / "out").exists()
