"""`comet-megatron`: the command line.

    comet-megatron pretrain --config configs/tiny.yaml [--steps N] [--nproc N] [-- MEGATRON ARGS]
    comet-megatron flags [--markdown]
    comet-megatron bench layer [OPTIONS]      (comet_megatron.bench; needs a GPU)
    comet-megatron bench kernels [OPTIONS]    (comet_megatron.bench_kernels; each kernel vs cuBLAS)
    comet-megatron tune --config configs/<name>.yaml [--tokens N ...]   (comet_megatron.tune)
    comet-megatron bench ep [OPTIONS]         (comet_megatron.bench_ep; torchrun, one process per GPU)

`pretrain` reads a YAML with three sections and launches `comet_megatron.pretrain` with torchrun:

    megatron:   # Megatron argument names (without --, '_' or '-') -> values
      num_layers: 2
      bf16: true            # a switch: true -> flag present, false -> absent
    comet:      # CometConfig fields (the --comet-* flags), see `comet-megatron flags`
      transport: auto
    launch:
      nproc_per_node: auto  # auto: one process per GPU; 2 CPU processes without a GPU
      backend: auto         # auto: nccl on GPUs, gloo on CPU

Every error names the offending key and how to fix it. Subcommands are a table (`SUBCOMMANDS`).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from comet_megatron.config import CometConfig, CometConfigError, flag_table

SECTIONS = ("megatron", "comet", "launch")
LAUNCH_KEYS = ("nproc_per_node", "backend")
BACKENDS = ("auto", "nccl", "gloo")
CPU_NPROC = 2  # without a GPU: two gloo processes, so expert parallelism (EP=2) is exercised


class ConfigError(ValueError):
    """The pretraining YAML (or a command-line override) is invalid; the message names the key."""


# ---------------------------------------------------------------- YAML -> launch
@dataclass
class LaunchConfig:
    nproc_per_node: int | str = "auto"
    backend: str = "auto"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str) -> "LaunchConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - set(LAUNCH_KEYS))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) in launch: {', '.join(unknown)}. "
                f"Valid keys: {', '.join(LAUNCH_KEYS)}."
            )
        cfg = cls(**data)
        if cfg.nproc_per_node != "auto":
            if isinstance(cfg.nproc_per_node, bool) or not isinstance(cfg.nproc_per_node, int) \
                    or cfg.nproc_per_node < 1:
                raise ConfigError(
                    f"{source}: launch.nproc_per_node={cfg.nproc_per_node!r}: expected a process "
                    "count >= 1 or 'auto' (one per GPU; 2 on a CPU-only machine)."
                )
        if cfg.backend not in BACKENDS:
            raise ConfigError(
                f"{source}: launch.backend={cfg.backend!r}: expected one of {', '.join(BACKENDS)} "
                "(auto: nccl on GPUs, gloo on CPU)."
            )
        return cfg


@dataclass
class PretrainConfig:
    """A parsed pretraining YAML."""

    megatron: dict[str, Any] = field(default_factory=dict)
    comet: CometConfig = field(default_factory=CometConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "PretrainConfig":
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: the top level must be a mapping with sections "
                f"{', '.join(SECTIONS)}; got {type(data).__name__}."
            )
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(
                f"{source}: unknown top-level key(s): {', '.join(map(str, unknown))}. "
                f"Valid sections: {', '.join(SECTIONS)} (Megatron arguments go under megatron:)."
            )
        for section in SECTIONS:
            if data.get(section) is not None and not isinstance(data[section], Mapping):
                raise ConfigError(f"{source}: section {section}: must be a mapping of key: value.")
        megatron = {str(k).replace("-", "_"): v for k, v in (data.get("megatron") or {}).items()}
        try:
            comet = CometConfig.from_dict(data.get("comet"))
        except TypeError as exc:  # pragma: no cover - from_dict already checks names
            raise ConfigError(f"{source}: comet: {exc}") from None
        except CometConfigError as exc:
            raise ConfigError(f"{source}: comet: {exc}") from None
        launch = LaunchConfig.from_dict(data.get("launch"), source)
        return cls(megatron=megatron, comet=comet, launch=launch, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PretrainConfig":
        path = Path(path)
        if not path.is_file():
            hint = ""
            configs = _configs_dir()
            if configs is not None:
                names = sorted(p.name for p in configs.glob("*.yaml"))
                hint = f" Available in {configs}: {', '.join(names)}."
            raise ConfigError(f"config file not found: {path}.{hint}")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "megatron": dict(self.megatron),
            "comet": self.comet.to_dict(),
            "launch": {"nproc_per_node": self.launch.nproc_per_node,
                       "backend": self.launch.backend},
        }


def _configs_dir() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / "configs").is_dir():
            return base / "configs"
    return None


@functools.lru_cache(maxsize=1)
def megatron_parser() -> argparse.ArgumentParser:
    """Megatron's full argument parser plus the comet flags (what the launched job parses)."""
    from megatron.training.arguments import add_megatron_arguments

    from comet_megatron.integration import extra_args_provider

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    return extra_args_provider(parser)


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.Action]]:
    """YAML key (flag without '--', '-' -> '_') -> (flag, action)."""
    out = {}
    for action in parser._actions:  # argparse has no public accessor for the option table
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = (opt, action)
    return out


def megatron_flags(values: Mapping[str, Any], source: str = "<dict>",
                   parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Turn the `megatron:` section into command-line flags, validating each key and value."""
    parser = parser or megatron_parser()
    table = _option_actions(parser)
    argv: list[str] = []
    for key, value in values.items():
        if key.startswith("comet_"):
            raise ConfigError(
                f"{source}: megatron.{key}: comet options go in the comet: section "
                f"(as {key[len('comet_'):]}: ...)."
            )
        if key not in table:
            close = difflib.get_close_matches(key, table.keys(), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{source}: megatron.{key}: not a Megatron argument (--{key.replace('_', '-')})."
                f"{hint}"
            )
        flag, action = table[key]
        argv += _flag_values(flag, action, value, f"{source}: megatron.{key}")
    return argv


def _flag_values(flag: str, action: argparse.Action, value: Any, where: str) -> list[str]:
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: a switch, expected true or false.")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag] if value == (not flag.startswith("--no-")) else [_negate(flag)]
        return [flag] if value else []
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if action.nargs not in ("+", "*") and not isinstance(action.nargs, int) and len(items) != 1:
        raise ConfigError(f"{where}={value!r}: takes a single value, not a list.")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise ConfigError(f"{where}={value!r}: takes exactly {action.nargs} values.")
    out = []
    for item in items:
        text = _to_text(item)
        converted: Any = text
        if callable(action.type):
            try:
                converted = action.type(text)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                kind = getattr(action.type, "__name__", "value")
                raise ConfigError(f"{where}={item!r}: invalid {kind} ({exc}).") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(
                f"{where}={item!r}: expected one of {', '.join(map(str, action.choices))}."
            )
        out.append(text)
    return [flag, *out]


def _negate(flag: str) -> str:
    return "--" + flag[len("--no-"):] if flag.startswith("--no-") else "--no-" + flag[2:]


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------- launching
def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def build_pretrain_command(cfg: PretrainConfig, steps: int | None = None,
                           nproc: int | None = None, extra: Sequence[str] = (),
                           gpus: int | None = None,
                           check_world: bool = True) -> tuple[list[str], dict[str, str]]:
    """(torchrun command, extra environment) that runs `comet_megatron.pretrain` for `cfg`.

    `check_world=False` skips checking that the parallel sizes fit this host's processes (for
    printing the arguments of a job that spans several hosts)."""
    gpus = _cuda_device_count() if gpus is None else gpus
    megatron = dict(cfg.megatron)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps={steps}: must be >= 1.")
        megatron["train_iters"] = steps
    backend = cfg.launch.backend
    if backend == "auto":
        backend = "nccl" if gpus > 0 else "gloo"
    if backend == "nccl" and gpus == 0:
        raise ConfigError(
            f"{cfg.source}: launch.backend=nccl needs CUDA GPUs and none is visible; "
            "use backend: auto (gloo on CPU) or gloo."
        )
    if nproc is None:
        nproc = cfg.launch.nproc_per_node if cfg.launch.nproc_per_node != "auto" else (
            gpus if gpus > 0 else CPU_NPROC)
    if nproc < 1:
        raise ConfigError(f"--nproc={nproc}: must be >= 1.")
    if backend == "nccl" and nproc > gpus:
        raise ConfigError(
            f"{cfg.source}: {nproc} processes with NCCL but only {gpus} GPU(s) visible: "
            "NCCL needs one GPU per process. Lower --nproc / launch.nproc_per_node."
        )
    if check_world:
        check_world_size({**megatron, **_parallel_sizes_in(extra)}, nproc, cfg.source, gpus)
    megatron["distributed_backend"] = backend
    argv = megatron_flags(megatron, cfg.source) + cfg.comet.to_cli() + list(extra)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "comet_megatron.pretrain", *argv]
    env = {}
    if gpus == 0 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return command, env


PARALLEL_SIZES = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "context_parallel_size", "expert_model_parallel_size",
                  "expert_tensor_parallel_size")


def _parallel_sizes_in(argv: Sequence[str]) -> dict[str, int]:
    """Parallel sizes given explicitly in extra Megatron arguments (the last one wins)."""
    found: dict[str, int] = {}
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else ""
        if key in PARALLEL_SIZES:
            if not value and i + 1 < len(argv):
                value = argv[i + 1]
            try:
                found[key] = int(value)
            except ValueError:
                pass  # Megatron's own parser reports it
    return found


def check_world_size(megatron: Mapping[str, Any], nproc: int, source: str, gpus: int) -> None:
    """The parallel sizes must tile the single-host world of `nproc` processes (as Megatron checks),
    reported here with the keys to change instead of after every process has started."""
    def size(key: str, default: int = 1) -> int:
        value = megatron.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else default

    tp, pp = size("tensor_model_parallel_size"), size("pipeline_model_parallel_size")
    cp, ep = size("context_parallel_size"), size("expert_model_parallel_size")
    etp = size("expert_tensor_parallel_size", tp)
    dense, expert = tp * pp * cp, etp * ep * pp
    if nproc % dense == 0 and nproc % expert == 0:
        return
    need = dense * expert // math.gcd(dense, expert)
    where = f"{gpus} GPU(s) visible" if gpus else "no GPU visible: CPU processes"
    raise ConfigError(
        f"{source}: {nproc} processes ({where}) cannot hold tensor_model_parallel_size={tp} x "
        f"pipeline_model_parallel_size={pp} x context_parallel_size={cp} and "
        f"expert_model_parallel_size={ep} x expert_tensor_parallel_size={etp} x pipeline stages: "
        f"the process count must be a multiple of {need}. Set --nproc / launch.nproc_per_node, or "
        "lower those sizes (after --, e.g. -- --expert-model-parallel-size 1). Jobs larger than "
        "one host: launch examples/pretrain_gpt_comet.py with torchrun on every host (README)."
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = PretrainConfig.load(args.config)
    command, env = build_pretrain_command(cfg, steps=args.steps, nproc=args.nproc,
                                          extra=args.megatron_args, check_world=not args.dry_run)
    printable = " ".join(shlex.quote(c) for c in command)
    if args.dry_run:
        print(printable)
        return 0
    print(f"comet-megatron: launching {printable}", file=sys.stderr, flush=True)
    return subprocess.call(command, env={**os.environ, **env})


def cmd_flags(args: argparse.Namespace) -> int:
    rows = flag_table()
    if args.markdown:
        print(markdown_flag_table(rows))
        return 0
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(title="comet-megatron flags (YAML: comet: {field: value})")
            for col in ("flag", "default", "what it does"):
                table.add_column(col)
            for row in rows:
                table.add_row(*row)
            Console().print(table)
            return 0
    for flag, default, text in rows:
        print(f"{flag}  (default: {default})\n    {text}")
    return 0


def markdown_flag_table(rows: Sequence[tuple[str, str, str]] | None = None) -> str:
    """The README's flag table (Markdown), generated from `flag_table()`."""
    rows = flag_table() if rows is None else rows
    lines = ["| flag | default | what it does |", "| --- | --- | --- |"]
    for flag, default, text in rows:
        text = text.replace("|", "\\|")
        lines.append(f"| `{flag}` | `{default}` | {text} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- parser
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="run the GPT MoE pretraining job from a YAML config (torchrun)",
        description="Launch comet_megatron.pretrain with torchrun from a YAML config. "
        "Megatron arguments after `--` are passed through and win over the YAML.",
    )
    p.add_argument("--config", required=True, help="pretraining YAML (see configs/)")
    p.add_argument("--steps", type=int, default=None, help="override megatron.train_iters")
    p.add_argument("--nproc", type=int, default=None, help="override launch.nproc_per_node")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command, do not run it (also for jobs larger than this host)")
    p.add_argument("megatron_args", nargs=argparse.REMAINDER,
                   help="extra Megatron arguments after --")
    p.set_defaults(func=cmd_pretrain)


def _add_flags(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flags", help="print every --comet-* flag with its default and help")
    p.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    p.set_defaults(func=cmd_flags)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks on a GPU: `bench layer` times one MoE layer, comet vs Megatron",
        description="`comet-megatron bench layer --help` lists the layer benchmark's options.",
    )
    p.add_argument("target", choices=["layer", "kernels", "ep"],
                   help="what to time (kernels: each fused kernel against cuBLAS at world size 1; "
                        "ep: one MoE layer under expert parallelism, torchrun)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "ep":
        from comet_megatron import bench_ep

        return bench_ep.cli_main(args.bench_args)
    if args.target == "kernels":
        from comet_megatron import bench_kernels

        return bench_kernels.main(args.bench_args)
    from comet_megatron import bench

    return bench.main(args.bench_args)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from comet_megatron import tune

    p = sub.add_parser(
        "tune", help="tune the fused kernels' tiles and comm programs for a config's MoE shape (GPU)",
        description="Time candidate kernel configs for the MoE shape of a YAML's megatron: section and "
        "cache the fastest; layers with --comet-tile-*/--comet-comm-programs auto use it "
        "(docs/TUNING.md).",
    )
    tune.add_arguments(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from comet_megatron import tune

    return tune.main(args)


# name -> function adding the subparser
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "pretrain": _add_pretrain,
    "flags": _add_flags,
    "bench": _add_bench,
    "tune": _add_tune,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comet-megatron",
        description="Fine-grained overlapped MoE all-to-all + expert GEMMs for Megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    extra = getattr(args, "megatron_args", None)
    if extra and extra[0] == "--":
        args.megatron_args = extra[1:]
    try:
        return args.func(args)
    except (ConfigError, CometConfigError) as exc:
        print(f"comet-megatron {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
