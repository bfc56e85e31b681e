"""GPU checks of the comet layer that are measurements rather than unit tests.

    python examples/gpu_checks.py --out OUT_DIR [--calls 1000]

1. Repeated use: `--calls` forward+backward calls of the fused layer with varying token counts;
   every 50th call is compared with the reference transport (stale flags would show as wrong
   results); allocated memory after warm-up vs at the end (growth = a leak).
2. Peak memory of one forward+backward above what is resident before it (weights, and with `--ddp` the fp32
   main_grad buffers of Megatron's DistributedDataParallel, as in training; `--distributed-optimizer` for its
   parameter layout): Megatron alltoall (+SequentialMLP), Megatron's dispatcher with comet's grouped experts,
   the comet reference and fused paths, at the benchmark shapes (one GPU, EP=1).
3. Determinism: two identical forward+backward calls, bitwise equal or not, per path.

Writes gpu_checks.json into OUT_DIR and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _init():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel(create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(1)


def _layers(shape, transports):
    from comet_megatron.bench import Shape, build_layers

    return build_layers(Shape(*shape), transports)


def _fwd_bwd(layer, x, dy):
    xi = x.clone().requires_grad_(True)
    y, _ = layer(xi)
    y.backward(dy)
    return y.detach(), xi.grad


def repeated_use(calls: int) -> dict:
    from comet_megatron.bench import Shape, build_layers

    shape = Shape("qwen2-like", 2048, 1408, 16, 4)
    layers = build_layers(shape, ["comet-reference", "comet-fused"])
    ref, fused = layers["comet-reference"], layers["comet-fused"]
    g = torch.Generator(device="cuda").manual_seed(0)
    worst, mem = 0.0, []
    for i in range(calls):
        tokens = 512 + (977 * i) % 3500
        x = torch.randn(tokens, 1, shape.hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        dy = torch.randn_like(x)
        for p in fused.parameters():
            p.grad = None
        y1, gx1 = _fwd_bwd(fused, x, dy)
        if i % 50 == 0:
            for p in ref.parameters():
                p.grad = None
            y0, gx0 = _fwd_bwd(ref, x, dy)
            err = max(((y1.float() - y0.float()).norm() / y0.float().norm()).item(),
                      ((gx1.float() - gx0.float()).norm() / gx0.float().norm()).item())
            worst = max(worst, err)
        if i in (calls // 5, calls - 1):  # after the largest batch has grown the workspace
            torch.cuda.synchronize()
            mem.append(torch.cuda.memory_allocated())
    return {"calls": calls, "worst_rel_err_vs_reference": worst,
            "allocated_after_fifth_of_calls": mem[0], "allocated_at_end": mem[1],
            "growth_bytes": mem[1] - mem[0], "epoch": fused._fused.workspace.view.epoch}


def peak_memory(shapes, tokens, ddp=False, distributed_optimizer=False) -> list:
    from comet_megatron.bench import build_layers, load_shape

    out = []
    for name in shapes:
        shape = load_shape(name)
        for variant in ("megatron", "megatron+grouped", "comet-reference", "comet-fused"):
            layers = build_layers(shape, [variant], ddp=ddp, distributed_optimizer=distributed_optimizer)
            layer = layers[variant]
            x = torch.randn(tokens, 1, shape.hidden, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn_like(x)
            _fwd_bwd(layer, x, dy)  # warm-up (workspace, compilation)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _fwd_bwd(layer, x, dy)
            torch.cuda.synchronize()
            out.append({"shape": name, "tokens": tokens, "variant": variant, "ddp": ddp,
                        "distributed_optimizer": distributed_optimizer,
                        "peak_above_resident_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20})
            del layers, layer
            torch.cuda.empty_cache()
    return out


def determinism() -> dict:
    """Bitwise reproducibility of two identical calls per path, and the cost of
    --comet-deterministic on the reference path (median ms of forward+backward)."""
    from comet_megatron.bench import Shape, _time, build_layers

    shape = Shape("qwen2-like", 2048, 1408, 16, 4)
    layers = build_layers(shape, ["megatron", "comet-reference", "comet-fused"])
    det = build_layers(shape, ["comet-reference"])["comet-reference"]
    det.load_state_dict(layers["comet-reference"].state_dict())
    det.token_dispatcher.deterministic = True
    layers["comet-reference-deterministic"] = det
    x = torch.randn(4096, 1, shape.hidden, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    res = {}
    for name in ("comet-reference", "comet-reference-deterministic"):
        xg = x.clone().requires_grad_(True)
        layer = layers[name]

        def run():
            y, _ = layer(xg)
            y.backward(dy)
        res[name + " ms"] = _time(run)
    for name, layer in layers.items():
        runs = []
        for _ in range(2):
            for p in layer.parameters():
                p.grad = None
            y, gx = _fwd_bwd(layer, x, dy)
            grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
            runs.append((y, gx, grads))
        same = torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]) and all(
            torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
        res[name] = same
    return res


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu-checks")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "qwen2-moe-a2.7b", "phi-3.5-moe"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--only", choices=["determinism", "repeated", "memory"], default=None,
                        help="run one check only")
    parser.add_argument("--ddp", action="store_true", help="memory: layers inside Megatron's DDP (as in training)")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="memory, with --ddp: the distributed optimizer's parameter layout")
    args = parser.parse_args()
    if args.distributed_optimizer and not args.ddp:
        parser.error("--distributed-optimizer needs --ddp")
    _init()
    import comet_megatron

    comet_megatron.enable()
    result = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("COMET_COMMIT", "unknown")}
    if args.only in (None, "determinism"):
        result["determinism_bitwise"] = determinism()
        print("determinism:", result["determinism_bitwise"], flush=True)
    if args.only in (None, "repeated"):
        result["repeated_use"] = repeated_use(args.calls)
        print("repeated use:", result["repeated_use"], flush=True)
    if args.only in (None, "memory"):
        result["peak_memory"] = peak_memory(args.shapes, args.tokens, args.ddp, args.distributed_optimizer)
        for row in result["peak_memory"]:
            print("peak memory:", row, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_checks.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
