"""CometConfig: validation errors name the flag, YAML and command-line round trips."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from comet_megatron.config import CometConfig, CometConfigError, add_arguments, flag_table


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"transport": "infiniband"}, "--comet-transport"),
        ({"tile_m": 48}, "--comet-tile-m"),
        ({"tile_n": 8}, "--comet-tile-n"),
        ({"tile_k": "big"}, "--comet-tile-k"),
        ({"wait_timeout_s": 0}, "--comet-wait-timeout-s"),
        ({"wait_timeout_s": "soon"}, "--comet-wait-timeout-s"),
        ({"comm_programs": 0}, "--comet-comm-programs"),
        ({"capacity": -1}, "--comet-capacity"),
        ({"overlap": "yes"}, "--comet-overlap"),
    ],
)
def test_invalid_value_names_the_flag(kwargs, flag):
    with pytest.raises(CometConfigError, match=flag):
        CometConfig(**kwargs)


def test_unknown_yaml_key_names_key_and_valid_keys():
    with pytest.raises(CometConfigError) as info:
        CometConfig.from_dict(yaml.safe_load("tile: 64\ntransport: nccl\n"))
    message = str(info.value)
    assert "tile" in message and "tile_m" in message and "transport" in message


def _non_default_configs():
    return [
        CometConfig(),
        CometConfig(transport="nccl", tile_m=64, tile_n=128, tile_k=32, comm_programs=20),
        CometConfig(overlap=False, grow_workspace=False, trace=True, deterministic=True,
                    capacity=4096, wait_timeout_s=12.5, tune_cache="/tmp/x/tune.json"),
        CometConfig(transport="emulated", tile_m="auto", capacity="auto"),
    ]


@pytest.mark.parametrize("cfg", _non_default_configs())
def test_yaml_round_trip(cfg):
    text = yaml.safe_dump({"comet": cfg.to_dict()})
    assert CometConfig.from_dict(yaml.safe_load(text)["comet"]) == cfg


@pytest.mark.parametrize("cfg", _non_default_configs())
def test_generated_flags_parse_back(cfg):
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(cfg.to_cli())
    assert CometConfig.from_args(args) == cfg


def test_every_field_has_a_flag_and_help():
    parser = add_arguments(argparse.ArgumentParser())
    options = {s for a in parser._actions for s in a.option_strings}
    rows = {row[0].split(" / ")[0]: row for row in flag_table()}
    for f in dataclasses.fields(CometConfig):
        flag = "--comet-" + f.name.replace("_", "-")
        assert flag in options
        assert flag in rows and rows[flag][2], f"{flag} has no help text"


def test_bad_flag_value_is_reported_by_from_args():
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--comet-tile-m", "48"])
    with pytest.raises(CometConfigError, match="--comet-tile-m"):
        CometConfig.from_args(args)
