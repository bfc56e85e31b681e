"""`CometConfig`: the single source of every comet-megatron knob.

The `--comet-*` command-line flags, the `comet:` section of a pretraining YAML and the Python API
are all generated from / parsed into this one dataclass; each field's metadata carries its flag
help text. Invalid values raise `CometConfigError` naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping, Union, get_args

TRANSPORTS = ("auto", "nccl", "symm_mem", "cuda_ipc", "emulated")
Transport = Literal["auto", "nccl", "symm_mem", "cuda_ipc", "emulated"]
AutoInt = Union[int, Literal["auto"]]

DEFAULT_TUNE_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "comet-megatron", "tune.json"
)


class CometConfigError(ValueError):
    """A comet-megatron option is invalid or incompatible with the rest of the launch."""


def _knob(default: Any, help: str, **extra: Any):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class CometConfig:
    """Every option of the comet dispatcher and expert layer.

    Field `x_y` is the flag `--comet-x-y` and the YAML key `comet: {x_y: ...}`.
    """

    overlap: bool = _knob(
        True,
        "Use the fused fine-grained overlapped kernels (dispatch+GEMM0, GEMM1+combine). "
        "Off: the reference path (torch.distributed collectives + grouped GEMM).",
    )
    transport: Transport = _knob(
        "auto",
        "How ranks exchange tokens. auto: symm_mem when EP > 1 and every EP peer is reachable "
        "over NVLink (cuda_ipc when ranks share a GPU), else the nccl reference collectives "
        "(logged). At EP size 1 (nothing to overlap) auto runs the reference path (measured as "
        "fast as or faster than the fused kernels there; emulated forces them). nccl: torch.distributed "
        "collectives (any backend, also gloo). symm_mem: torch symmetric memory, one process "
        "per GPU. cuda_ipc: processes sharing buffers through CUDA IPC (several ranks on one "
        "GPU). emulated: N virtual ranks inside one process (tests, benchmarks).",
        choices=TRANSPORTS,
    )
    comm_programs: AutoInt = _knob(
        "auto",
        "Programs (thread blocks) of each fused kernel dedicated to communication; the rest "
        "compute. auto: the tuner's cached choice for this shape and GPU.",
    )
    tile_m: AutoInt = _knob("auto", "GEMM tile rows (tokens). auto: tuned. Powers of two >= 16.")
    tile_n: AutoInt = _knob("auto", "GEMM tile columns. auto: tuned. Powers of two >= 16.")
    tile_k: AutoInt = _knob("auto", "GEMM tile depth. auto: tuned. Powers of two >= 16.")
    capacity: AutoInt = _knob(
        "auto",
        "Workspace capacity: the most tokens per rank one MoE call may carry (before top-k "
        "expansion). auto: sized from the first batch. See --comet-grow-workspace. A number with "
        "--no-comet-grow-workspace fixes the size: EP ranks agree on it once instead of on every call "
        "(a host sync per MoE layer call at EP > 1).",
    )
    grow_workspace: bool = _knob(
        True,
        "When a batch exceeds the workspace capacity, grow the workspace (a collective "
        "re-allocation) instead of raising an error that names the size needed.",
    )
    wait_timeout_s: float = _knob(
        60.0,
        "Seconds a kernel waits for a peer's signal before it gives up and the host raises "
        "an error naming the rank, layer and phase. Must be > 0.",
    )
    trace: bool = _knob(
        False,
        "Record per-tile start/end and per-chunk arrival timestamps for the timeline plot.",
    )
    deterministic: bool = _knob(
        False,
        "Bitwise run-to-run identical results: fixed reduction order for the top-k sum. On a GPU "
        "both paths already sum in a fixed order (the reference path's Triton per-token sum, the "
        "fused combine); this also fixes it where the reference path would use index_add.",
    )
    pre_reduce: bool = _knob(
        False,
        "Fused path: rows of one token whose top-k experts share a rank are summed there and sent "
        "once (less combine traffic at EP > 1; slower in single-GPU emulation, not yet measured on multi-GPU).",
    )
    tune_cache: str = _knob(
        DEFAULT_TUNE_CACHE, "Path of the tuner's cache file (JSON), keyed by shape and GPU."
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field on its own; raise `CometConfigError` naming the flag and the fix."""
        if self.transport not in TRANSPORTS:
            raise CometConfigError(
                f"--comet-transport={self.transport!r} is not one of {', '.join(TRANSPORTS)}."
            )
        if not isinstance(self.overlap, bool):
            raise CometConfigError(f"--comet-overlap must be true or false, got {self.overlap!r}.")
        for name in ("comm_programs", "tile_m", "tile_n", "tile_k", "capacity"):
            value = getattr(self, name)
            value = _parse_auto_int(value, name)
            setattr(self, name, value)
            if value == "auto":
                continue
            if name == "comm_programs" and value < 1:
                raise CometConfigError(
                    f"{flag_name(name)}={value}: needs at least 1 communication program "
                    "(or 'auto'); to turn overlap off use --no-comet-overlap."
                )
            if name.startswith("tile_") and (value < 16 or value & (value - 1)):
                raise CometConfigError(
                    f"{flag_name(name)}={value}: tile sizes must be powers of two >= 16 "
                    "(16, 32, 64, 128, 256) or 'auto'."
                )
            if name == "capacity" and value < 1:
                raise CometConfigError(
                    f"{flag_name(name)}={value}: capacity is a token count >= 1, or 'auto'."
                )
        try:
            self.wait_timeout_s = float(self.wait_timeout_s)
        except (TypeError, ValueError):
            raise CometConfigError(
                f"--comet-wait-timeout-s={self.wait_timeout_s!r} is not a number of seconds."
            ) from None
        if not self.wait_timeout_s > 0:
            raise CometConfigError(
                f"--comet-wait-timeout-s={self.wait_timeout_s}: must be > 0 (a bounded wait); "
                "use a large value such as 600 for slow debugging sessions."
            )
        for name in ("grow_workspace", "trace", "deterministic", "pre_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise CometConfigError(
                    f"{flag_name(name)} must be true or false, got {getattr(self, name)!r}."
                )
        if not isinstance(self.tune_cache, str) or not self.tune_cache:
            raise CometConfigError("--comet-tune-cache must be a file path.")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CometConfig":
        """Build from a `comet:` YAML section; unknown keys are an error naming the valid ones."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CometConfigError(
                f"unknown key(s) in the comet: section: {', '.join(unknown)}. "
                f"Valid keys: {', '.join(sorted(known))}."
            )
        return cls(**data)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CometConfig":
        """Build from an argparse namespace that went through `add_arguments`."""
        values = {}
        for f in fields(cls):
            dest = "comet_" + f.name
            if hasattr(args, dest):
                values[f.name] = getattr(args, dest)
        return cls(**values)

    def to_cli(self) -> list[str]:
        """The `--comet-*` flags that reproduce this config (only non-defaults)."""
        out: list[str] = []
        default = CometConfig()
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if isinstance(value, bool):
                out.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
            else:
                out += [flag_name(f.name), str(value)]
        return out


def flag_name(field_name: str) -> str:
    return "--comet-" + field_name.replace("_", "-")


def _parse_auto_int(value: Any, name: str) -> AutoInt:
    if value == "auto" or value is None:
        return "auto"
    if isinstance(value, bool):
        raise CometConfigError(f"{flag_name(name)}={value!r}: expected an integer or 'auto'.")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CometConfigError(
            f"{flag_name(name)}={value!r}: expected an integer or 'auto'."
        ) from None


def _field_type_kind(f: dataclasses.Field) -> str:
    if f.type in ("bool", bool):
        return "bool"
    if f.type in ("float", float):
        return "float"
    if f.type in ("str", str):
        return "str"
    if f.type in ("AutoInt", AutoInt):
        return "autoint"
    return "choice"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every `--comet-*` flag (generated from `CometConfig`) to `parser`.

    Usable as (part of) Megatron's `extra_args_provider`. Validation happens when the namespace
    is turned into a `CometConfig` (`CometConfig.from_args`), so errors name the flag.
    """
    group = parser.add_argument_group("comet-megatron", "Fine-grained overlapped MoE (Comet)")
    default = CometConfig()
    for f in fields(CometConfig):
        name = flag_name(f.name)
        kind = _field_type_kind(f)
        help_text = f.metadata.get("help", "")
        dv = getattr(default, f.name)
        kwargs: dict[str, Any] = {"dest": "comet_" + f.name, "default": dv}
        if kind == "bool":
            group.add_argument(
                name, action=argparse.BooleanOptionalAction, help=help_text, **kwargs
            )
        elif kind == "choice":
            group.add_argument(
                name, choices=f.metadata.get("choices"), help=help_text + f" Default: {dv}.",
                **kwargs,
            )
        elif kind == "float":
            group.add_argument(name, type=float, help=help_text + f" Default: {dv}.", **kwargs)
        else:
            group.add_argument(name, type=str, help=help_text + f" Default: {dv}.", **kwargs)
    return parser


def flag_table() -> list[tuple[str, str, str]]:
    """(flag, default, help) for every knob: the README's flag table is generated from this."""
    rows = []
    default = CometConfig()
    for f in fields(CometConfig):
        dv = getattr(default, f.name)
        if f.name == "tune_cache":
            dv = "~/.cache/comet-megatron/tune.json"
        name = flag_name(f.name)
        if _field_type_kind(f) == "bool":
            name = f"{name} / --no-{name[2:]}"
        rows.append((name, str(dv), f.metadata.get("help", "")))
    return rows


assert set(get_args(Transport)) == set(TRANSPORTS)
