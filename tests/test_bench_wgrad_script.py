"""`examples/bench_wgrad.py`: the rows each expert gets (its `--rows` knob) and its refusal without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "bench_wgrad.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_wgrad", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_even_and_routed_rows_per_expert():
    mod = _module()
    even = mod.expert_counts(2048, 8, 2, "even")
    assert even == [512] * 8
    assert mod.expert_counts(10, 4, 3, "even") == [8, 8, 7, 7]
    routed = mod.expert_counts(2048, 8, 2, "routed")
    assert sum(routed) == 4096 and len(routed) == 8 and max(routed) <= 2048
    assert routed != even and min(routed) > 0  # uneven, as a random routing is; every expert gets rows here
    assert routed == mod.expert_counts(2048, 8, 2, "routed")  # seeded
    # each token's k experts are distinct: with k = E every expert gets every token
    assert mod.expert_counts(100, 4, 4, "routed") == [100] * 4
    with pytest.raises(ValueError, match="even or routed"):
        mod.expert_counts(10, 4, 2, "zipf")


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the machine without CUDA, anywhere
    assert _module().main(["--shapes", "mixtral-8x7b", "--tokens", "2048", "--rows", "routed"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bf16_target_refuses_overwrite(capsys):
    """--overwrite belongs to the main_grad target: a clear usage error, not a silently ignored flag."""
    with pytest.raises(SystemExit) as exc:
        _module().main(["--target", "bf16", "--overwrite"])
    assert exc.value.code == 2
    assert "--overwrite is for --target main-grad" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--ws-configs", "[{block_k: 64}]"], "--ws-configs: not JSON"),
    (["--ws-configs", "{}"], "a JSON list of keyword sets"),
])
def test_ws_configs_usage_errors(argv, message, capsys):
    """The Gluon kernel's --ws-configs: a clear usage error for malformed sets."""
    with pytest.raises(SystemExit) as exc:
        _module().main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
