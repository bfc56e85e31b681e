"""`comet-megatron bench layer`: time one MoE layer, comet against Megatron, on this GPU.

Variants (same weights, same random tokens, bf16):
    megatron            Megatron's alltoall dispatcher + SequentialMLP (a loop over experts): what a
                        user without Transformer Engine runs
    megatron+grouped    Megatron's alltoall dispatcher + comet's grouped-GEMM experts (cuBLAS
                        torch._grouped_mm): the strongest baseline available without Transformer Engine
                        (comet's expert module: its weight gradients take comet's kernels as the layer's do)
    comet-reference     the comet layer on its reference transport (collectives + grouped GEMM)
    comet-fused         the comet layer on its fused Triton kernels
and, where both comet variants ran, a "comet (auto)" row: a copy of the one `--comet-transport auto` runs at
EP size 1 on this GPU (what a user gets without choosing).
plus `experts-only` (the grouped expert GEMMs alone: T_compute) and the floor: the layer's FLOPs at the dense
bf16 GEMM rate measured in the same run, and with --ddp for forward+backward the larger of that and the fp32
`main_grad` read + write of every expert weight at the copy bandwidth measured in the same run (traffic no
implementation avoids under Megatron's DDP; it could overlap the GEMMs, hence the max).

Modes: `fwd`, `fwd+bwd`, and with --ddp `fwd+bwd:first`: forward+backward as the first micro-batch of a
training step runs it, DDP's `zero_grad_buffer()` (untimed) before every repetition, so the expert
`main_grad`s are zero and flagged so (`fwd+bwd` is a later micro-batch: they already hold a gradient). Comet's
experts then write the weight gradients instead of adding them (`experts.main_grads_zeroed`: half the
`main_grad` traffic); Megatron's DDP hook adds either way. Its floor counts the fp32 write only.

Timings: forward and forward+backward, median of CUDA-event timed repetitions after warm-up
(`triton.testing.do_bench`), in `--rounds` interleaved rounds: each round times every (variant, mode) of a
token count once, so that a drift of the machine (clocks, power, a host slowed by other work) reaches every
variant alike; the figure is the median over the rounds, `spread` their (max - min) / median. Output: a
table on stdout, JSON and a PNG plot in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ("mixtral-8x7b", "qwen2-moe-a2.7b", "phi-3.5-moe")
VARIANTS = ("megatron", "megatron+grouped", "comet-reference", "comet-fused", "experts-only")
FIRST = "fwd+bwd:first"  # forward+backward of a step's first micro-batch (gradients zeroed before, untimed)
MODES = ("fwd", "fwd+bwd", FIRST)


@dataclass
class Shape:
    name: str
    hidden: int
    ffn: int
    experts: int
    topk: int
    gated: bool = True

    def flops(self, tokens: int, backward: bool | str) -> float:
        """FLOPs of the expert GEMMs; `backward`: a mode name (fwd, fwd+bwd, fwd+bwd:first) or a bool."""
        if isinstance(backward, str):
            backward = backward != "fwd"
        f1 = 2 * self.ffn if self.gated else self.ffn
        fwd = 2.0 * tokens * self.topk * self.hidden * (f1 + self.ffn)
        return fwd * (3.0 if backward else 1.0)

    def main_grad_bytes(self) -> float:
        """Bytes of one fp32 read + write of every expert weight's `main_grad` (one backward under DDP)."""
        f1 = 2 * self.ffn if self.gated else self.ffn
        return 8.0 * self.experts * self.hidden * (f1 + self.ffn)


def load_shape(name: str) -> Shape:
    path = Path(name)
    if not path.exists():
        path = REPO / "configs" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
        raise SystemExit(f"bench: no config {name!r}; known: {', '.join(known)}")
    m = yaml.safe_load(path.read_text())["megatron"]
    return Shape(
        name=path.stem, hidden=m["hidden_size"], ffn=m["moe_ffn_hidden_size"],
        experts=m["num_experts"], topk=m["moe_router_topk"], gated=bool(m.get("swiglu", False)),
    )


@dataclass
class Record:
    shape: str
    tokens: int
    variant: str
    mode: str  # fwd | fwd+bwd | fwd+bwd:first
    ms: float
    tflops: float
    vs_grouped: float | None = None  # time of megatron+grouped / this time (>1: faster)
    vs_floor: float | None = None  # floor / this time (1.0 is the floor; see the module docstring)
    picks: str | None = None  # "comet (auto)" rows: the measured variant `--comet-transport auto` runs here
    rounds_ms: list[float] | None = None  # one figure per interleaved round (`ms` is their median)
    spread: float | None = None  # (max - min) / median of rounds_ms


def _init_distributed():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(create_gloo_process_groups=False)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)


def _transformer_config(shape: Shape, dispatcher: str):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=shape.hidden, num_attention_heads=8, ffn_hidden_size=shape.ffn,
        moe_ffn_hidden_size=shape.ffn, num_moe_experts=shape.experts, moe_router_topk=shape.topk,
        moe_token_dispatcher_type=dispatcher, gated_linear_unit=shape.gated,
        activation_func=F.silu if shape.gated else F.gelu, add_bias_linear=False,
        bf16=True, params_dtype=torch.bfloat16, moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, use_cpu_initialization=False, bias_activation_fusion=False,
    )


def build_variant_layers(shape: Shape, variants, make_config, comet_config, move):
    """{variant: layer} for the layer variants in `variants` (others are skipped), all with the
    weights of the first one built. `make_config(dispatcher)` gives the TransformerConfig,
    `comet_config(variant)` the CometConfig of a comet variant, `move(layer)` places it."""
    import functools

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    import comet_megatron
    from comet_megatron.experts import CometGroupedMLP

    spec = get_gpt_layer_local_spec(num_experts=shape.experts, moe_grouped_gemm=False)
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    layers, state = {}, None
    for v in variants:
        if v == "megatron":
            layer = spec.submodules.mlp(config=make_config("alltoall"))
        elif v == "megatron+grouped":
            layer = MoELayer(
                config=make_config("alltoall"),
                submodules=MoESubmodules(experts=functools.partial(CometGroupedMLP, submodules=linears)),
            )
        elif v in ("comet-reference", "comet-fused"):
            cfg = make_config("comet")
            cfg.comet = comet_config(v)
            comet_megatron.enable()
            layer = spec.submodules.mlp(config=cfg)
        else:
            continue
        layer = move(layer)
        if state is None:
            state = layer.state_dict()
        else:
            layer.load_state_dict(state)
        layers[v] = layer
    return layers


def build_layers(shape: Shape, variants, ddp: bool = False, distributed_optimizer: bool = False):
    """The single-GPU benchmark's layers. comet-fused runs over a one-rank ("emulated") workspace:
    at EP=1 `auto` would pick the reference path, there being nothing to overlap.

    With `ddp`, each layer is wrapped in Megatron's DistributedDataParallel as in a bf16 training run
    (fp32 `main_grad` buffers, gradients reduced in fp32, one grad-ready hook per parameter), so a
    backward pays what it pays in training: the gradient hand-off into `main_grad`. With
    `distributed_optimizer` (implies `ddp`), DDP lays the parameters out for Megatron's distributed optimizer
    (experts re-homed in descending order, fc1 and fc2 interleaved), as `--use-distributed-optimizer` does."""
    from comet_megatron.config import CometConfig

    layers = build_variant_layers(
        shape, variants, lambda dispatcher: _transformer_config(shape, dispatcher),
        lambda v: CometConfig(transport="nccl" if v == "comet-reference" else "emulated"),
        lambda layer: layer.cuda(),
    )
    if ddp or distributed_optimizer:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer)
        layers = {v: DistributedDataParallel(layer.config, cfg, layer) for v, layer in layers.items()}
    return layers


def unwrap(layer):
    """The MoE layer itself (under a DDP wrapper or not)."""
    return getattr(layer, "module", layer)


def _time(fn, warmup_ms=100, rep_ms=400) -> float:
    import triton.testing

    setup = getattr(fn, "setup", None)
    if setup is not None:
        return _time_with_setup(fn, setup, warmup_ms, rep_ms)
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _time_with_setup(fn, setup, warmup_ms=100, rep_ms=400) -> float:
    """Median ms of `fn` with `setup()` run untimed before every call: `triton.testing.do_bench`'s method
    (estimate, warm-up, L2 flushed before each timed call, one pair of CUDA events per call) plus the setup."""
    import torch

    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int, device="cuda")
    setup()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    est = []
    for _ in range(5):
        setup()
        cache.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est.append(start.elapsed_time(end))
    per_call = max(median(est), 1e-3)
    for _ in range(max(1, int(warmup_ms / per_call))):
        setup()
        fn()
    n = max(1, int(rep_ms / per_call))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        setup()
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return float(median(s.elapsed_time(e) for s, e in zip(starts, ends)))


def dense_gemm_tflops() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _time(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs() -> float:
    """Device memory bandwidth of a large fp32 copy (read + write), GB/s: the rate `main_grad` traffic can reach."""
    import torch

    n = 1 << 28  # 1 GiB each
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src))
    return 2 * 4 * n / (ms * 1e-3) / 1e9


REP_MS = 400  # timed repetitions per figure, split over the rounds


def time_interleaved(runs: dict, rounds: int, timer=None, advance=None) -> dict:
    """{key: [ms per round]}: `rounds` rounds, each timing every closure of `runs` once, in order (the first
    round with the full warm-up, later ones with a short one: the closures are warm by then)."""
    timer = timer or _time
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: at least one round")
    out: dict = {key: [] for key in runs}
    rep = max(REP_MS // rounds, 50)
    for r in range(rounds):
        for key, run in runs.items():
            out[key].append(timer(run, warmup_ms=100 if r == 0 else 25, rep_ms=rep))
            if advance is not None:
                advance()
    return out


def bench_shape(shape: Shape, tokens_list, variants, modes, progress=None, task=None, ddp=False,
                distributed_optimizer=False, rounds: int = 3):
    import torch

    layers = build_layers(shape, variants, ddp=ddp, distributed_optimizer=distributed_optimizer)
    records = []
    for tokens in tokens_list:
        x = torch.randn(tokens, 1, shape.hidden, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        runs = {(v, mode): _variant_run(v, layers, x, dy, mode) for v in variants for mode in modes}
        advance = (lambda: progress.advance(task)) if progress is not None else None
        for (v, mode), times in time_interleaved(runs, rounds, advance=advance).items():
            ms = median(times)
            tf = shape.flops(tokens, mode) / (ms * 1e-3) / 1e12
            records.append(Record(shape.name, tokens, v, mode, ms, tf, rounds_ms=times,
                                  spread=(max(times) - min(times)) / ms))
        del runs
        torch.cuda.empty_cache()
    del layers
    torch.cuda.empty_cache()
    return records


def _variant_run(v, layers, x, dy, mode):
    """The closure one figure times: the layer's forward (no grad), or forward + backward."""
    import torch

    if v == "experts-only":
        return _experts_run(layers, x, dy, mode)
    layer = layers[v]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                layer(x)
    else:
        xg = x.clone().requires_grad_(True)

        def run():
            y, _ = layer(xg)
            y.backward(dy)
    return _with_zeroed_grads(run, layer, mode)


def _with_zeroed_grads(run, wrapper, mode):
    """`run`, which in mode FIRST the timer calls after `wrapper.zero_grad_buffer()` (untimed: `run.setup`)."""
    if mode == FIRST:
        if not hasattr(wrapper, "zero_grad_buffer"):
            raise ValueError(f"mode {FIRST} needs the layers under Megatron's DDP (--ddp)")
        run.setup = wrapper.zero_grad_buffer
    return run


def experts_step(experts, counts, hidden: int, device, dtype, mode: str):
    """A closure running the grouped expert GEMMs alone (forward, or forward+backward) on random
    rows split as `counts` (T_compute): shared by the single-GPU and the EP benchmarks."""
    import torch

    rows = int(sum(counts))
    xs = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    probs = torch.rand(rows, device=device, dtype=torch.float32)
    dys = torch.randn(rows, hidden, device=device, dtype=dtype)
    tokens_per_expert = torch.tensor(list(counts))
    if mode == "fwd":
        def run():
            with torch.no_grad():
                experts(xs, tokens_per_expert, probs)
    else:
        def run():
            y, _ = experts(xs, tokens_per_expert, probs)
            y.backward(dys)
    return run


def _experts_run(layers, x, dy, mode):
    """The grouped expert GEMMs alone on this batch's routing (T_compute)."""
    import torch

    wrapper = next(l for k, l in layers.items() if k != "megatron")
    layer = unwrap(wrapper)
    with torch.no_grad():
        probs, routing_map = layer.router(x)
    counts = routing_map.sum(0).tolist()
    run = experts_step(layer.experts, counts, x.shape[-1], x.device, x.dtype,
                       "fwd" if mode == "fwd" else "fwd+bwd")
    return _with_zeroed_grads(run, wrapper, mode)


AUTO = "comet (auto)"


def add_auto(records):
    """Append, per (shape, tokens, mode) with both comet variants measured, a "comet (auto)" row: the
    measurement of the path `--comet-transport auto` runs at EP size 1 (the reference path,
    `transport.select.EP1_REASON`), what a user who leaves the flag alone gets. A copy of that row (`picks`
    names it), not another measurement."""
    by_key = {(r.shape, r.tokens, r.mode, r.variant): r for r in records}
    for (shape, tokens, mode, variant), r in list(by_key.items()):
        if variant != "comet-reference" or (shape, tokens, mode, "comet-fused") not in by_key:
            continue
        records.append(Record(shape, tokens, AUTO, mode, r.ms, r.tflops, picks=r.variant, rounds_ms=r.rounds_ms,
                              spread=r.spread))
    # each auto row right after its shape / tokens / mode group
    first = {}
    for i, r in enumerate(records):
        first.setdefault((r.shape, r.tokens, r.mode), i)
    records.sort(key=lambda r: (first[(r.shape, r.tokens, r.mode)], r.variant == AUTO))
    return records


def floor_ms(shape: Shape, tokens: int, mode: str, floor_tflops: float, copy_gbs: float | None) -> float:
    """The layer's floor (module docstring): GEMM FLOPs at the dense rate; with `copy_gbs` (under DDP) for
    forward+backward at least the main_grad traffic at that bandwidth (FIRST: its write alone)."""
    ms = shape.flops(tokens, mode) / (floor_tflops * 1e12) * 1e3
    if copy_gbs and mode != "fwd":
        # a later micro-batch reads and writes main_grad; the first may only write it (it was zero)
        traffic = shape.main_grad_bytes() / (2 if mode == FIRST else 1)
        ms = max(ms, traffic / (copy_gbs * 1e9) * 1e3)
    return ms


def add_ratios(records, floor_tflops, shapes, copy_gbs: float | None = None):
    by_key = {(r.shape, r.tokens, r.mode): r for r in records if r.variant == "megatron+grouped"}
    by_name = {s.name: s for s in shapes}
    for r in records:
        base = by_key.get((r.shape, r.tokens, r.mode))
        if base is not None:
            r.vs_grouped = base.ms / r.ms
        r.vs_floor = floor_ms(by_name[r.shape], r.tokens, r.mode, floor_tflops, copy_gbs) / r.ms


def print_table(records, meta):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in records:
            print(asdict(r))
        return
    ddp = ", under Megatron DDP" if meta.get("ddp") else ""
    if meta.get("distributed_optimizer"):
        ddp += " (distributed-optimizer layout)"
    rounds = meta.get("rounds", 1)
    table = Table(title=f"MoE layer, {meta['gpu']}, EP=1, bf16{ddp} (median ms of {rounds} interleaved "
                        f"round{'s' if rounds != 1 else ''}; x = vs megatron+grouped)")
    for col in ("shape", "tokens", "mode", "variant", "ms", "spread", "TFLOP/s", "x grouped", "of floor"):
        table.add_column(col, justify="right" if col not in ("shape", "mode", "variant") else "left")
    for r in records:
        variant = f"{r.variant} = {r.picks.removeprefix('comet-')}" if r.picks else r.variant
        table.add_row(
            r.shape, str(r.tokens), r.mode, variant, f"{r.ms:.3f}",
            f"{100 * r.spread:.0f}%" if r.spread is not None else "-", f"{r.tflops:.0f}",
            f"{r.vs_grouped:.2f}" if r.vs_grouped else "-", f"{r.vs_floor:.2f}" if r.vs_floor else "-",
        )
    Console(width=140).print(table)


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r.shape for r in records})
    modes = sorted({r.mode for r in records})
    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(5 * len(shapes), 3.6 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for v in VARIANTS:
                pts = sorted((r.tokens, r.tflops) for r in records
                             if r.shape == shape and r.mode == mode and r.variant == v)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=v)
            ax.set_title(f"{shape} {mode}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_timeline(shape: Shape, tokens: int, path) -> dict:
    """One traced forward of the fused layer; the timeline plot and its overlap summary."""
    import torch

    from comet_megatron import timeline
    from comet_megatron.config import CometConfig

    import comet_megatron

    cfg = _transformer_config(shape, "comet")
    cfg.comet = CometConfig(trace=True, transport="emulated")
    comet_megatron.enable()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer = get_gpt_layer_local_spec(num_experts=shape.experts).submodules.mlp(config=cfg).cuda()
    x = torch.randn(tokens, 1, shape.hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        layer(x)  # the second round is traced after compilation
    torch.cuda.synchronize()
    if layer._fused is None or layer._fused.last_trace is None:
        return {"error": f"no fused trace (transport {layer.transport})"}
    evts = timeline.events(*layer._fused.last_trace)
    timeline.plot(evts, path, title=f"{shape.name}, {tokens} tokens, fused forward (EP=1)")
    return timeline.summary(evts)


def _git_commit() -> str:
    if os.environ.get("COMET_COMMIT"):
        return os.environ["COMET_COMMIT"]  # set by callers whose copy of the tree has no .git
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="comet-megatron bench layer", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="config names in configs/ (or YAML paths) whose MoE shape to time")
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=MODES,
                        help=f"fwd, fwd+bwd (a later micro-batch), {FIRST} (with --ddp: a step's first "
                             "micro-batch, gradients zeroed before each repetition, untimed)")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    parser.add_argument("--timeline", action="store_true",
                        help="also trace one fused forward (first shape, first token count) and "
                             "draw timeline.png")
    parser.add_argument("--ddp", action="store_true",
                        help="wrap every layer in Megatron's DistributedDataParallel (fp32 main_grad, "
                             "per-parameter grad hooks) so that fwd+bwd includes the gradient hand-off "
                             "a training run pays")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="with --ddp: lay the parameters out as Megatron's distributed optimizer does "
                             "(--use-distributed-optimizer: expert weights re-homed in descending order)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds: each times every variant and mode of a token count once; "
                             "the figure is their median (the table's 'spread' column: (max - min) / median)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if args.distributed_optimizer and not args.ddp:
        parser.error("--distributed-optimizer needs --ddp (the layout is DDP's parameter buffer)")
    if FIRST in args.modes and not args.ddp:
        parser.error(f"--modes {FIRST} needs --ddp (the gradients it zeroes are DDP's main_grad buffers)")

    import torch

    if not torch.cuda.is_available():
        print("comet-megatron bench layer needs a CUDA GPU (timings on the CPU mean nothing).",
              file=sys.stderr)
        return 2

    _init_distributed()
    shapes = [load_shape(s) for s in args.shapes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "command": "comet-megatron bench layer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ddp": bool(args.ddp), "distributed_optimizer": bool(args.distributed_optimizer),
        "rounds": args.rounds,
    }
    meta["dense_bf16_tflops"] = dense_gemm_tflops()
    meta["copy_gbs"] = copy_bandwidth_gbs() if args.ddp else None
    records = []
    from rich.progress import Progress

    total = len(shapes) * len(args.tokens) * len(args.variants) * len(args.modes) * args.rounds
    with Progress(transient=not sys.stdout.isatty()) as progress:
        task = progress.add_task("timing", total=total)
        for shape in shapes:
            records += bench_shape(shape, args.tokens, args.variants, args.modes, progress, task, ddp=args.ddp,
                                   distributed_optimizer=args.distributed_optimizer, rounds=args.rounds)
    add_auto(records)
    add_ratios(records, meta["dense_bf16_tflops"], shapes, meta["copy_gbs"])
    if args.timeline:
        meta["timeline"] = draw_timeline(shapes[0], args.tokens[0], out / "timeline.png")
    (out / "bench.json").write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in records]},
                                               indent=1))
    plot(records, out / "bench.png")
    copy = f", fp32 copy {meta['copy_gbs']:.0f} GB/s (main_grad floor)" if meta.get("copy_gbs") else ""
    print(f"dense bf16 GEMM: {meta['dense_bf16_tflops']:.0f} TFLOP/s{copy} ({meta['gpu']})")
    print_table(records, meta)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
