"""`comet-megatron bench ep`: one MoE layer under expert parallelism (EP = world size), comet against
Megatron, on every GPU of one host.

Launch one process per GPU (NCCL):

    torchrun --nproc-per-node 8 -m comet_megatron.bench_ep --out ep-out
    comet-megatron bench ep --out ep-out          (launches torchrun with one process per GPU)

Timed per shape (configs/<name>.yaml) and tokens per rank, forward and forward+backward:
    megatron              Megatron's alltoall dispatcher + SequentialMLP (loop over local experts)
    megatron+grouped      Megatron's alltoall dispatcher + comet's grouped-GEMM experts (cuBLAS)
    megatron+ep-overlap   Megatron's `overlap_moe_expert_parallel_comm`: not timed at layer level,
                          recorded with the reason (see EP_OVERLAP_NOTE)
    comet-fused           the comet layer on its fused kernels (--comet-transport, default auto:
                          symm_mem over NVLink)
    comet-reference       (optional, --variants) the comet layer on the nccl reference transport
and, on the same routing, in the same run:
    experts-only          T_compute: this rank's grouped expert GEMMs alone (no communication)
    a2a-only              T_comm: the dispatch + combine all_to_all_single calls alone, with the
                          split sizes of that routing (forward: 2, forward+backward: 4 calls)

Timing: per repetition `synchronize + barrier`, then CUDA events around the region; the median
over repetitions after warm-up on each rank, and the maximum of those medians over ranks.
Derived per shape/tokens/mode: the speedup of comet-fused over each baseline, the share of
communication hidden (T_compute + T_comm - T_layer) / T_comm and T_layer / max(T_compute, T_comm).
Rank 0 writes ep.json and ep.png to --out and prints a table.

`--cpu-smoke` (gloo, CPU, tiny shape, host timers, Triton interpreter for the fused path through
the cuda_ipc transport) only tests this script's plumbing: its numbers mean nothing.

`python -m comet_megatron.bench_ep e2e --config configs/qwen2-moe-a2.7b-4l.yaml --steps 20 --out D`
(no torchrun) runs `comet-megatron pretrain` once per dispatcher (comet, alltoall, alltoall with
Megatron's EP overlap) and writes e2e.json (tokens/s, loss curves, speedups) and e2e_loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ("mixtral-8x7b", "qwen2-moe-a2.7b", "phi-3.5-moe")
DEFAULT_TOKENS = (2048, 4096, 8192, 16384)
LAYER_VARIANTS = ("megatron", "megatron+grouped", "megatron+ep-overlap", "comet-fused", "comet-reference")
DEFAULT_VARIANTS = ("megatron", "megatron+grouped", "megatron+ep-overlap", "comet-fused")
BASELINES = ("megatron", "megatron+grouped")
COMET = "comet-fused"
COMPUTE, COMM = "experts-only", "a2a-only"
MODES = ("fwd", "fwd+bwd")

EP_OVERLAP_NOTE = (
    "not timed at layer level: Megatron's overlap_moe_expert_parallel_comm hides micro-batch i's "
    "dispatch/combine behind micro-batch i-1's backward inside the combined-1F1B schedule "
    "(forward_backward_no_pipelining over a GPTModel schedule plan, >= 2 micro-batches); one layer's "
    "forward or forward+backward of one micro-batch has nothing to overlap with. Compared end to end "
    "instead (bench_ep e2e, run alltoall+ep-overlap)."
)
EP_OVERLAP_NEEDS_EP = "not applicable: overlap_moe_expert_parallel_comm needs expert parallelism (EP > 1)"

# fields of every summary row (the test checks them)
SUMMARY_FIELDS = (
    "shape", "tokens", "mode", "ep", "t_compute_ms", "t_comm_ms", "bound_ms", "ms",
    "speedup_comet_vs", "hidden_share", "vs_bound", "notes",
)
RECORD_FIELDS = ("shape", "tokens", "mode", "variant", "ms", "ms_per_rank", "ms_wall", "status", "note")
META_FIELDS = ("smoke", "complete", "timer", "world_size", "ep", "device", "backend", "torch", "triton",
               "commit", "date", "command", "warmup", "reps", "comet_transport")


# ---------------------------------------------------------------- ratios (pure arithmetic)
def _ok(*values) -> bool:
    return all(v is not None and isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def speedup(t_baseline: float | None, t_comet: float | None) -> float | None:
    """How many times faster comet is than the baseline (>1: comet faster)."""
    if not _ok(t_baseline, t_comet) or t_comet <= 0:
        return None
    return t_baseline / t_comet


def hidden_share(t_compute: float | None, t_comm: float | None, t_layer: float | None) -> float | None:
    """Share of the communication time hidden behind compute: (T_compute + T_comm - T_layer) / T_comm.

    1.0: all of it hidden (T_layer == T_compute); 0.0: none (T_layer == T_compute + T_comm);
    negative: the layer costs more than compute and communication run back to back."""
    if not _ok(t_compute, t_comm, t_layer) or t_comm <= 0:
        return None
    return (t_compute + t_comm - t_layer) / t_comm


def vs_bound(t_layer: float | None, t_compute: float | None, t_comm: float | None) -> float | None:
    """T_layer / max(T_compute, T_comm): 1.0 is the overlap limit."""
    if not _ok(t_layer, t_compute, t_comm):
        return None
    bound = max(t_compute, t_comm)
    return t_layer / bound if bound > 0 else None


def summarize(records: Sequence[dict], ep: int) -> list[dict]:
    """One row per (shape, tokens, mode) with every derived ratio (see SUMMARY_FIELDS)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["shape"], r["tokens"], r["mode"]), {})[r["variant"]] = r
    rows = []
    for (shape, tokens, mode), by_var in groups.items():
        def ms(v):
            rec = by_var.get(v)
            return rec["ms"] if rec is not None and rec["status"] == "ok" else None

        t_compute, t_comm = ms(COMPUTE), ms(COMM)
        layer_vars = [v for v in by_var if v not in (COMPUTE, COMM)]
        rows.append({
            "shape": shape, "tokens": tokens, "mode": mode, "ep": ep,
            "t_compute_ms": t_compute, "t_comm_ms": t_comm,
            "bound_ms": max(t_compute, t_comm) if _ok(t_compute, t_comm) else None,
            "ms": {v: ms(v) for v in layer_vars},
            "speedup_comet_vs": {b: speedup(ms(b), ms(COMET)) for b in BASELINES if b in by_var},
            "hidden_share": {v: hidden_share(t_compute, t_comm, ms(v)) for v in layer_vars},
            "vs_bound": {v: vs_bound(ms(v), t_compute, t_comm) for v in layer_vars},
            "notes": {v: by_var[v]["note"] for v in by_var if by_var[v].get("note")},
        })
    return rows


# ---------------------------------------------------------------- shapes
def smoke_shape():
    from comet_megatron.bench import Shape

    return Shape(name="smoke-tiny", hidden=32, ffn=48, experts=4, topk=2, gated=True)


# ---------------------------------------------------------------- distributed setup
class Env:
    """Process group, device and timer settings of this run."""

    def __init__(self, smoke: bool, warmup: int, reps: int):
        import torch
        import torch.distributed as dist

        self.smoke = smoke
        self.warmup, self.reps = warmup, reps
        if smoke:
            from comet_megatron.patches import cpu

            cpu.apply()
            torch.set_num_threads(1)
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29541")):
            os.environ.setdefault(key, value)
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.cuda = not smoke
        if self.cuda:
            if not torch.cuda.is_available():
                raise SystemExit("comet-megatron bench ep needs CUDA GPUs (or --cpu-smoke to test "
                                 "the script's plumbing on the CPU).")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.backend = "nccl" if self.cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(self.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(expert_model_parallel_size=self.world,
                                         create_gloo_process_groups=False)
        self.ep_group = ps.get_expert_model_parallel_group()
        if self.cuda:
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    # -- timing
    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self):
        import torch.distributed as dist

        if self.cuda:
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def time(self, fn) -> tuple[float, float]:
        """(median ms of `fn` on this rank, median host wall ms to a device-wide sync).

        Ranks start each repetition together (synchronize + barrier). On GPUs the first is timed by
        CUDA events on the current stream; the second (a cross-check that work left on side streams
        is counted) by the host clock up to `torch.cuda.synchronize()`."""
        import torch

        for _ in range(self.warmup):
            fn()
        self.sync()
        times, walls = [], []
        for _ in range(self.reps):
            self.sync()
            self.barrier()
            t0 = time.perf_counter()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - t0) * 1e3)
                times.append(start.elapsed_time(end))
            else:
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                walls.append(times[-1])
        self.sync()
        self.barrier()
        return float(statistics.median(times)), float(statistics.median(walls))

    def past(self, deadline: float | None) -> bool:
        """Whether any rank is past `deadline` (time.time()); a collective: all ranks call it."""
        if deadline is None:
            return False
        return max(self.gather(1.0 if time.time() > deadline else 0.0)) > 0

    def gather(self, value: float) -> list[float]:
        """`value` of every rank (NaN stands for a failed measurement)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [float(o.item()) for o in out]


# ---------------------------------------------------------------- layers
def transformer_config(shape, dispatcher: str, env: Env, **extra):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=shape.hidden, num_attention_heads=8, ffn_hidden_size=shape.ffn,
        moe_ffn_hidden_size=shape.ffn, num_moe_experts=shape.experts, moe_router_topk=shape.topk,
        moe_token_dispatcher_type=dispatcher, gated_linear_unit=shape.gated,
        activation_func=F.silu if shape.gated else F.gelu, add_bias_linear=False,
        bf16=env.cuda, params_dtype=env.dtype, moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, use_cpu_initialization=not env.cuda, bias_activation_fusion=False,
        expert_model_parallel_size=env.world, **extra,
    )


def comet_config(args, env: Env, transport: str, capacity: int):
    from comet_megatron.config import CometConfig

    kw: dict[str, Any] = dict(transport=transport, capacity=capacity)
    if env.smoke:
        kw.update(tile_m=16, tile_n=16, tile_k=16, comm_programs=1)
    return CometConfig(**kw)


def build_layers(shape, variants: Iterable[str], env: Env, args, capacity: int) -> dict:
    """{variant: layer} with the same weights on this rank (state dict of the first built)."""
    from comet_megatron.bench import build_variant_layers

    return build_variant_layers(
        shape, list(variants), lambda dispatcher: transformer_config(shape, dispatcher, env),
        lambda v: comet_config(args, env, args.comet_transport if v == "comet-fused" else "nccl",
                               capacity),
        (lambda layer: layer.cuda()) if env.cuda else (lambda layer: layer),
    )


def layer_step(layer, x, dy, mode: str):
    import torch

    if mode == "fwd":
        def run():
            with torch.no_grad():
                layer(x)
    else:
        xg = x.detach().clone().requires_grad_(True)

        def run():
            y, _ = layer(xg)
            y.backward(dy)
    return run


class Routing:
    """The routing of this rank's tokens and what it implies for every rank (EP group)."""

    def __init__(self, layer, x, env: Env):
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            _, routing_map = layer.router(x)
        counts = routing_map.sum(0).to(torch.int64).reshape(1, -1)  # [1, E]
        gathered = [torch.zeros_like(counts) for _ in range(env.world)]
        dist.all_gather(gathered, counts, group=env.ep_group)
        c = torch.cat(gathered).cpu()  # [world, E]: rows routed by rank p to expert e
        experts = c.shape[1]
        local = experts // env.world
        me = env.rank
        self.counts = c
        self.local_counts = c[:, me * local:(me + 1) * local].sum(0).tolist()  # rows my experts get
        self.send_splits = [int(c[me, q * local:(q + 1) * local].sum()) for q in range(env.world)]
        self.recv_splits = [int(c[p, me * local:(me + 1) * local].sum()) for p in range(env.world)]


def compute_step(experts, routing: Routing, hidden: int, env: Env, mode: str):
    """This rank's grouped expert GEMMs on the rows the routing sends it (T_compute)."""
    from comet_megatron.bench import experts_step

    return experts_step(experts, routing.local_counts, hidden, env.device, env.dtype, mode)


def comm_step(routing: Routing, hidden: int, env: Env, mode: str):
    """The dispatch and combine all-to-alls alone, with the routing's split sizes (T_comm).

    Forward: dispatch (send_splits -> recv_splits) then combine (the reverse). Backward adds the
    combine's gradient (dispatch direction) and the dispatch's gradient (combine direction)."""
    import torch
    import torch.distributed as dist

    n_send, n_recv = sum(routing.send_splits), sum(routing.recv_splits)
    tokens = torch.randn(n_send, hidden, device=env.device, dtype=env.dtype)
    received = torch.empty(n_recv, hidden, device=env.device, dtype=env.dtype)
    returned = torch.empty(n_send, hidden, device=env.device, dtype=env.dtype)
    send, recv = routing.send_splits, routing.recv_splits
    rounds = 1 if mode == "fwd" else 2

    def run():
        for _ in range(rounds):
            dist.all_to_all_single(received, tokens, recv, send, group=env.ep_group)
            dist.all_to_all_single(returned, received, send, recv, group=env.ep_group)
    return run


# ---------------------------------------------------------------- the matrix
def measure(env: Env, fn_builder) -> dict:
    """{ms: max over ranks of the medians, ms_per_rank, ms_wall: the host-clock cross-check (max
    over ranks), status, note} of one timed region."""
    err = None
    try:
        ms, wall = env.time(fn_builder())
    except Exception as exc:  # noqa: BLE001  (recorded; the other ranks fail the same way)
        ms, wall, err = float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:500]
    per_rank = env.gather(ms)
    walls = env.gather(wall)
    if any(math.isnan(v) for v in per_rank + walls):
        return {"ms": None, "ms_per_rank": per_rank, "ms_wall": None, "status": "error",
                "note": err or "failed on another rank"}
    return {"ms": max(per_rank), "ms_per_rank": per_rank, "ms_wall": max(walls), "status": "ok",
            "note": None}


def _record(shape, tokens, mode, variant, **fields) -> dict:
    rec = {"shape": shape, "tokens": tokens, "mode": mode, "variant": variant, "ms": None,
           "ms_per_rank": [], "ms_wall": None, "status": "ok", "note": None}
    rec.update(fields)
    return rec


def bench_shape(shape, tokens_list, variants, modes, env: Env, args, progress=None,
                deadline: float | None = None) -> tuple[list, dict]:
    import torch

    build = [v for v in variants if v != "megatron+ep-overlap"]
    if "megatron+grouped" not in build:
        build.append("megatron+grouped")  # its experts give T_compute
    layers = build_layers(shape, build, env, args, capacity=max(tokens_list))
    transports = {}
    records = []
    for tokens in tokens_list:
        if env.past(deadline):
            if env.rank == 0:
                print(f"bench ep: time budget spent; {shape.name} from {tokens} tokens on not measured",
                      flush=True)
            break
        gen = torch.Generator(device=env.device).manual_seed(1000 + env.rank)
        x = torch.randn(tokens, 1, shape.hidden, device=env.device, dtype=env.dtype, generator=gen)
        dy = torch.randn(tokens, 1, shape.hidden, device=env.device, dtype=env.dtype, generator=gen)
        routing = Routing(layers["megatron+grouped"], x, env)
        for mode in modes:
            for v in variants:
                if v == "megatron+ep-overlap":
                    note = EP_OVERLAP_NEEDS_EP if env.world == 1 else EP_OVERLAP_NOTE
                    records.append(_record(shape.name, tokens, mode, v, status="n/a", note=note))
                    if progress:
                        progress()
                    continue
                m = measure(env, lambda: layer_step(layers[v], x, dy, mode))
                if v.startswith("comet") and m["status"] == "ok":
                    transports[v] = layers[v].transport
                    if v == COMET and layers[v].transport == "nccl":
                        m["note"] = "the fused path did not run here (transport resolved to nccl)"
                records.append(_record(shape.name, tokens, mode, v, **m))
                if progress:
                    progress()
            experts = layers["megatron+grouped"].experts
            for name, builder in (
                (COMPUTE, lambda: compute_step(experts, routing, shape.hidden, env, mode)),
                (COMM, lambda: comm_step(routing, shape.hidden, env, mode)),
            ):
                records.append(_record(shape.name, tokens, mode, name, **measure(env, builder)))
                if progress:
                    progress()
        del x, dy
        if env.cuda:
            torch.cuda.empty_cache()
    for layer in layers.values():
        for p in layer.parameters():
            p.grad = None
    del layers
    from comet_megatron import fused

    fused.drop_workspaces()
    if env.cuda:
        torch.cuda.empty_cache()
    return records, transports


# ---------------------------------------------------------------- output
def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def print_table(rows: Sequence[dict], meta: dict) -> None:
    title = (f"MoE layer, EP={meta['ep']} ({meta['device']}), median ms, max over ranks; "
             f"x = speedup of {COMET}; hidden = (T_compute+T_comm-T_layer)/T_comm; "
             f"/bound = T_layer/max(T_compute,T_comm)")
    if meta["smoke"]:
        title = "CPU SMOKE TEST (plumbing only, timings meaningless): " + title
    variants = [v for v in LAYER_VARIANTS if any(v in r["ms"] for r in rows)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        for r in rows:
            print(json.dumps(r))
        return
    table = Table(title=title, title_justify="left")
    cols = ["shape", "tokens", "mode", *variants, "T_compute", "T_comm",
            *[f"x {b}" for b in BASELINES], "hidden comet", "hidden grouped", "comet /bound"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("shape", "mode") else "right")
    for r in rows:
        cells = [r["shape"], str(r["tokens"]), r["mode"]]
        for v in variants:
            cells.append("n/a" if v in r["notes"] and r["ms"].get(v) is None else _fmt(r["ms"].get(v)))
        cells += [_fmt(r["t_compute_ms"]), _fmt(r["t_comm_ms"])]
        cells += [_fmt(r["speedup_comet_vs"].get(b), ".2f") for b in BASELINES]
        cells += [_fmt(None if r["hidden_share"].get(COMET) is None else 100 * r["hidden_share"][COMET], ".0f") + "%",
                  _fmt(None if r["hidden_share"].get("megatron+grouped") is None
                       else 100 * r["hidden_share"]["megatron+grouped"], ".0f") + "%",
                  _fmt(r["vs_bound"].get(COMET), ".2f")]
        table.add_row(*cells)
    Console(width=200).print(table)
    notes = {}
    for r in rows:
        for v, n in r["notes"].items():
            notes.setdefault((v, n), None)
    for v, n in notes:
        print(f"  {v}: {n}")


def plot(rows: Sequence[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(5.2 * len(shapes), 3.8 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r["shape"] == shape and r["mode"] == mode),
                         key=lambda r: r["tokens"])
            for v in LAYER_VARIANTS:
                pts = [(r["tokens"], r["ms"][v]) for r in sel if r["ms"].get(v) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=v)
            for key, label, style in (("t_compute_ms", "T_compute", "--"), ("t_comm_ms", "T_comm", ":"),
                                      ("bound_ms", "max(T_compute, T_comm)", "-.")):
                pts = [(r["tokens"], r[key]) for r in sel if r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle=style, color="gray" if key != "bound_ms" else "black",
                            label=label)
            ax.set_title(f"{shape} {mode} (EP={meta['ep']})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel("ms (max over ranks)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if meta["smoke"]:
        fig.suptitle("CPU smoke test: plumbing only, timings meaningless", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str:
    from comet_megatron.bench import _git_commit as commit

    return commit()


# ---------------------------------------------------------------- entry (under torchrun)
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="comet-megatron bench ep",
        description="Time one MoE layer under expert parallelism (EP = world size), comet against "
                    "Megatron, on every GPU of this host (torchrun, one process per GPU; launched for "
                    "you when not under torchrun). `bench ep e2e --help`: the end-to-end pretraining "
                    "comparison.")
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                   help="config names in configs/ (or YAML paths) whose MoE shape to time")
    p.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS), help="tokens per rank")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=LAYER_VARIANTS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--comet-transport", default=None,
                   choices=["auto", "symm_mem", "cuda_ipc", "emulated", "nccl"],
                   help="transport of comet-fused (default: auto on GPUs, cuda_ipc with --cpu-smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions (default 3; smoke 1)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; smoke 2)")
    p.add_argument("--out", default="ep-out", help="folder for ep.json and ep.png")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new token counts / shapes after this many seconds (what was "
                        "measured is kept; meta.complete says whether the matrix is whole)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="gloo on the CPU, tiny shape, host timers: tests the plumbing only")
    p.add_argument("--nproc", type=int, default=None,
                   help="(comet-megatron bench ep only) processes to launch; default one per GPU, "
                        "2 with --cpu-smoke")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "e2e":
        return e2e_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.cpu_smoke:
        # before torch / triton are imported: CPU only, fused kernels under Triton's interpreter
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
        args.comet_transport = args.comet_transport or "cuda_ipc"
        args.warmup = 1 if args.warmup is None else args.warmup
        args.reps = 2 if args.reps is None else args.reps
        if args.tokens == list(DEFAULT_TOKENS):
            args.tokens = [16, 32]
    args.comet_transport = args.comet_transport or "auto"
    args.warmup = 3 if args.warmup is None else args.warmup
    args.reps = 10 if args.reps is None else args.reps
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    env = Env(args.cpu_smoke, args.warmup, args.reps)
    if args.cpu_smoke:
        shapes = [smoke_shape()]
    else:
        from comet_megatron.bench import load_shape

        shapes = [load_shape(s) for s in args.shapes]
    for s in shapes:
        if s.experts % env.world:
            raise SystemExit(f"bench ep: {s.name} has {s.experts} experts, not divisible by EP={env.world}")
    device_name = "CPU (gloo)" if args.cpu_smoke else torch.cuda.get_device_name()
    meta = {
        "smoke": bool(args.cpu_smoke),
        "timer": "host perf_counter" if args.cpu_smoke else "CUDA events",
        "world_size": env.world, "ep": env.world, "device": device_name, "backend": env.backend,
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(),
        "command": "comet_megatron.bench_ep " + " ".join(argv),
        "warmup": env.warmup, "reps": env.reps, "comet_transport": args.comet_transport,
        "shapes": {s.name: {"hidden": s.hidden, "ffn": s.ffn, "experts": s.experts, "topk": s.topk,
                            "gated": s.gated} for s in shapes},
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
        "definitions": {
            "ms": "median over repetitions on each rank, then the maximum over ranks",
            "ms_wall": "host clock to torch.cuda.synchronize() (cross-check of the CUDA-event time)",
            COMPUTE: "T_compute: comet's grouped expert GEMMs (cuBLAS torch._grouped_mm on GPUs) on "
                     "the rows this rank's experts receive under the same routing; no communication",
            COMM: "T_comm: torch.distributed.all_to_all_single dispatch + combine with the routing's "
                  "split sizes (fwd: 2 calls; fwd+bwd: 4, the backward moves the same volumes)",
            "speedup_comet_vs": "T_baseline / T_comet-fused (> 1: comet faster)",
            "hidden_share": "(T_compute + T_comm - T_layer) / T_comm",
            "vs_bound": "T_layer / max(T_compute, T_comm) (1.0: the overlap limit)",
        },
    }
    if args.cpu_smoke and env.rank == 0:
        print("comet-megatron bench ep --cpu-smoke: CPU, gloo, tiny shape, host timers, Triton "
              "interpreter. This tests the script's plumbing only; the timings mean nothing.",
              flush=True)
    records, transports = [], {}
    total = len(shapes) * len(args.tokens) * len(args.modes) * (len(args.variants) + 2)
    done = [0]

    def progress():
        done[0] += 1
        if env.rank == 0:
            print(f"  [{done[0]}/{total}] measured", flush=True)

    out = Path(args.out)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    def write_json(complete: bool):
        # after every shape, so that a run stopped by a time limit keeps what it measured
        meta["resolved_transports"] = transports
        meta["elapsed_s"] = time.time() - t0
        meta["complete"] = complete
        rows = summarize(records, env.world)
        (out / "ep.json").write_text(json.dumps({"meta": meta, "records": records, "summary": rows},
                                                indent=1))
        return rows

    t0 = time.time()
    deadline = t0 + args.budget_s if args.budget_s else None
    for shape in shapes:
        if env.past(deadline):
            if env.rank == 0:
                print(f"bench ep: --budget-s {args.budget_s:g} spent; {shape.name} and later shapes "
                      "not measured", flush=True)
            break
        if env.rank == 0:
            print(f"bench ep: {shape.name}, tokens {args.tokens}, EP={env.world}", flush=True)
        recs, tr = bench_shape(shape, args.tokens, args.variants, args.modes, env, args, progress,
                               deadline)
        records += recs
        transports[shape.name] = tr
        if env.rank == 0:
            measured = {(r["shape"], r["tokens"]) for r in records}
            rows = write_json(complete=len(measured) == len(shapes) * len(args.tokens))
    if env.rank == 0:
        rows = write_json(complete=meta.get("complete", False))
        plot(rows, out / "ep.png", meta)
        print_table(rows, meta)
        print(f"wrote {out / 'ep.json'} and {out / 'ep.png'}", flush=True)
    import torch.distributed as dist

    from megatron.core import parallel_state as ps

    env.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------- launcher (comet-megatron bench ep)
def cli_main(argv: Sequence[str]) -> int:
    """`comet-megatron bench ep ...`: run here when already under torchrun, else launch torchrun
    with one process per GPU (2 with --cpu-smoke). `... bench ep e2e ...`: the end-to-end stage."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and argv[0] == "e2e":
        return e2e_main(argv[1:])
    args = build_parser().parse_args(argv)  # --help and argument errors before launching
    if "LOCAL_RANK" in os.environ:
        return main(argv)
    nproc = args.nproc
    if nproc is None:
        if args.cpu_smoke:
            nproc = 2
        else:
            from comet_megatron.cli import _cuda_device_count

            nproc = _cuda_device_count()
            if nproc == 0:
                print("comet-megatron bench ep needs CUDA GPUs (or --cpu-smoke).", file=sys.stderr)
                return 2
    command = launch_command(nproc, argv)
    print("comet-megatron: launching " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command, env=launch_env(args.cpu_smoke))


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    cleaned, skip = [], False
    for a in argv:  # --nproc belongs to the launcher
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "comet_megatron.bench_ep", *cleaned]


def launch_env(smoke: bool) -> dict:
    env = dict(os.environ)
    # never NVLink multicast (NVLS): see docs; symmetric memory without multicast
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---------------------------------------------------------------- end-to-end stage
E2E_RUNS = {
    "comet": ["--moe-token-dispatcher-type", "comet"],
    "alltoall": ["--moe-token-dispatcher-type", "alltoall"],
    "alltoall+ep-overlap": ["--moe-token-dispatcher-type", "alltoall", "--overlap-moe-expert-parallel-comm"],
}
# per-step lines of comet_megatron.pretrain: plain "step 3/20 loss 7.1 tokens/s 812.0 step_time_ms 98.1"
# or rich "step     3/20  loss   7.1000     812.0 tokens/s  step     98.1 ms"
STEP_RE = re.compile(r"^\s*step\s+(\d+)\s*/\s*(\d+)\s+loss\s+(\S+)")
TPS_RE = (re.compile(r"tokens/s\s+([-+0-9.eEnaif]+)"), re.compile(r"([-+0-9.eEnaif]+)\s+tokens/s"))
STEP_MS_RE = re.compile(r"step_time_ms\s+([-+0-9.eEnaif]+)|tokens/s\s+step\s+([-+0-9.eEnaif]+)\s*ms")
SUMMARY_PREFIX = "COMET_SUMMARY "


def _num(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


TRANSPORT_RE = re.compile(r"comet: layer \S+ uses the (\w+) transport")


def parse_pretrain_log(text: str) -> dict:
    """Per-step records (step, loss, tokens_per_s, step_time_ms), the COMET_SUMMARY dict and the
    transports comet layers reported (logged at COMET_LOG_LEVEL=INFO)."""
    steps, summary, transports = [], None, set()
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        t = TRANSPORT_RE.search(line)
        if t:
            transports.add(t.group(1))
            continue
        if SUMMARY_PREFIX in line:
            try:
                summary = json.loads(line.split(SUMMARY_PREFIX, 1)[1])
            except json.JSONDecodeError:
                pass
            continue
        m = STEP_RE.search(line)
        if m:
            tps = TPS_RE[0].search(line) or TPS_RE[1].search(line)
            ms = STEP_MS_RE.search(line)
            steps.append({
                "step": int(m.group(1)), "loss": _num(m.group(3)),
                "tokens_per_s": _num(tps.group(1)) if tps else None,
                "step_time_ms": _num(ms.group(1) or ms.group(2)) if ms else None,
            })
    return {"steps": steps, "summary": summary, "comet_transports": sorted(transports)}


def median_tokens_per_s(run: dict) -> float | None:
    """Median of a run's per-step tokens/s after the summary's warm-up steps (`pretrain.WARMUP_STEPS`, as its
    means): robust to the odd slow step (a host hiccup, the allocator freeing and re-reserving memory near a full
    GPU), which moves a mean over ten steps by tens of percent."""
    summary = run.get("summary") or {}
    warmup = summary.get("warmup_steps", 2)
    vals = [s["tokens_per_s"] for s in run.get("steps", []) if s["step"] > warmup and _ok(s["tokens_per_s"])]
    return float(statistics.median(vals)) if vals else None


def compare_e2e(runs: dict) -> dict:
    """Speedups of comet's mean and median tokens/s over every other run, and the final-loss gaps."""
    def tps(name):
        s = (runs.get(name) or {}).get("summary") or {}
        v = s.get("mean_tokens_per_s")
        return v if _ok(v) else None

    def med(name):
        return median_tokens_per_s(runs.get(name) or {})

    def loss(name):
        s = (runs.get(name) or {}).get("summary") or {}
        v = s.get("final_loss")
        return v if _ok(v) else None

    out = {"mean_tokens_per_s": {n: tps(n) for n in runs}, "median_tokens_per_s": {n: med(n) for n in runs},
           "final_loss": {n: loss(n) for n in runs},
           "speedup_comet_vs": {}, "median_speedup_comet_vs": {}, "final_loss_diff_comet_minus": {}}
    for n in runs:
        if n == "comet":
            continue
        t_c, t_b = tps("comet"), tps(n)
        out["speedup_comet_vs"][n] = (t_c / t_b) if _ok(t_c, t_b) and t_b > 0 else None
        m_c, m_b = med("comet"), med(n)
        out["median_speedup_comet_vs"][n] = (m_c / m_b) if _ok(m_c, m_b) and m_b > 0 else None
        l_c, l_b = loss("comet"), loss(n)
        out["final_loss_diff_comet_minus"][n] = (l_c - l_b) if _ok(l_c, l_b) else None
    return out


def plot_e2e(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        pts = [(s["step"], s["loss"]) for s in run.get("steps", []) if _ok(s["loss"])]
        if pts:
            a1.plot(*zip(*pts), marker=".", label=name)
        pts = [(s["step"], s["tokens_per_s"]) for s in run.get("steps", []) if _ok(s["tokens_per_s"])]
        if pts:
            a2.plot(*zip(*pts), marker=".", label=name)
    a1.set_title("loss")
    a2.set_title("tokens/s")
    for a in (a1, a2):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bounded(cmd: Sequence[str], env: dict, timeout_s: float) -> tuple[str, int | str]:
    """(stdout+stderr, exit code or "timeout") of `cmd`, run in its own process group so that a
    timeout stops the launcher's torchrun and all its workers too, not only the launcher."""
    import signal

    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout_s)
        return text, proc.returncode
    except subprocess.TimeoutExpired:
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)  # the group this call created (start_new_session)
            except ProcessLookupError:
                break
            try:
                text, _ = proc.communicate(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                text = ""
        return (text or "") + f"\n[bench ep e2e: stopped after {timeout_s:g} s]\n", "timeout"


def e2e_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comet-megatron bench ep e2e",
                                description="comet-megatron pretrain once per dispatcher; tokens/s "
                                            "and loss curves compared")
    p.add_argument("--config", default=str(REPO / "configs" / "qwen2-moe-a2.7b-4l.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nproc", type=int, default=None, help="processes (default: the config's / one per GPU)")
    p.add_argument("--runs", nargs="+", default=list(E2E_RUNS), choices=list(E2E_RUNS))
    p.add_argument("--out", default="ep-out")
    p.add_argument("--timeout-s", type=float, default=600, help="per pretraining run")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: Megatron arguments added to every run")
    return p


def e2e_main(argv: Sequence[str]) -> int:
    args = e2e_parser().parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.runs:
        cmd = [sys.executable, "-m", "comet_megatron.cli", "pretrain", "--config", args.config,
               "--steps", str(args.steps)]
        if args.nproc is not None:
            cmd += ["--nproc", str(args.nproc)]
        cmd += ["--", *extra, *E2E_RUNS[name]]
        log_path = out / f"e2e-{name.replace('+', '_')}.log"
        print(f"bench ep e2e: {name}: {' '.join(cmd)}  (log: {log_path})", flush=True)
        t0 = time.time()
        env = launch_env(False)
        env.setdefault("COMET_LOG_LEVEL", "INFO")  # the comet layers log their transport
        text, rc = run_bounded(cmd, env, args.timeout_s)
        log_path.write_text(text)
        parsed = parse_pretrain_log(text)
        tail = "\n".join(text.splitlines()[-15:]) if rc != 0 else None
        runs[name] = {"command": cmd, "rc": rc, "wall_s": time.time() - t0, "log": str(log_path),
                      **parsed, "error_tail": tail}
        s = parsed["summary"] or {}
        print(f"  rc {rc}, mean tokens/s {s.get('mean_tokens_per_s')}, final loss {s.get('final_loss')}, "
              f"comet transports {parsed['comet_transports'] or '-'}", flush=True)
    result = {"config": args.config, "steps": args.steps, "runs": runs, "comparison": compare_e2e(runs),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _git_commit()}
    (out / "e2e.json").write_text(json.dumps(result, indent=1))
    plot_e2e(runs, out / "e2e_loss.png", f"{Path(args.config).stem}, {args.steps} steps")
    cmp_ = result["comparison"]
    for n, x in cmp_["speedup_comet_vs"].items():
        print(f"  comet vs {n}: tokens/s x{_fmt(x, '.3f')} (mean), x{_fmt(cmp_['median_speedup_comet_vs'][n], '.3f')} "
              f"(median), final loss diff {_fmt(cmp_['final_loss_diff_comet_minus'][n], '+.4f')}")
    print(f"wrote {out / 'e2e.json'} and {out / 'e2e_loss.png'}", flush=True)
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
