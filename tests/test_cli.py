"""`comet-megatron` CLI: YAML validation errors name the key, the launch command, end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from comet_megatron import cli
from comet_megatron.cli import ConfigError, PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _tiny() -> dict:
    return yaml.safe_load((CONFIGS / "tiny.yaml").read_text())


def _load(tmp_path: Path, data) -> PretrainConfig:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return PretrainConfig.load(path)


def _flags(cfg: PretrainConfig, **kwargs) -> list[str]:
    command, _ = cli.build_pretrain_command(cfg, gpus=kwargs.pop("gpus", 0), **kwargs)
    return command


# ---------------------------------------------------------------- errors name the key
def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as info:
        PretrainConfig.load(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_missing_config_file_exit_code(capsys, tmp_path):
    assert cli.main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        _load(tmp_path, "megatron: [unclosed\n")


def test_unknown_top_level_key(tmp_path):
    data = _tiny() | {"optimizer": {"lr": 1}}
    with pytest.raises(ConfigError, match="optimizer") as info:
        _load(tmp_path, data)
    assert "megatron, comet, launch" in str(info.value)


def test_unknown_megatron_key_suggests_the_right_one(tmp_path):
    data = _tiny()
    data["megatron"]["num_layer"] = 2
    cfg = _load(tmp_path, data)
    with pytest.raises(ConfigError, match="megatron.num_layer") as info:
        _flags(cfg)
    assert "num_layers" in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [("moe_router_topk", "two"), ("lr_decay_style", "sideways"), ("bf16", "yes"),
     ("hidden_size", [64, 128])],
)
def test_invalid_megatron_value_names_the_key(tmp_path, key, value):
    data = _tiny()
    data["megatron"][key] = value
    cfg = _load(tmp_path, data)
    with pytest.raises(ConfigError, match=f"megatron.{key}"):
        _flags(cfg)


def test_comet_option_in_megatron_section(tmp_path):
    data = _tiny()
    data["megatron"]["comet_transport"] = "nccl"
    with pytest.raises(ConfigError, match="comet: section"):
        _flags(_load(tmp_path, data))


@pytest.mark.parametrize(
    "comet, needle",
    [({"tile": 64}, "tile"), ({"tile_m": 48}, "--comet-tile-m"),
     ({"transport": "carrier_pigeon"}, "--comet-transport"),
     ({"wait_timeout_s": 0}, "--comet-wait-timeout-s")],
)
def test_invalid_comet_section(tmp_path, comet, needle):
    data = _tiny()
    data["comet"] = comet
    with pytest.raises(ConfigError, match=needle):
        _load(tmp_path, data)


@pytest.mark.parametrize(
    "launch, needle",
    [({"backend": "mpi"}, "launch.backend"), ({"nproc_per_node": 0}, "launch.nproc_per_node"),
     ({"nodes": 2}, "nodes")],
)
def test_invalid_launch_section(tmp_path, launch, needle):
    data = _tiny()
    data["launch"] = launch
    with pytest.raises(ConfigError, match=needle):
        _load(tmp_path, data)


def test_nccl_without_gpu_is_an_error(tmp_path):
    data = _tiny()
    data["launch"] = {"backend": "nccl"}
    with pytest.raises(ConfigError, match="nccl needs CUDA GPUs"):
        _flags(_load(tmp_path, data), gpus=0)


def test_error_is_printed_with_exit_code_2(capsys, tmp_path):
    data = _tiny()
    data["comet"] = {"tile_m": 48}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["pretrain", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--comet-tile-m" in err and "bad.yaml" in err


# ---------------------------------------------------------------- the launch command
def test_tiny_command_on_cpu():
    cfg = PretrainConfig.load(CONFIGS / "tiny.yaml")
    command = _flags(cfg, steps=3, extra=["--seed", "7"], gpus=0)
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in command
    text = " ".join(command)
    assert "--distributed-backend gloo" in text
    assert "--moe-token-dispatcher-type comet" in text
    assert "--expert-model-parallel-size 2" in text
    assert "--train-iters 3" in text and "--train-iters 20" not in text
    assert command[-2:] == ["--seed", "7"]  # extra args come last and win


def test_command_on_gpus_uses_nccl_and_one_process_per_gpu():
    cfg = PretrainConfig.load(CONFIGS / "tiny.yaml")
    command = _flags(cfg, gpus=4)
    assert "--nproc-per-node=4" in command
    assert "--distributed-backend nccl" in " ".join(command)


def test_comet_section_becomes_flags(tmp_path):
    data = _tiny()
    data["comet"] = {"transport": "nccl", "tile_m": 64, "overlap": False}
    command = _flags(_load(tmp_path, data))
    text = " ".join(command)
    assert "--comet-transport nccl" in text and "--comet-tile-m 64" in text
    assert "--no-comet-overlap" in command


def test_boolean_switches(tmp_path):
    data = _tiny()
    data["megatron"]["bf16"] = False
    data["megatron"]["use_distributed_optimizer"] = True
    command = _flags(_load(tmp_path, data))
    assert "--bf16" not in command and "--use-distributed-optimizer" in command


def test_parallel_sizes_must_fit_the_processes():
    cfg = PretrainConfig.load(CONFIGS / "mixtral-8x7b-4l.yaml")  # EP=8
    with pytest.raises(ConfigError, match="expert_model_parallel_size=8") as info:
        _flags(cfg, gpus=0, nproc=2)
    assert "multiple of 8" in str(info.value) and "--nproc" in str(info.value)
    _flags(cfg, gpus=8)  # one 8-GPU host fits
    _flags(cfg, gpus=1, nproc=1, extra=["--expert-model-parallel-size", "1"])  # override after --
    full = PretrainConfig.load(CONFIGS / "mixtral-8x7b.yaml")  # EP=8 x PP=4: 32 GPUs
    with pytest.raises(ConfigError, match="multiple of 32"):
        _flags(full, gpus=8)


def test_pretrain_config_round_trip(tmp_path):
    cfg = PretrainConfig.load(CONFIGS / "tiny.yaml")
    again = _load(tmp_path, cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_dry_run_prints_the_command(capsys):
    assert cli.main(["pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--steps", "2",
                     "--dry-run", "--", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "comet_megatron.pretrain" in out and "--train-iters 2" in out
    assert out.strip().endswith("--seed 5")


def test_flags_subcommand(capsys):
    assert cli.main(["flags"]) == 0
    out = capsys.readouterr().out
    for flag in ("--comet-transport", "--comet-tile-m", "--comet-wait-timeout-s"):
        assert flag in out


def test_subcommands_are_a_table():
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])
    assert {"pretrain", "flags", "bench"} <= set(cli.SUBCOMMANDS)


def test_bench_layer_forwards_its_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "layer", "--help"])
    assert info.value.code == 0
    assert "--tokens" in capsys.readouterr().out


# ---------------------------------------------------------------- the shipped configs
SHAPES = {  # hidden N, expert FFN K, experts E, top-k (+ shared expert)
    "mixtral-8x7b": (4096, 14336, 8, 2, None),
    "qwen2-moe-a2.7b": (2048, 1408, 64, 4, 5632),
    "phi-3.5-moe": (4096, 6400, 16, 2, None),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("suffix", ["", "-4l"])
def test_model_configs_have_the_real_shapes(name, suffix):
    cfg = PretrainConfig.load(CONFIGS / f"{name}{suffix}.yaml")
    m = cfg.megatron
    hidden, ffn, experts, topk, shared = SHAPES[name]
    assert (m["hidden_size"], m["moe_ffn_hidden_size"], m["num_experts"], m["moe_router_topk"]) \
        == (hidden, ffn, experts, topk)
    assert m.get("moe_shared_expert_intermediate_size") == shared
    assert m["bf16"] is True and m["moe_token_dispatcher_type"] == "comet"
    if suffix == "-4l":
        assert m["num_layers"] == 4


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_passes_megatron_validation(path):
    """The generated command line is accepted by Megatron's own parser and validate_args."""
    from megatron.training.arguments import validate_args

    from comet_megatron import pretrain

    cfg = PretrainConfig.load(path)
    gpus = 0 if path.name == "tiny.yaml" else 8
    command, _ = cli.build_pretrain_command(cfg, gpus=gpus, check_world=False)
    argv = pretrain.default_argv(command[command.index("comet_megatron.pretrain") + 1:],
                                 cuda=gpus > 0)
    args = cli.megatron_parser().parse_args(argv)
    nproc = int(next(c for c in command if c.startswith("--nproc-per-node=")).split("=")[1])
    args.rank, args.world_size = 0, nproc * cfg.megatron.get("pipeline_model_parallel_size", 1)
    args._is_global_batch_size_explicitly_specified = True
    validate_args(args, {})
    assert args.moe_token_dispatcher_type == "comet"


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pretrain_tiny_end_to_end_on_cpu(tmp_path):
    """`comet-megatron pretrain --config configs/tiny.yaml --steps 3`: 2 gloo processes, EP=2; then the same with
    Megatron's distributed optimizer (`-- --use-distributed-optimizer`, as the shipped model configs train): the
    expert weights re-homed in its buffer are read in place (no copy warning) and the losses are the same."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    summaries = []
    for extra in ([], ["--", "--use-distributed-optimizer"]):
        proc = subprocess.run(
            [sys.executable, "-m", "comet_megatron.cli", "pretrain", "--config",
             str(CONFIGS / "tiny.yaml"), "--steps", "3", *extra],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("COMET_SUMMARY ")]
        assert len(lines) == 1, output[-6000:]
        summary = json.loads(lines[0][len("COMET_SUMMARY "):])
        assert summary["steps"] == 3
        assert math.isfinite(summary["final_loss"]) and 0 < summary["final_loss"] < 20
        assert summary["mean_tokens_per_s"] > 0
        assert [line for line in proc.stdout.splitlines() if line.startswith("step 3/3 loss")]
        assert "do not lie back to back" not in output  # no per-call weight copy
        if extra:
            assert re.search(r"use_distributed_optimizer \.+ True", output), output[-3000:]
        summaries.append(summary)
    plain, dist_opt = summaries
    assert math.isclose(dist_opt["final_loss"], plain["final_loss"], rel_tol=1e-5), (plain, dist_opt)


@pytest.mark.parametrize("argv,message", [
    (["--configs", "{}"], "must be a JSON list of objects"),
    (["--configs", "[{\"block_q\": 64}]"], "unknown knob(s) ['block_q']"),
    (["--world", "0"], "--world must be >= 1"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--shapes", "no-such-model"], "no config 'no-such-model'"),
    (["--shapes", "qwen2-moe-a2.7b", "--world", "7"], "do not split over --world 7"),
])
def test_bench_kernels_rejects_bad_input_before_touching_a_gpu(argv, message):
    from comet_megatron import bench_kernels

    with pytest.raises(SystemExit) as exc:
        bench_kernels.main(argv)
    assert message in str(exc.value)


def test_bench_kernels_accepts_knobs_of_kernel_config():
    from comet_megatron import bench_kernels

    assert bench_kernels.parse_configs('[{"combine_block_n": 256, "use_tma": false}, {}]') == [
        {"combine_block_n": 256, "use_tma": False}, {}]
    assert bench_kernels.parse_configs("[]") == [{}]
