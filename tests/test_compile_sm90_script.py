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


def test_a_knob_set_that_cannot_be_built_fails_with_the_reason():
    res = _run("--knobs", '[{"block_m": 128, "block_n": 512}]', "--mode", "add")
    assert res.returncode == 1
    assert "FAILED ValueError" in res.stdout and "fit next to the epilogue" in res.stdout


def test_malformed_knobs_are_a_usage_error():
    res = _run("--knobs", "{}")
    assert res.returncode == 2 and "JSON list of keyword sets" in res.stderr
    res = _run("--triton", "/nonexistent")
    assert res.returncode == 2 and "no triton/__init__.py" in res.stderr
