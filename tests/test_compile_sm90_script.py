"""`examples/compile_sm90.py`: the Gluon weight-gradient kernel compiled for Hopper on this GPU-less machine
(Triton's NVIDIA backend and its wheel's ptxas), registers / spills / shared memory reported; a knob set that
cannot be built is reported as failed (exit status 1) with the reason, malformed knobs are a usage error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "compile_sm90.py"


def _run(*argv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_default_knobs_compile_for_sm90_without_spilling():
    """Both layouts: the default shape (512 mean rows per expert) takes two MMA warpgroups, the forced one one."""
    res = _run("--mode", "both", "--knobs", '[{}, {"mma_warpgroups": 1}]')
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 4 and all("168 registers" in ln and "shared" in ln for ln in lines), res.stdout


def test_bf16_outputs_compile_with_tma_stores_and_with_the_epilogue_warps():
    """A fresh bf16 gradient (grouped_wgrad's gluon backend): the parts leave through TMA stores from the MMA
    warpgroups (two 32 KB 16-bit staging buffers instead of the 64 KB fp32 hand-off buffer; same ring depth), or
    through the epilogue warps."""
    res = _run("--out-dtype", "bfloat16", "--mode", "write", "--knobs", '[{}, {"tma_store": false}]')
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 2 and all("168 registers" in ln for ln in lines), res.stdout  # spills: at most --max-stack
    shared = [int(ln.split("shared ")[1].split()[0]) for ln in lines]
    assert shared[0] < shared[1], res.stdout
    res = _run("--out-dtype", "bfloat16", "--mode", "add")
    assert res.returncode == 2 and "written, not added" in res.stderr


def test_a_knob_set_that_cannot_be_built_fails_with_the_reason():
    res = _run("--knobs", '[{"block_m": 128, "block_n": 512}]', "--mode", "add")
    assert res.returncode == 1
    assert "FAILED ValueError" in res.stdout and "fit next to the epilogue" in res.stdout


def test_malformed_knobs_are_a_usage_error():
    res = _run("--knobs", "{}")
    assert res.returncode == 2 and "JSON list of keyword sets" in res.stderr
    res = _run("--triton", "/nonexistent")
    assert res.returncode == 2 and "no triton/__init__.py" in res.stderr
