"""`CometGroupedMLP`: the expert module of the comet MoE layer.

Parameters, their names (`local_experts.{i}.linear_fc1.weight`, ...), shapes and the sharded state
dict are exactly those of Megatron's `SequentialMLP` (it is a subclass that keeps them), and
Megatron makes `TEGroupedMLP`'s sharded state dict interchangeable with `SequentialMLP`'s: a
distributed checkpoint moves between comet and either Megatron expert module, both ways.

The forward runs all local experts as grouped GEMMs (`grouped_linear`) instead of a Python loop
of per-expert MLPs: `torch._grouped_mm` (cuBLAS) on CUDA in bf16, a per-expert matmul elsewhere.
Semantics follow Megatron's `MLP` with `per_token_scale`:

    y = fc2( act(fc1(x) + b1) * p ) + b2 * p

With `config.delay_wgrad_compute` (Megatron's `--delay-wgrad-compute`), the backward pass of the
experts computes input and probability gradients only and queues what the expert weight gradients
need; `backward_dw()` (called by `MoELayer.backward_dw`, as Megatron's schedules do) computes them
later and accumulates them where Megatron expects them (docs/ARCHITECTURE.md, "Delayed weight
gradients").
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from comet_megatron.config import CometConfigError

log = logging.getLogger("comet_megatron")


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return _grouped_mm_shape_ok(x, w.shape[-2])


def _grouped_mm_shape_ok(x: torch.Tensor, out_features: int) -> bool:
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    # cuBLAS grouped GEMM wants 16-byte aligned rows.
    return x.shape[-1] % 8 == 0 and out_features % 8 == 0


def device_row_offsets(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """int32 row offsets of expert segments `counts` ([0, c0, c0 + c1, ...]) on `device`, copied from pinned
    memory without a host synchronisation (a plain `torch.tensor(..., device="cuda")` waits for the GPU)."""
    host = torch.tensor(list(itertools.accumulate(counts, initial=0)), dtype=torch.int32)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class ExpertRows:
    """Rows per local expert of one MoE call (`tokens_per_expert`), shared by its grouped GEMMs: host counts
    (Megatron's dispatchers, comet's at EP > 1), or device counts (comet's reference dispatcher at EP size 1,
    which then needs no host sync): the host list is read from the GPU only when asked (`host()`: the torch
    fallback, per-expert GEMMs, biases). The device offsets are made once and reused by every GEMM."""

    __slots__ = ("_host", "_dev", "_offs", "_copy", "_rows", "_mirror")

    def __init__(self, counts, rows: int | None = None):
        from comet_megatron.kernels.host_copy import AsyncHostCopy

        self._dev = counts if torch.is_tensor(counts) and counts.device.type != "cpu" else None
        self._host = None if self._dev is not None else [int(c) for c in counts]
        self._offs: dict = {}
        # device counts: their host copy queued now, so that `host()` (e.g. the per-expert GEMMs of the
        # backward) waits for that copy only, not for every kernel queued before it
        self._copy = AsyncHostCopy(self._dev) if self._dev is not None else None
        self._rows = rows  # the rows the caller sized its tensors for (checked when the counts reach the host)
        self._mirror = None  # `reversed()`: the ExpertRows whose counts these are, in reversed order

    @classmethod
    def of(cls, counts) -> "ExpertRows":
        return counts if isinstance(counts, ExpertRows) else cls(counts)

    def __len__(self) -> int:
        return len(self._host) if self._host is not None else self._dev.numel()

    def reversed(self) -> "ExpertRows":
        """The same counts in reversed expert order (for rows flipped upside down), sharing the host copy."""
        out = object.__new__(ExpertRows)
        out._dev = self._dev.flip(0) if self._dev is not None else None
        out._host = self._host[::-1] if self._host is not None else None
        out._offs, out._copy, out._rows, out._mirror = {}, None, self._rows, self
        return out

    def host(self) -> List[int]:
        """Rows per expert on the host (from the GPU the first time: waits for the copy queued at creation)."""
        if self._host is None and self._mirror is not None:
            self._host = self._mirror.host()[::-1]
        if self._host is None:
            self._host = self._copy.tolist()
            if self._rows is not None and sum(self._host) != self._rows:
                raise RuntimeError(
                    f"comet experts: the router sent {sum(self._host)} (token, expert) pairs, the dispatcher "
                    f"assumed {self._rows} (tokens x top-k, no token dropped or padded): a router that drops or "
                    "pads tokens needs --moe-expert-capacity-factor (or report this configuration)")
        return self._host

    def offsets(self) -> List[int]:
        """[0, c0, c0 + c1, ...] on the host."""
        return list(itertools.accumulate(self.host(), initial=0))

    def device_offsets(self, device, leading_zero: bool = True) -> torch.Tensor:
        """int32 offsets on `device` ([0, c0, ...], or the cumulative ends without the 0), no host sync."""
        full = self._offs.get(str(device))
        if full is None:
            if self._dev is not None:
                full = torch.zeros(len(self) + 1, dtype=torch.int32, device=self._dev.device)
                torch.cumsum(self._dev, 0, dtype=torch.int32, out=full[1:])
            else:
                full = device_row_offsets(self._host, device)
            self._offs[str(device)] = full
        return full if leading_zero else full[1:]

    def device_offsets_reversed(self, device) -> torch.Tensor:
        """int32 cumulative ends of the counts in reversed expert order (the segments of the rows flipped
        upside down), on `device`, no host sync."""
        key = ("reversed", str(device))
        ends = self._offs.get(key)
        if ends is None:
            if self._dev is not None:
                ends = torch.cumsum(self._dev.flip(0), 0, dtype=torch.int32)
            else:
                ends = device_row_offsets(self._host[::-1], device)[1:]
            self._offs[key] = ends
        return ends


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts, reversed_experts: bool = False) -> torch.Tensor:
    """rows of `x` [M, K] in expert segments of `counts` (a sequence, or `ExpertRows`) times `weight[e]`^T
    ([G, N, K]) -> [M, N].

    Megatron stores linear weights as [out, in]; the grouped GEMM reads them transposed in place.
    `reversed_experts`: `weight[j]` is expert G-1-j's (a view over weights laid out in descending order,
    `expert_weights`): the rows are flipped upside down, so their segments come in that order, and back.
    """
    rows = ExpertRows.of(counts)
    if reversed_experts:
        if _grouped_mm_ok(x, weight):
            y = torch._grouped_mm(x.flip(0), weight.transpose(-2, -1), offs=rows.device_offsets_reversed(x.device))
            return y.flip(0)
        weight = weight.flip(0)
    if _grouped_mm_ok(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=rows.device_offsets(x.device, leading_zero=False))
    outs = [xe @ weight[e].t() for e, xe in enumerate(torch.split(x, rows.host()))]
    if not outs:
        return x.new_empty((0, weight.shape[-2]))
    return torch.cat(outs)


def grouped_linear_wgrad(grad_y: torch.Tensor, x: torch.Tensor, counts, out_dtype: torch.dtype) -> torch.Tensor:
    """Weight gradient of `grouped_linear(x, weight, counts)`: dW[e] = grad_y[e]^T @ x[e], [G, N, K]
    (the [out, in] layout of `weight`). On Hopper the Gluon weight-gradient kernel writes it where it applies
    (`kernels.wgrad.gluon_fresh_ok`: 0.98-1.37x of cuBLAS's grouped GEMM), else cuBLAS's grouped GEMM."""
    from comet_megatron.kernels.wgrad import gluon_fresh_ok, grouped_wgrad

    rows = ExpertRows.of(counts)
    if gluon_fresh_ok(grad_y, x, out_dtype):  # (False off CUDA)
        return grouped_wgrad(grad_y, x, rows.device_offsets(x.device), backend="gluon", out_dtype=out_dtype,
                             _checked=True)
    if _grouped_mm_shape_ok(x, grad_y.shape[-1]):
        offs = rows.device_offsets(x.device, leading_zero=False)
        return torch._grouped_mm(grad_y.t(), x, offs=offs).to(out_dtype)
    pairs = zip(torch.split(grad_y, rows.host()), torch.split(x, rows.host()))
    return torch.stack([(gy.t() @ xe).to(out_dtype) for gy, xe in pairs])


# Expert weight gradients straight into Megatron's fp32 main_grad, no bf16 gradient written and read back:
# * "gemm": one cuBLAS GEMM per expert with beta = 1, where the experts are few and large (per-expert GEMMs of
#   a few rows would lose to one grouped GEMM): compute-bound, cuBLAS's GEMMs are the fastest there;
# * "triton": `kernels.wgrad.grouped_wgrad_accumulate`, one launch for all experts, for many or small experts on
#   a GPU: with few rows per expert the work is the read + write of fp32 main_grad, which it does at up to 2.45
#   TB/s on an H100 against 1.8 TB/s for the grouped GEMM + add (1.23-1.39x on Qwen2-MoE at 2048-8192 tokens,
#   1.14-1.19x on Phi-3.5-MoE at 2048; docs/BENCHMARKS.md);
# * "gluon": `kernels.gluon_wgrad.grouped_wgrad_ws` (Hopper): the same sums by a persistent warp-specialised
#   kernel whose epilogue warps read, add and write main_grad while its MMA warpgroup runs the next tile. H100,
#   examples/bench_wgrad.py --rows routed (docs/BENCHMARKS.md, fourteenth session): adding, 1.02-1.21x over the
#   pick before it from 192 to 768 mean rows per expert (Mixtral / Phi-3.5-MoE / Qwen2-MoE), behind from 1024
#   (cuBLAS) and 0.94-0.99x of the Triton kernel at ~136; writing, 1.20-1.47x over the Triton kernel wherever that was
#   the pick, behind the per-expert cuBLAS GEMMs wherever those were. Fifteenth session: 16-byte main_grad
#   accesses and, from 384 mean rows per expert, two MMA warpgroups on 128 x 256 tiles: adding, Mixtral 1.15-1.17x
#   of cuBLAS at 512 rows and 1.05-1.13x at 1024 (the route's bound moved to 1024), 0.96-1.03x at 2048; writing
#   level with cuBLAS's per-expert GEMMs for Mixtral / Phi-3.5-MoE (0.92-1.03x: those keep them);
# * "add": the grouped GEMM to a bf16 stacked gradient, added into main_grad (`hand_to_main_grads`): many experts
#   with many rows each (compute-bound), or where neither kernel can run.
# In a step's first micro-batch (`main_grads_zeroed`) both kernels only write main_grad, and the per-expert cuBLAS
# GEMMs (beta = 0) pull ahead from fewer rows: H100, examples/bench_wgrad.py --overwrite (docs/BENCHMARKS.md,
# eleventh session): Phi-3.5-MoE at 2048 tokens (16 experts, 256 rows each) 1.24x / 1.30x (fc1 / fc2) faster than
# the Triton kernel, Mixtral 1.29x / 1.59x; while adding, the Triton kernel is 1.03-1.05x ahead on Phi-3.5-MoE there.
FUSED_WGRAD_MAX_EXPERTS = 16
# mean rows per expert. With rows split evenly the Triton kernel with its TMA epilogue ran 1.03-1.11x ahead of
# cuBLAS at 512 rows (examples/bench_wgrad.py), but with routed (uneven) rows, and inside the layer, cuBLAS was
# ahead there with either epilogue (layer: Mixtral at 2048 tokens 11.49 ms against 12.19 / 12.76, Phi-3.5-MoE at
# 4096 10.66 against 11.24 / 11.48; docs/BENCHMARKS.md, twelfth session)
FUSED_WGRAD_MIN_ROWS = 512
FUSED_WGRAD_MIN_ROWS_OVERWRITE = 256
# Above this many mean rows per expert the weight gradient is bound by its GEMM, where cuBLAS is faster than
# the Triton kernel (H100: even at 1024 on Qwen2-MoE, 0.6-0.67x at 2048 on Phi-3.5-MoE / Mixtral)
TRITON_WGRAD_MAX_ROWS = 1024
# the Gluon kernel when adding: from / up to this many mean rows per expert (see above; up to 1024 since its
# two-warpgroup tiles, fifteenth session: Mixtral at 4096 tokens 1.05-1.13x of cuBLAS, at 8192 0.96-1.03x)
GLUON_WGRAD_ADD_ROWS = (192, 1024)
WGRAD_ACCUMULATION_MODES = ("auto", "gemm", "triton", "gluon", "add")


def auto_wgrad_route(experts: int, rows: int, overwrite: bool, gemm_ok: bool = True, triton_ok: bool = True,
                     gluon_ok: bool = False) -> str:
    """The measured choice (see above) for `experts` experts with `rows` rows in all on a GPU; `overwrite`: the
    gradients are written, not added (a step's first micro-batch); `gluon_ok`: the Hopper Gluon kernel can run."""
    min_rows = FUSED_WGRAD_MIN_ROWS_OVERWRITE if overwrite else FUSED_WGRAD_MIN_ROWS
    if gemm_ok and experts <= FUSED_WGRAD_MAX_EXPERTS and rows >= min_rows * experts:
        route = "gemm"
    else:
        route = "triton" if triton_ok and rows <= TRITON_WGRAD_MAX_ROWS * experts else "add"
    if gluon_ok and route != "add":
        lo, hi = GLUON_WGRAD_ADD_ROWS
        if (overwrite and route == "triton") or (not overwrite and lo * experts <= rows <= hi * experts):
            route = "gluon"
    return route


def _wgrad_accumulation(x: torch.Tensor, rows: int, mains, overwrite: bool = False) -> str:
    """How the weight gradients of len(mains) experts with `rows` rows in all (operands like `x`) reach
    `mains`: "gemm", "triton" or "add" (see above; `overwrite`: written, not added). `COMET_WGRAD_ACCUMULATION`
    forces one (A/B measurements, tests); a forced mode that cannot run here falls back to "add"."""
    how = os.environ.get("COMET_WGRAD_ACCUMULATION", "auto")
    if how not in WGRAD_ACCUMULATION_MODES:
        raise ValueError(f"COMET_WGRAD_ACCUMULATION={how!r}: use one of {', '.join(WGRAD_ACCUMULATION_MODES)}")
    experts = len(mains)
    if how == "add" or not experts:
        return "add"
    # bf16 operands into fp32 main_grad: CUDA's addmm with out_dtype; same dtypes: any device (forced)
    gemm_ok = not any(m.dtype != x.dtype and not (x.is_cuda and m.dtype == torch.float32) for m in mains)
    if how == "gemm":
        return "gemm" if gemm_ok else "add"
    triton_ok = _triton_wgrad_ok(x, mains)
    if how == "triton":
        return "triton" if triton_ok else "add"
    gluon_ok = triton_ok and _gluon_wgrad_ok(x)
    if how == "gluon":
        return "gluon" if gluon_ok else "add"
    if not x.is_cuda:
        return "add"
    return auto_wgrad_route(experts, rows, overwrite, gemm_ok, triton_ok, gluon_ok)


def _gluon_wgrad_ok(x: torch.Tensor) -> bool:
    """The Gluon weight-gradient kernel can run for operands like `x` (16-bit, a Hopper GPU with Gluon; the
    operands' TMA alignment is checked at the call, which falls back to the Triton kernel)."""
    from comet_megatron.kernels.gluon_gemm import gluon_unavailable

    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and gluon_unavailable(x.device) is None


def _triton_wgrad_ok(x: torch.Tensor, mains) -> bool:
    """The Triton kernel can add into `mains`: fp32, slices of one storage, on x's device; Triton runs (CUDA, or
    the interpreter)."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if mains[0].dtype != torch.float32 or mains[0].device != x.device:
        return False  # flat_mains: all of one dtype and device
    from comet_megatron.kernels.config import interpreter_bf16

    if interpreter_bf16(x.dtype):
        return False  # Triton's interpreter gets bf16 products wrong (kernels.config.INTERPRETER_BF16)
    return x.dtype in (torch.bfloat16, torch.float16, torch.float32) and flat_mains(mains) is not None


def accumulate_wgrad_gemms(mains, a: torch.Tensor, b: torch.Tensor, offsets: Sequence[int],
                           overwrite: bool = False) -> None:
    """main_grad[e] += a[rows_e]^T @ b[rows_e] for every expert (rows_e = offsets[e]:offsets[e + 1]),
    accumulated by the GEMM itself (cuBLAS, beta = 1; fp32 main_grad from bf16 operands). `overwrite`:
    main_grad[e] = the product (beta = 0: the GEMM does not read main_grad)."""
    beta = 0 if overwrite else 1
    for e, main in enumerate(mains):
        ae, be = a[offsets[e]:offsets[e + 1]], b[offsets[e]:offsets[e + 1]]
        if main.dtype == ae.dtype:
            main.addmm_(ae.t(), be, beta=beta)
        else:
            torch.addmm(main, ae.t(), be, beta=beta, out_dtype=main.dtype, out=main)


def accumulate_wgrad_triton(mains, a: torch.Tensor, b: torch.Tensor, device_offsets: torch.Tensor,
                            overwrite: bool = False) -> None:
    """The same sums as `accumulate_wgrad_gemms`, by one launch of `kernels.wgrad.grouped_wgrad_accumulate`
    (`device_offsets`: the [El + 1] row offsets on the GPU)."""
    from comet_megatron.kernels.wgrad import grouped_wgrad_accumulate, wgrad_accumulate_tiles

    base, out_offsets = flat_mains(mains)
    grouped_wgrad_accumulate(a, b, device_offsets, base, out_offsets, overwrite=overwrite,
                             out_rows=_tma_rows(mains, base), aligned=mains_aligned(mains),
                             **wgrad_accumulate_tiles(a))


def accumulate_wgrad_gluon(mains, a: torch.Tensor, b: torch.Tensor, device_offsets: torch.Tensor,
                           overwrite: bool = False) -> None:
    """The same sums by one launch of the warp-specialised Gluon kernel (`kernels.gluon_wgrad`, Hopper); operands
    it cannot take (TMA alignment) go to `accumulate_wgrad_triton`."""
    from comet_megatron.kernels.gluon_wgrad import grouped_wgrad_ws, gluon_wgrad_supported

    a, b = a.contiguous(), b.contiguous()
    if gluon_wgrad_supported(a, b, 256, 64) is not None:
        accumulate_wgrad_triton(mains, a, b, device_offsets, overwrite)
        return
    base, out_offsets = flat_mains(mains)
    grouped_wgrad_ws(a, b, device_offsets, base, out_offsets, overwrite=overwrite, aligned=mains_aligned(mains),
                     checked=True)


def mains_aligned(mains) -> bool:
    """Whether every main_grad starts on a 16-byte boundary with 16-byte rows (the weight-gradient kernels'
    `aligned`: 16-byte accesses to main_grad, 1.05-1.14x faster adding on an H100, docs/BENCHMARKS.md fifteenth
    session). Megatron's DDP buffers usually hold them so; an odd parameter size before them may not."""
    return all(m.data_ptr() % 16 == 0 and (m.dim() < 2 or (m.shape[-1] * m.element_size()) % 16 == 0)
               for m in mains)


_TMA_ROWS: dict = {}  # (device, data pointers, shape) -> kernels.wgrad.tma_output_rows(...) or None


def wgrad_tma_out() -> bool:
    """Whether the Triton weight-gradient kernel's tiles leave through its TMA epilogue (bulk reduce-add into
    `main_grad`, Hopper; a bulk store when writing): `COMET_WGRAD_TMA_OUT=1`. Off by default: alone
    (examples/bench_wgrad.py, H100) it ran 0.84-1.16x the register epilogue's speed when adding (slower on
    Qwen2-MoE at 2048 tokens) and 0.95-1.50x when writing, and inside the layer under DDP (`bench layer` A/B,
    docs/BENCHMARKS.md, twelfth session) from 5% slower (Mixtral at 2048 tokens, Phi-3.5-MoE at 4096) to 2.5%
    faster (Mixtral at 4096): the layer's uneven rows per expert end in partial blocks, which cost the TMA
    variant more (`examples/bench_wgrad.py --rows routed` shows it alone)."""
    mode = os.environ.get("COMET_WGRAD_TMA_OUT", "0")
    if mode not in ("0", "1"):
        raise ValueError(f"COMET_WGRAD_TMA_OUT={mode!r}: use 0 (register epilogue, the default) or 1 (TMA)")
    return mode == "1"


def _tma_rows(mains, base: torch.Tensor):
    """`kernels.wgrad.tma_output_rows` for `mains` (2-D, in `base` = flat_mains(mains)[0]) when the TMA
    epilogue is on (`wgrad_tma_out`), cached like flat_mains (one host-to-device copy per set of buffers)."""
    from comet_megatron.kernels import accumulate
    from comet_megatron.kernels.wgrad import tma_output_rows

    if not base.is_cuda or mains[0].dim() != 2 or not wgrad_tma_out():
        return None
    key = (str(base.device), tuple(map(torch.Tensor.data_ptr, mains)), tuple(mains[0].shape))
    hit = _TMA_ROWS.get(key, False)
    if hit is False:
        hit = tma_output_rows(base, accumulate.element_offsets(base, mains), *mains[0].shape)
        if len(_TMA_ROWS) >= 64:
            _TMA_ROWS.clear()
        _TMA_ROWS[key] = hit
    return hit


def main_grads_zeroed(params) -> bool:
    """Whether the `main_grad`s of `params` may be written instead of added to: every one of them is a
    parameter of Megatron's DDP whose `grad_added_to_main_grad` is False, i.e. DDP's `zero_grad_buffer()` (which
    zeroes the grad buffer and clears that flag, once per training step) ran and no gradient went into it since:
    the first micro-batch of a step. Every route by which the comet experts put a gradient into `main_grad`
    sets the flag (as Megatron's linear layers do with gradient-accumulation fusion), so later micro-batches,
    and a second use of the same weights in one micro-batch, add. Writing skips the read of the fp32 buffer:
    half the `main_grad` traffic of that backward. Never while a CUDA graph is being captured (a replay would
    write again whatever the flag says then). `COMET_MAIN_GRAD_OVERWRITE`: 1 (default), 0 (always add: A/B
    measurements, or a training loop that puts gradients into these `main_grad`s without setting the flag),
    check (verify that the buffers hold zeros before writing them, one host sync per linear: RuntimeError if not)."""
    mode = os.environ.get("COMET_MAIN_GRAD_OVERWRITE", "1")
    if mode not in ("0", "1", "check"):
        raise ValueError(f"COMET_MAIN_GRAD_OVERWRITE={mode!r}: use 1, 0 or check")
    if mode == "0" or not params:
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    if not all(getattr(p, "grad_added_to_main_grad", None) is False for p in params):
        return False
    if mode == "check":
        dirty = [i for i, p in enumerate(params) if bool(p.main_grad.any())]
        if dirty:
            raise RuntimeError(
                f"comet experts: the main_grad of expert weights {dirty} is not zero although "
                "grad_added_to_main_grad is False (DDP's zero_grad_buffer() marks the start of a step): something "
                "put a gradient there without setting the flag. Set COMET_MAIN_GRAD_OVERWRITE=0 to always add.")
    return True


def fused_wgrad_mains(params, a: torch.Tensor, rows: int):
    """(how, main_grads, overwrite) when the weight gradients of `params` (`rows` rows of `a` in all) should be
    accumulated straight into their `main_grad`s ("gemm", "triton" or "gluon", see above; `overwrite`: written, DDP
    having just zeroed them, `main_grads_zeroed`): under Megatron's DDP; else None (the caller hands a stacked
    gradient over). Use it at once: the verdict holds until a gradient goes into these `main_grad`s."""
    mains = _main_grads(params)
    if mains is None:
        return None
    overwrite = main_grads_zeroed(params)
    how = _wgrad_accumulation(a, rows, mains, overwrite)
    return None if how == "add" else (how, mains, overwrite)


def accumulate_into_mains(params, plan, a: torch.Tensor, b: torch.Tensor, offsets: Callable[[], Sequence[int]],
                          device_offsets: torch.Tensor) -> None:
    """dW[e] = a[rows_e]^T @ b[rows_e] added into the `main_grad`s of `plan` (from `fused_wgrad_mains`), or
    written there when DDP has just zeroed them (`main_grads_zeroed`); marked `grad_added_to_main_grad` (DDP's
    hooks then drop the placeholder gradients autograd gives them).
    `offsets()` gives the host row offsets (rows_e = offsets[e]:offsets[e + 1]); only the per-expert GEMMs ask
    for them, the Triton kernel reads `device_offsets` on the GPU."""
    how, mains, overwrite = plan
    if how == "gemm":
        accumulate_wgrad_gemms(mains, a, b, offsets(), overwrite)
    elif how == "gluon":
        accumulate_wgrad_gluon(mains, a, b, device_offsets, overwrite)
    else:
        accumulate_wgrad_triton(mains, a, b, device_offsets, overwrite)
    for p in params:
        p.grad_added_to_main_grad = True


class _GroupedLinear(torch.autograd.Function):
    """`grouped_linear(x, stack(params), counts)` with the experts' weights as separate inputs.

    Backward: the input gradient as a grouped GEMM; the weight gradients as one grouped GEMM handed to the
    parameters (under Megatron's DDP into their `main_grad`s in one launch, `hand_to_main_grads`), or, under
    DDP with few large experts, accumulated into `main_grad` by per-expert GEMMs (what Megatron's linear
    layers do with gradient-accumulation fusion): no bf16 gradient is written and read back."""

    @staticmethod
    def forward(ctx, x, counts, *params):
        ctx.counts, ctx.params = counts, params
        ctx.save_for_backward(x)
        weight, rev = expert_weights(params, x.shape[0])
        return grouped_linear(x, weight, counts, rev)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        params, counts = ctx.params, ExpertRows.of(ctx.counts)
        grad_y = grad_y.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight, rev = expert_weights(params, x.shape[0])
            grad_x = grouped_linear(grad_y, weight.transpose(-2, -1), counts, rev)
        if not any(ctx.needs_input_grad[2:]):
            return (grad_x, None) + (None,) * len(params)
        plan = fused_wgrad_mains(params, grad_y, x.shape[0])
        if plan is not None:
            accumulate_into_mains(params, plan, grad_y, x, counts.offsets, counts.device_offsets(x.device))
            # placeholders for DDP's hooks, which drop them (one allocation, never written)
            return (grad_x, None) + torch.empty_like(params[0]).expand(len(params), *params[0].shape).unbind(0)
        grad_w = grouped_linear_wgrad(grad_y, x, counts, params[0].dtype)
        hand_to_main_grads(params, grad_w)
        return (grad_x, None) + grad_w.unbind(0)


class _GroupedLinearDelayedWgrad(torch.autograd.Function):
    """`grouped_linear(x, weight, counts)` whose backward computes the input gradient only and hands
    (x, grad_y, weight dtype) to `keep`; `CometGroupedMLP.backward_dw` computes the weight gradient
    later.

    `weight` is detached (the parameters get no gradient from autograd); `anchor`, a leaf that
    requires grad, keeps the node in the graph when `x` needs no gradient."""

    @staticmethod
    def forward(ctx, x, weight, anchor, counts, keep, reversed_experts=False):
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.keep, ctx.reversed_experts = counts, keep, reversed_experts
        return grouped_linear(x, weight, counts, reversed_experts)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        # detached: the forward graph is not kept alive until backward_dw
        ctx.keep(x.detach(), grad_y, weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_linear(grad_y, weight.transpose(-2, -1), ctx.counts, ctx.reversed_experts)
        return grad_x, None, None, None, None, None


class _ReferenceWgrads:
    """What one reference-path forward's weight gradients need, per backward pass over it.

    In every backward pass fc2's node runs before fc1's (fc1's output gradient comes through fc2):
    fc2's opens an entry at the end of the experts' FIFO, fc1's completes it."""

    def __init__(self, experts: CometGroupedMLP, counts: ExpertRows):
        self.experts, self.counts = experts, counts
        self.entry: dict | None = None

    def keep_fc2(self, h, grad_y, dtype):
        self.entry = {"fc2": (grad_y, h, dtype)}
        self.experts.defer_wgrad(functools.partial(self._weight_grads, self.entry))

    def keep_fc1(self, x, grad_y, dtype):
        if self.entry is None:
            raise RuntimeError("comet experts: fc1 backward without fc2 backward (delayed wgrad)")
        self.entry["fc1"] = (grad_y, x, dtype)
        self.entry = None

    def _weight_grads(self, entry):
        if "fc1" not in entry:
            raise RuntimeError(
                "comet experts: backward_dw() ran before the backward pass of this micro-batch "
                "reached the experts' first linear layer; call it after the layer's backward."
            )
        (g1, x, t1), (g2, h, t2) = entry.pop("fc1"), entry.pop("fc2")
        return grouped_linear_wgrad(g1, x, self.counts, t1), grouped_linear_wgrad(g2, h, self.counts, t2)


def _accumulate_wgrad(param: torch.nn.Parameter, grad: torch.Tensor, ddp_hooks: bool,
                      added: bool = False, overwrite: bool = False) -> None:
    """Add a delayed weight gradient where Megatron keeps it (`added`: already in `main_grad`).

    Megatron DDP (the parameter has `main_grad`): into `main_grad`, marked with
    `grad_added_to_main_grad` as Megatron's own linear layers do with gradient-accumulation fusion,
    so DDP's grad-ready hook does not add it a second time; when such hooks are registered, a
    placeholder `param.grad` (which the hook drops) satisfies their `param.grad is not None` check
    under --overlap-grad-reduce (`overwrite`: written, DDP having just zeroed it, `main_grads_zeroed`).
    Otherwise: into `param.grad`, as autograd would."""
    if not param.requires_grad:
        return
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        if not added:
            (main_grad.copy_ if overwrite else main_grad.add_)(grad)
        if hasattr(param, "grad_added_to_main_grad"):
            param.grad_added_to_main_grad = True
            if ddp_hooks and param.grad is None:
                param.grad = torch.zeros_like(grad) if getattr(param, "zero_out_wgrad", False) else grad
    elif param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


def _add_delayed_into_main_grads(params, grad: torch.Tensor, overwrite: bool = False) -> bool:
    """A delayed stacked weight gradient into every parameter's `main_grad` at once (one Triton launch, else
    torch's foreach add) when all of them are trainable and have one; True when done."""
    mains = [getattr(p, "main_grad", None) for p in params]
    if any(m is None or m.shape != p.shape or not p.requires_grad for m, p in zip(mains, params)):
        return False
    _add_into(mains, grad, overwrite)
    return True


def activation(config, pre: torch.Tensor) -> torch.Tensor:
    """Megatron MLP's activation (optionally gated), exactly as `MLP.forward` computes it."""
    if config.gated_linear_unit:
        x_glu, x_linear = torch.chunk(pre, 2, dim=-1)
        clamp = config.activation_func_clamp_value
        if clamp is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
    return config.activation_func(pre)


TRITON_PASS_MODES = ("auto", "triton", "torch")


def triton_pass(env: str, x: torch.Tensor) -> bool:
    """Whether an elementwise Triton pass of the reference path (switch `env`) runs on tensors like `x`: auto
    (on CUDA), triton (also in Triton's interpreter: CPU tests), torch (never; PyTorch's ops)."""
    how = os.environ.get(env, "auto")
    if how not in TRITON_PASS_MODES:
        raise ValueError(f"{env}={how!r}: use one of {', '.join(TRITON_PASS_MODES)}")
    if how == "torch" or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return x.is_cuda or (how == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


def _fused_activation(config, pre: torch.Tensor) -> str | None:
    """The kernels' activation name when `activation_with_probs` runs `kernels.activation` on `pre`
    (`COMET_FUSED_ACTIVATION`, `triton_pass`), else None."""
    if not triton_pass("COMET_FUSED_ACTIVATION", pre):
        return None
    from comet_megatron.fused import ACTIVATION_NAMES

    name = ACTIVATION_NAMES.get(config.activation_func)
    if name is None or config.activation_func_clamp_value is not None:
        return None
    if config.gated_linear_unit and config.glu_linear_offset != 0.0:
        return None
    return name


def activation_with_probs(config, pre: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(activation(config, pre) * probs) in pre's dtype, `probs` [R, 1]: Megatron MLP's activation with its
    `per_token_scale`. On a GPU one Triton pass each way (`kernels.activation`, fp32 inside, one rounding)
    instead of ~8 PyTorch passes over [R, F] tensors; the same values within bf16 rounding."""
    name = _fused_activation(config, pre)
    if name is None:
        h = activation(config, pre)
        return (h * probs).to(h.dtype)
    return _ActivationWithProbs.apply(pre, probs, name, bool(config.gated_linear_unit))


class _ActivationWithProbs(torch.autograd.Function):
    """hp = act(pre) (* up) * p by `kernels.activation` (saves pre and p only)."""

    @staticmethod
    def forward(ctx, pre, probs, name, gated):
        from comet_megatron.kernels.activation import activation_forward

        pre = pre.contiguous()
        prob = probs.reshape(-1).contiguous()
        ctx.save_for_backward(pre, prob)
        ctx.name, ctx.gated, ctx.probs_shape, ctx.probs_dtype = name, gated, probs.shape, probs.dtype
        return activation_forward(pre, prob, activation=name, gated=gated)

    @staticmethod
    def backward(ctx, dhp):
        from comet_megatron.kernels.activation import activation_prob_backward

        pre, prob = ctx.saved_tensors
        d_pre, grad_prob = activation_prob_backward(dhp.contiguous(), pre, prob, activation=ctx.name,
                                                    gated=ctx.gated)
        grad_probs = grad_prob.to(ctx.probs_dtype).reshape(ctx.probs_shape) if ctx.needs_input_grad[1] else None
        return d_pre, grad_probs, None, None


def is_swiglu(config) -> bool:
    return bool(config.gated_linear_unit) and config.activation_func is F.silu


_MAINS: dict = {}  # params' ids -> (their main_grads' ids, verdict): see _main_grads


def _main_grads(params) -> list[torch.Tensor] | None:
    """The `main_grad` buffers of `params` when ALL of them are trainable parameters of Megatron's
    DistributedDataParallel whose grad-ready hook runs in autograd (it sets `grad_added_to_main_grad`
    and registers a hook that adds `param.grad` into `main_grad` unless that flag is set), else None.
    Runs twice per expert linear and call: the full check is cached per (parameters, main_grad tensors,
    requires_grad flags), which a re-created DDP or a frozen expert changes."""
    if os.environ.get("COMET_MAIN_GRAD_HANDOFF", "1") == "0":  # A/B switch for benchmarks
        return None
    mains = [getattr(p, "main_grad", None) for p in params]
    key = tuple(map(id, params))
    stamp = (tuple(map(id, mains)), tuple(p.requires_grad for p in params))
    hit = _MAINS.get(key)
    if hit is not None and hit[0] == stamp:
        return mains if hit[1] else None
    ok = all(
        main is not None and p.requires_grad and hasattr(p, "grad_added_to_main_grad")
        and not getattr(p, "zero_out_wgrad", False) and not getattr(p, "skip_backward_post_hook", False)
        and main.shape == p.shape
        for p, main in zip(params, mains)
    )
    if len(_MAINS) >= 256:  # layers re-created many times (tests): start over
        _MAINS.clear()
    _MAINS[key] = (stamp, ok)
    return mains if ok else None


def hand_to_main_grads(params, grad: torch.Tensor) -> bool:
    """Add the stacked weight gradient `grad` [G, ...] of `params` into their Megatron `main_grad`s in
    one multi-tensor operation and mark them `grad_added_to_main_grad` (as Megatron's linear layers do
    with gradient-accumulation fusion), so that DDP's per-parameter hook only drops the placeholder
    gradient autograd gives it. Returns False (nothing done) when the parameters are not all under
    Megatron's DDP; the caller then hands the slices to autograd as usual.

    Without this, each of the G parameters gets its slice through autograd, and DDP's Python hook adds
    it into `main_grad` with one kernel launch per parameter (2 x 64 per Qwen2-MoE layer)."""
    mains = _main_grads(params)
    if mains is None:
        return False
    _add_into(mains, grad, main_grads_zeroed(params))
    for p in params:
        p.grad_added_to_main_grad = True
    return True


def _add_into(mains, grad: torch.Tensor, overwrite: bool = False) -> None:
    """mains[g] += grad[g] (`overwrite`: = grad[g]): one Triton launch where it can run, else torch's foreach
    add (copy)."""
    if not _accumulate_in_one_launch(mains, grad, overwrite):
        (torch._foreach_copy_ if overwrite else torch._foreach_add_)(mains, list(grad.unbind(0)))


_FLAT: dict = {}  # (device, dtype, numel, data pointers) -> (flat base, int64 element offsets) or None


def flat_mains(mains):
    """(flat view over the storage of `mains`, int64 device tensor of their element offsets in it), or None
    when they do not lie in one storage (`kernels.accumulate.flat_base`). Cached by the buffers' addresses:
    DDP's buffers do not move, and a cached view keeps its storage alive, so no other buffer can take those
    addresses while the entry lives."""
    from comet_megatron.kernels import accumulate

    first = mains[0]
    key = (str(first.device), first.dtype, first.numel(), tuple(map(torch.Tensor.data_ptr, mains)),
           all(map(torch.Tensor.is_contiguous, mains)))
    hit = _FLAT.get(key, False)
    if hit is False:
        base = accumulate.flat_base(mains)
        hit = None
        if base is not None:
            offsets = torch.tensor(accumulate.element_offsets(base, mains), dtype=torch.int64, device=base.device)
            hit = (base, offsets)
        if len(_FLAT) >= 64:  # buffers re-created many times (tests): start over
            _FLAT.clear()
        _FLAT[key] = hit
    return hit


def _accumulate_in_one_launch(mains, grad: torch.Tensor, overwrite: bool = False) -> bool:
    """`kernels.accumulate` when the main_grads share one storage (Megatron's grad buffer) and Triton can
    run here (CUDA, or the interpreter); False otherwise (the caller falls back to torch's foreach add)."""
    from comet_megatron.kernels import accumulate

    if not (grad.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or grad.device != mains[0].device:
        return False
    flat = flat_mains(mains)
    if flat is None or mains[0].numel() * len(mains) != grad.numel():
        return False
    accumulate.accumulate_into(flat[0], flat[1], grad, overwrite)
    return True


class WgradHandoff:
    """Shared by one forward's stacked weight views and the function that computes their gradients: `done`
    says that the gradients already went into `main_grad` (the incoming gradients are placeholders)."""

    __slots__ = ("done", "params")

    def __init__(self, params):
        self.done = False
        self.params = params  # ([fc1 weights], [fc2 weights]) for the function computing their gradients


class _StackedView(torch.autograd.Function):
    """[G, ...] view over G equally shaped parameters evenly spaced in one storage (`_layout`'s step: back to
    back as `CometGroupedMLP` allocates them, or descending as Megatron's distributed optimizer re-homes them,
    in which case the view holds them in reversed order: view[i] = params[G-1-i]).

    Backward hands each parameter its slice of the stacked gradient: no copy either way. Under Megatron's
    DDP the gradient goes into the parameters' `main_grad`s in one multi-tensor add instead
    (`hand_to_main_grads`); the slices still reach autograd, as the placeholders DDP's hooks expect
    (they drop them: `grad_added_to_main_grad`)."""

    @staticmethod
    def forward(ctx, handoff, step, *params):
        ctx.params, ctx.handoff, ctx.reversed = params, handoff, step < 0
        base = params[-1] if step < 0 else params[0]
        return base.as_strided((len(params), *base.shape), (abs(step), *base.stride()))

    @staticmethod
    def backward(ctx, grad):
        in_view_order = ctx.params[::-1] if ctx.reversed else ctx.params
        if ctx.handoff is None or not ctx.handoff.done:
            hand_to_main_grads(in_view_order, grad)
        slices = grad.unbind(0)
        return (None, None) + tuple(slices[::-1] if ctx.reversed else slices)


_LAYOUT: dict = {}  # (params' ids, data pointers) -> _layout(params)


def _layout(params) -> int | None:
    """Element distance d between consecutive `params` when they are equally shaped, of one dtype, contiguous,
    inside one storage and evenly spaced by at least their size (d = numel: back to back, as `CometGroupedMLP`
    allocates them; d < 0: descending, as Megatron's distributed optimizer re-homes them), else None. Runs
    several times per call: cached per (parameters, data pointers), which moving a parameter changes."""
    key = (tuple(map(id, params)), tuple(map(torch.Tensor.data_ptr, params)))
    if key not in _LAYOUT:
        if len(_LAYOUT) >= 256:
            _LAYOUT.clear()
        _LAYOUT[key] = _check_layout(params)
    return _LAYOUT[key]


def _check_layout(params) -> int | None:
    first = params[0]
    if not first.is_contiguous():
        return None
    shape, dtype, size = first.shape, first.dtype, first.element_size()
    storage = first.untyped_storage()
    if any(p.shape != shape or p.dtype != dtype or not p.is_contiguous()
           or p.untyped_storage().data_ptr() != storage.data_ptr() for p in params):
        return None
    if len(params) == 1:
        return first.numel()
    step_bytes = params[1].data_ptr() - first.data_ptr()
    if step_bytes % size:
        return None
    step = step_bytes // size
    if abs(step) < first.numel():
        return None
    if any(p.data_ptr() != first.data_ptr() + i * step_bytes for i, p in enumerate(params)):
        return None
    low = min(first.data_ptr(), params[-1].data_ptr())
    return step if low >= storage.data_ptr() and (
        low - storage.data_ptr() + ((len(params) - 1) * abs(step) + first.numel()) * size <= storage.nbytes()) else None


def _descending(params) -> bool:
    """Whether `params` are evenly spaced in descending order (`_layout`), as Megatron's distributed optimizer
    re-homes them: reversed, `params[::-1]` is one ascending view."""
    step = _layout(params)
    return step is not None and step < 0 and len(params) > 1


def _back_to_back(params) -> bool:
    """Whether `params` lie one after the other in one storage (`_layout`): one [G, ...] view covers them."""
    return _layout(params) == params[0].numel()


def expert_weights(params, rows: int = 0) -> tuple[torch.Tensor, bool]:
    """(weight [G, out, in], reversed_experts) for `grouped_linear` outside autograd: a view over the
    parameters when they are evenly spaced in ascending order; when descending (Megatron's distributed
    optimizer), a view in reversed expert order where flipping `rows` input and output rows costs less
    traffic than copying the weights; else a copy (said once)."""
    step = _layout(params)
    first = params[0]
    if step is not None and step > 0:
        return first.as_strided((len(params), *first.shape), (step, *first.stride())), False
    if step is not None and rows * sum(first.shape) < len(params) * first.numel():
        last = params[-1]
        return last.as_strided((len(params), *last.shape), (-step, *last.stride())), True
    _warn_copy(params)
    return torch.stack([p.detach() for p in params]), False


_WARNED_COPIES: set = set()  # parameter-id tuples already warned about (once per set of weights)


def _warn_copy(params) -> None:
    """Say once per set of expert weights that they are copied on every call (the view needs them back to back)."""
    key = tuple(map(id, params))
    if key in _WARNED_COPIES:
        return
    _WARNED_COPIES.add(key)
    first = params[0]
    mib = len(params) * first.numel() * first.element_size() / 2**20
    log.warning(
        "comet: %d expert weights of shape %s do not lie back to back in memory, so every forward and backward "
        "copies them into one [experts, ...] tensor for the grouped GEMMs (%.0f MiB per copy). Evenly spaced "
        "weights in either order (as allocated, or as Megatron's distributed optimizer re-homes them) are read "
        "in place; these are not: something re-homed them unevenly or into several buffers. Correct, but "
        "slower and a copy's worth of memory per layer until its backward.",
        len(params), tuple(first.shape), mib)


def stack_weight_views(params, handoff: WgradHandoff | None = None) -> tuple[torch.Tensor, bool]:
    """(differentiable [G, ...] stack, reversed) of `params`: a view when they are evenly spaced in one storage,
    in ascending order (as `CometGroupedMLP` allocates them) or descending (as Megatron's distributed optimizer
    re-homes them; reversed: view[i] = params[G-1-i]), for kernels that read the experts in either order; else a
    copy in expert order (said once). The copy's backward hands the slices to autograd as they come: where
    `handoff` says they are placeholders, the gradients are already in `main_grad` and DDP's hooks drop them
    (`grad_added_to_main_grad`)."""
    step = _layout(params)
    if step is not None:
        return _StackedView.apply(handoff, step, *params), step < 0
    _warn_copy(params)
    return torch.stack(list(params)), False


class CometGroupedMLP(SequentialMLP):
    """SequentialMLP's parameters and checkpoint layout; grouped-GEMM forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Put each linear's expert weights back to back in one storage, so that the grouped
        # GEMMs read them as one [El, out, in] tensor without a per-call copy.
        for linear in ("linear_fc1", "linear_fc2"):
            params = [getattr(e, linear).weight for e in self.local_experts]
            stacked = torch.stack([p.detach() for p in params])
            for i, p in enumerate(params):
                p.data = stacked[i]
        # Delayed weight gradients (config.delay_wgrad_compute): FIFO of pending micro-batches,
        # each a callable returning (dW1 [El, F1, H], dW2 [El, H, F]); and the grad-ready hooks
        # Megatron's DDP registers through `register_wgrad_accumulation_and_reduce_hooks`.
        self._pending_wgrads: collections.deque[Callable] = collections.deque()
        self._wgrad_hooks: list[Callable] = []
        self._warned_no_ddp_hooks = False
        if getattr(self.config, "delay_wgrad_compute", False):
            for expert in self.local_experts:
                for linear in (expert.linear_fc1, expert.linear_fc2):
                    if hasattr(linear, "register_wgrad_accumulation_and_reduce_hooks"):
                        raise CometConfigError(
                            "--delay-wgrad-compute with --moe-token-dispatcher-type comet: the "
                            f"expert linears are {type(linear).__name__} (Transformer Engine), which "
                            "would defer their own weight gradients too; use --moe-grouped-gemm "
                            "(comet then holds the expert weights in Megatron's local linears) or "
                            "the local layer spec"
                        )
            # Megatron's DDP (with DistributedDataParallelConfig.delay_wgrad_compute) then
            # registers these parameters' grad-ready hooks on this module instead of on autograd.
            for param in self._expert_weights():
                param.skip_backward_post_hook = True

    # ------------------------------------------------------------------ delayed weight gradients
    def _expert_weights(self) -> list[torch.nn.Parameter]:
        return [getattr(e, linear).weight
                for linear in ("linear_fc1", "linear_fc2") for e in self.local_experts]

    def delays_wgrad(self) -> bool:
        """Whether the current forward defers the expert weight gradients to `backward_dw()`."""
        return (
            bool(getattr(self.config, "delay_wgrad_compute", False))
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in self._expert_weights())
        )

    def delayed_fc_weights(self):
        """(w1, w2, anchor, (w1 reversed, w2 reversed)) for a delayed-wgrad forward: the stacked weight views
        detached from autograd (`stack_weight_views`: in reversed expert order under the distributed optimizer's
        layout, no copy), and a fresh leaf that requires grad to keep the experts' backward in the graph."""
        with torch.no_grad():
            (w1, rev1), (w2, rev2) = self.fc_weight_views()
        anchor = torch.empty(0, device=w1.device, dtype=w1.dtype, requires_grad=True)
        return w1, w2, anchor, (rev1, rev2)

    def defer_wgrad(self, weight_grads: Callable) -> None:
        """Queue one micro-batch's weight gradients (called from the experts' backward)."""
        self._pending_wgrads.append(weight_grads)

    @property
    def pending_wgrads(self) -> int:
        """Micro-batches whose backward ran but whose weight gradients `backward_dw()` has not computed."""
        return len(self._pending_wgrads)

    def register_wgrad_accumulation_and_reduce_hooks(self, hook: Callable) -> None:
        """Megatron DDP's entry point for parameters marked `skip_backward_post_hook` (as with
        Transformer Engine's linears): `hook` runs after every `backward_dw()` that produced
        gradients, and tells DDP that they are in `main_grad` (grad-ready / bucket reduce)."""
        self._wgrad_hooks.append(hook)

    def backward_dw(self) -> bool:
        """Compute the expert weight gradients of the oldest pending backward pass (FIFO).

        Megatron's `MoELayer.backward_dw(routed_experts=True)` calls this once after each backward
        pass over the layer. The gradients go into `param.main_grad` under Megatron DDP, else into
        `param.grad`; then DDP's registered hooks run. With nothing pending (delay off, or every
        backward already processed) it does nothing and returns False, as Transformer Engine's
        `GroupedLinear.backward_dw` does on an empty queue."""
        if not self._pending_wgrads:
            return False
        hooks = bool(self._wgrad_hooks)
        with torch.no_grad():
            dw1, dw2 = self._pending_wgrads.popleft()()
            for linear, dw in (("linear_fc2", dw2), ("linear_fc1", dw1)):
                params = [getattr(expert, linear).weight for expert in self.local_experts]
                zeroed = main_grads_zeroed(params)  # before any of them is marked
                added = _add_delayed_into_main_grads(params, dw, zeroed)
                for param, grad in zip(params, dw.unbind(0)):
                    _accumulate_wgrad(param, grad, hooks, added, zeroed)
        if not hooks and not self._warned_no_ddp_hooks and any(
            hasattr(p, "grad_added_to_main_grad") for p in self._expert_weights()
        ):
            self._warned_no_ddp_hooks = True
            log.warning(
                "comet: delayed expert weight gradients went into main_grad, but Megatron's DDP "
                "registered no grad-ready hooks for them: set DistributedDataParallelConfig("
                "delay_wgrad_compute=True) (Megatron's --delay-wgrad-compute does), or "
                "--overlap-grad-reduce will not see these gradients"
            )
        for hook in self._wgrad_hooks:
            hook()
        return True

    def wait_for_weights(self) -> None:
        """Run the forward pre-hooks of the expert linears, whose own forward the grouped GEMMs bypass. Megatron's
        DDP registers one on every module under `--overlap-param-gather` (distributed optimizer) to wait for the
        all-gather of that module's parameters: without this a forward would read expert weights whose gather
        may still be in flight, and the bucket's gather would never be waited for. Called once per forward by
        both paths before they read the weights; a handful of dict lookups when no hook is registered."""
        for expert in self.local_experts._modules.values():
            for name in ("linear_fc1", "linear_fc2"):
                linear = expert._modules.get(name)
                hooks = linear._forward_pre_hooks if linear is not None else None
                if not hooks:
                    continue
                with_kwargs = linear._forward_pre_hooks_with_kwargs
                for hook_id, hook in tuple(hooks.items()):
                    if hook_id in with_kwargs:
                        hook(linear, (), {})
                    else:
                        hook(linear, ())

    def fc_weight_views(self, handoff: WgradHandoff | None = None):
        """((w1 [El, F1, H], reversed), (w2 [El, H, F], reversed)): `stack_weight_views` of each linear's
        expert weights (those of `handoff` when given), for the fused kernels (which read a reversed view in
        place)."""
        p1, p2 = handoff.params if handoff is not None else self.fc_params()
        return stack_weight_views(p1, handoff), stack_weight_views(p2, handoff)

    def fc_params(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """([fc1 weights], [fc2 weights]) of the local experts, read on every call: through the modules'
        registries (`_modules` / `_parameters`, what `nn.Module.__getattr__` looks up, without its per-access
        cost: 240 lookups per call on a 60-expert layer), attribute access where a weight is not a registered
        parameter (a wrapper's property)."""
        w1, w2 = [], []
        for expert in self.local_experts._modules.values():
            for out, name in ((w1, "linear_fc1"), (w2, "linear_fc2")):
                linear = expert._modules.get(name) or getattr(expert, name)
                weight = linear._parameters.get("weight")
                out.append(weight if weight is not None else linear.weight)
        return w1, w2

    def fc_biases(self):
        first = self.local_experts[0]
        if first.linear_fc1.bias is None and first.linear_fc2.bias is None:  # biases come with every expert or none
            return None, None
        b1 = [e.linear_fc1.bias for e in self.local_experts]
        b2 = [e.linear_fc2.bias for e in self.local_experts]
        b1 = torch.stack(b1) if b1[0] is not None else None
        b2 = torch.stack(b2) if b2[0] is not None else None
        return b1, b2

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        self.wait_for_weights()
        x = permuted_local_hidden_states
        # host counts, or device counts (comet's dispatcher at EP size 1: no host sync unless a fallback asks)
        counts = ExpertRows(tokens_per_expert, rows=x.shape[0])
        probs = permuted_probs.unsqueeze(-1)
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1")
            x = (probs * x).to(x.dtype)
            probs = torch.ones_like(probs)
        b1, b2 = self.fc_biases()
        flipped = False
        if self.delays_wgrad():  # weight gradients in backward_dw()
            # weight views in reversed expert order under the distributed optimizer's layout: rows flipped around
            # each GEMM (the kept rows stay in expert order for backward_dw)
            w1, w2, anchor, (rev1, rev2) = self.delayed_fc_weights()
            wgrads = _ReferenceWgrads(self, counts)

            def fc1(t):
                return _GroupedLinearDelayedWgrad.apply(t, w1, anchor, counts, wgrads.keep_fc1, rev1)

            def fc2(t):
                return _GroupedLinearDelayedWgrad.apply(t, w2, anchor, counts, wgrads.keep_fc2, rev2)
        else:
            p1, p2 = self.fc_params()
            if _descending(p1) and _descending(p2):
                # Megatron's distributed optimizer stores the experts in descending order: run them in that
                # order, the rows flipped upside down once here and back at the end (rather than around every
                # GEMM: 2 x hidden elements per row each way instead of 2 x hidden + 3 x ffn), the weights
                # then read as one ascending view
                x, probs, counts, flipped = x.flip(0), probs.flip(0), counts.reversed(), True
                p1, p2 = p1[::-1], p2[::-1]
                b1, b2 = (b.flip(0) if b is not None else None for b in (b1, b2))

            def fc1(t):
                return _GroupedLinear.apply(t, counts, *p1)

            def fc2(t):
                return _GroupedLinear.apply(t, counts, *p2)
        pre = fc1(x)
        if b1 is not None:
            pre = pre + _per_row(b1, counts)
        h = activation_with_probs(self.config, pre, probs)
        y = fc2(h)
        if b2 is not None:
            y = (y + _per_row(b2, counts) * probs).to(y.dtype)
        return (y.flip(0) if flipped else y), None


def _per_row(bias: torch.Tensor, counts: ExpertRows) -> torch.Tensor:
    """Expand per-expert biases [G, N] to one row per token [M, N]."""
    idx = torch.repeat_interleave(
        torch.arange(len(counts), device=bias.device),
        torch.tensor(counts.host(), device=bias.device),
    )
    return bias.index_select(0, idx)
