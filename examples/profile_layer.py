"""Where one MoE layer's forward+backward spends its time: host vs GPU (torch.profiler).

    python examples/profile_layer.py --shape qwen2-moe-a2.7b --tokens 8192 --out prof

For each variant (the `comet-megatron bench layer` variants) it runs a few warm-up calls, then profiles
`--iters` forward+backward calls and prints: wall time per call, GPU kernel time per call and their
ratio (below ~0.8 the call is bound by the host: Python, launches, synchronisations), the CUDA kernels
by total time, the CPU operators by self time, and the host synchronisations of one call (each a point
where the GPU drains while the host waits; `torch.cuda.set_sync_debug_mode`) with the source line that
caused them. `--ddp` wraps the layers in Megatron's DistributedDataParallel, as in training. Writes `<out>/<variant>.txt` (the tables) and a
Chrome trace `<out>/<variant>.trace.json.gz` (open in Perfetto / chrome://tracing).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2-moe-a2.7b", help="config name in configs/ (or a YAML path)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--variants", nargs="+", default=["megatron+grouped", "comet-reference", "comet-fused"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first (compilation, autotuning)")
    p.add_argument("--rows", type=int, default=18, help="rows of each printed table")
    p.add_argument("--out", default="profile-out")
    p.add_argument("--ddp", action="store_true", help="wrap the layers in Megatron's DistributedDataParallel")
    p.add_argument("--python", action="store_true",
                   help="also run cProfile over the calls (host time per Python function: where the host "
                        "spends a host-bound call) and write <out>/<variant>.python.txt")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from comet_megatron.bench import VARIANTS, _init_distributed, build_layers, load_shape

    if not torch.cuda.is_available():
        print("profile_layer.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    bad = [v for v in args.variants if v not in VARIANTS or v == "experts-only"]
    if bad:
        print(f"unknown variants {bad}; choose from {[v for v in VARIANTS if v != 'experts-only']}", file=sys.stderr)
        return 2
    _init_distributed()
    shape = load_shape(args.shape)
    layers = build_layers(shape, args.variants, ddp=args.ddp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(args.tokens, 1, shape.hidden, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    summary = []
    for v in args.variants:
        layer = layers[v]
        xg = x.clone().requires_grad_(True)

        def step():
            y, _ = layer(xg)
            y.backward(dy)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        syncs = host_syncs(step)
        if args.python:
            (out / f"{v}.python.txt").write_text(python_profile(step, args.iters, args.rows * 2))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3 / args.iters
        events = prof.key_averages()
        gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events
                     if getattr(e.device_type, "name", "") == "CUDA") / args.iters
        try:
            kernels = events.table(sort_by="self_device_time_total", row_limit=args.rows)
        except (KeyError, AttributeError, ValueError):  # older torch names it after CUDA
            kernels = events.table(sort_by="self_cuda_time_total", row_limit=args.rows)
        cpu = events.table(sort_by="self_cpu_time_total", row_limit=args.rows)
        head = (f"{shape.name}, {args.tokens} tokens, {v}: wall {wall_ms:.3f} ms/call, GPU kernels "
                f"{gpu_us / 1e3:.3f} ms/call, busy {gpu_us / 1e3 / wall_ms:.2f}, "
                f"{sum(syncs.values())} host syncs/call{' (DDP)' if args.ddp else ''}")
        print(head)
        sync_lines = "\n".join(f"{n:4d}  {where}" for where, n in syncs.most_common())
        (out / f"{v}.txt").write_text(f"{head}\n\nhost synchronisations of one call\n{sync_lines}\n\n"
                                      f"by GPU time\n{kernels}\n\nby CPU self time\n{cpu}\n")
        trace = out / f"{v}.trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
        summary.append(head)
    print("\n".join(summary))
    return 0


def python_profile(step, iters: int, rows: int) -> str:
    """cProfile of `iters` calls: functions by own time and by cumulative time."""
    import cProfile
    import io
    import pstats

    import torch

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        text.write(f"by {key} ({iters} calls)\n")
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(rows)
    return text.getvalue()


def host_syncs(step):
    """Counter {"file:line (function)": n} of the synchronising CUDA operations of one `step()`: for
    each, the innermost frame of the call stack outside torch (the line of ours, or Megatron's, that
    asked for it)."""
    import collections
    import traceback
    import warnings

    import torch

    found = collections.Counter()

    def ours():
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and not frame.filename.endswith("warnings.py"):
                return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
        return "?"

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            found[ours()] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()  # not counted: ours
    return found


if __name__ == "__main__":
    sys.exit(main())
