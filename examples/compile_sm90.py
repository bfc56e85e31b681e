"""Compile the Gluon weight-gradient kernel for Hopper (sm_90a) on a machine without a GPU: per knob set, the
registers, the stack (spills) and the shared memory ptxas reports, before any device time is spent.

    python examples/compile_sm90.py                                   # the default knobs, adding and writing
    python examples/compile_sm90.py --knobs '[{}, {"mma_warpgroups": 1}, {"block_m": 128, "block_n": 128}]'
    python examples/compile_sm90.py --triton /tmp/triton-3.6          # another Triton (an unpacked wheel), e.g.
                                                                      # the device's, whose code generation differs

Triton compiles through its NVIDIA backend and the ptxas its wheel carries; only the launch needs a GPU. A
stand-in driver tells Triton the target is sm_90 (`--arch`); the kernel is built with `wgrad_ws_plan`, the
function `grouped_wgrad_ws` launches through, on CPU tensors of the shape given (`--shape R M N`, experts
`--experts`). Exit status 1 when a knob set fails to compile or spills more than `--max-stack` bytes. The
driver stand-in uses Triton internals (tested with Triton 3.6 and 3.8): another version may need it adapted.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def _stand_in_driver(arch: int):
    """Make Triton target sm_<arch> without touching CUDA (its driver's init, device and stream queries)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StandIn(CudaDriver):
        def __init__(self):  # no CUDA initialisation
            self.utils = None
            self.launcher_cls = None

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            return None

    triton.runtime.driver.set_active(StandIn())


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED of the (single) kernel in `cubin`, from the cuobjdump Triton's wheel carries."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                             check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_knobs(knobs: dict, overwrite: bool, shape=(4096, 512, 1024), experts: int = 8, sms: int = 132,
                  out_dtype: str = "float32") -> dict:
    """Compile `_wgrad_ws_kernel` for one knob set (`wgrad_ws_plan`'s keywords); returns its resources."""
    import torch

    from comet_megatron.kernels import gluon_wgrad

    rows, m_dim, n_dim = shape
    a = torch.empty(rows, m_dim, dtype=torch.bfloat16)
    b = torch.empty(rows, n_dim, dtype=torch.bfloat16)
    row_offsets = torch.zeros(experts + 1, dtype=torch.int32)
    out = torch.empty(experts * m_dim * n_dim, dtype=getattr(torch, out_dtype))
    out_offsets = torch.arange(experts, dtype=torch.int64) * (m_dim * n_dim)
    # the outputs as rows for the TMA store (grouped_wgrad's; the default for 16-bit outputs, `tma_store` for fp32)
    knobs = {"out_rows": (out.view(-1, n_dim), torch.arange(experts, dtype=torch.int32) * m_dim), **knobs}
    kernel, grid, args, constexprs = gluon_wgrad.wgrad_ws_plan(a, b, row_offsets, out, out_offsets,
                                                                overwrite=overwrite, sms=sms, **knobs)
    compiled = kernel.warmup(*args, grid=grid, **constexprs)
    usage = resource_usage(compiled.asm["cubin"])
    usage["dynamic_shared"] = compiled.metadata.shared
    return usage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--knobs", default="[{}]", help="JSON list of keyword sets for wgrad_ws_plan ({} = defaults)")
    p.add_argument("--mode", choices=("add", "write", "both"), default="both")
    p.add_argument("--shape", nargs=3, type=int, default=[4096, 512, 1024], metavar=("R", "M", "N"))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--out-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the outputs' type: fp32 main_grad, or a fresh bf16 gradient (grouped_wgrad; write only)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--triton", default=None, help="import Triton from this directory (an unpacked wheel)")
    p.add_argument("--max-stack", type=int, default=128,
                   help="stack bytes (spills) above which a knob set counts as failed")
    args = p.parse_args(argv)
    try:
        knob_sets = json.loads(args.knobs)
    except json.JSONDecodeError as exc:
        p.error(f"--knobs: not JSON ({exc})")
    if not isinstance(knob_sets, list) or not all(isinstance(k, dict) for k in knob_sets):
        p.error("--knobs: give a JSON list of keyword sets (objects)")
    if args.triton:
        if not (Path(args.triton) / "triton" / "__init__.py").exists():
            p.error(f"--triton {args.triton}: no triton/__init__.py there (give the directory holding `triton/`)")
        sys.path.insert(0, args.triton)
    import triton

    _stand_in_driver(args.arch)
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), target sm_{args.arch}")
    modes = {"add": [False], "write": [True], "both": [False, True]}[args.mode]
    if args.out_dtype != "float32":
        if args.mode == "add":
            p.error("--out-dtype bfloat16 is written, not added: use --mode write")
        modes = [True]
    failed = 0
    for knobs in knob_sets:
        for overwrite in modes:
            label = f"{json.dumps(knobs, sort_keys=True)} {'write' if overwrite else 'add'}"
            try:
                u = compile_knobs(knobs, overwrite, tuple(args.shape), args.experts, out_dtype=args.out_dtype)
            except Exception as exc:  # a knob set that does not compile: report it, go on
                failed += 1
                print(f"{label}: FAILED {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
                continue
            bad = u.get("stack", 0) > args.max_stack
            failed += bad
            print(f"{label}: {u.get('reg')} registers, stack {u.get('stack')} B, shared {u['dynamic_shared']} B"
                  + ("  <- spills" if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
