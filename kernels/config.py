"""Launch knobs of the fused kernels: `KernelConfig` and the defaults derived from the device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class KernelConfig:
    """Every launch knob of one MoE round (see docs/KERNELS.md, "Knobs").

    block_m is the receive layout's M-tile (shared by both layers and the backward round); program
    counts left at None are chosen by `default_programs`.
    """

    activation: str = "silu"
    gated: bool = True
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    block_h: int = 128
    num_comm_dispatch: int | None = None
    num_comm_combine: int | None = None
    num_compute: int | None = None
    trace: bool = False
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # dispatch_gemm: tiles that sweep the column blocks together (L2 reuse of weights)
    group_n: int = 8  # gemm_combine: column chunks per super-chunk (L2 reuse of the A rows)
    combine_block_n: int | None = None  # gemm_combine's column chunk (None: block_n)
    combine_num_stages: int | None = None  # gemm_combine's pipeline depth (None: num_stages)
    bwd_block_n: int | None = None  # dispatch_gemm_backward's column block (None: block_n)
    bwd_num_stages: int | None = None  # dispatch_gemm_backward's pipeline depth (None: num_stages)
    pre_reduce: bool = False  # gemm_combine sums rows of one token that met on a rank before sending
    fused_act_backward: bool = False  # activation backward in the GEMM epilogue, or a separate pass after it
    bwd_epilogue_n: int = 64  # fused activation backward: columns per epilogue sub-block (bwd block / 1..8)
    # Epilogues on column sub-blocks (1, 2, 4 or 8 per block; None: the whole block). 32 for the forward and
    # gemm_combine: on an H100 layer 0's forward 1.02-1.13x (no more spills), gemm_combine up to 1.03x, vs
    # whole blocks; 16 or 32 did not help the fused activation backward over 64 (docs/BENCHMARKS.md).
    fwd_epilogue_n: int | None = 32  # layer 0 forward
    combine_epilogue_n: int | None = 32  # gemm_combine (forward and backward)
    in_place_local: bool | None = None  # dispatch_gemm: local tiles read in place (None: on)
    use_tma: bool | None = None  # TMA descriptors for weights / gemm_combine rows; None: where fast (operands.py)
    # World size 1 on Hopper: layer 1 (forward GEMM + prob scale, backward input-gradient GEMM) through the Gluon
    # kernel (gluon_gemm.py) + one per-token sum instead of gemm_combine + combine_reduce. None: where supported
    # and K <= gluon_gemm.AUTO_MAX_K (faster there on an H100; slower on long-K experts).
    gluon_layer1: bool | None = None


    def dispatch_kwargs(self, backward: bool = False) -> dict:
        """Keyword arguments of `dispatch_gemm` (`dispatch_gemm_backward` when `backward`)."""
        block_n = (self.bwd_block_n or self.block_n) if backward else self.block_n
        stages = (self.bwd_num_stages or self.num_stages) if backward else self.num_stages
        extra = (dict(fused_act_backward=self.fused_act_backward, epilogue_n=self.bwd_epilogue_n)
                 if backward else dict(epilogue_n=self.fwd_epilogue_n))
        return dict(**extra, activation=self.activation, gated=self.gated, num_comm=self.num_comm_dispatch,
                    num_compute=self.num_compute, block_n=block_n, block_k=self.block_k,
                    block_h=self.block_h, trace=self.trace, num_warps=self.num_warps,
                    num_stages=stages, group_m=self.group_m, use_tma=self.use_tma,
                    in_place_local=self.in_place_local)

    def local_combine_kwargs(self) -> dict:
        """Keyword arguments of `local_gemm_combine` (world size 1, Gluon)."""
        return dict(block_n=self.combine_block_n or self.block_n, group_n=self.group_n,
                    num_stages=self.combine_num_stages or self.num_stages)

    def combine_kwargs(self) -> dict:
        """Keyword arguments of `gemm_combine` (forward and backward)."""
        return dict(num_comm=self.num_comm_combine, num_compute=self.num_compute,
                    block_n=self.combine_block_n or self.block_n, block_k=self.block_k, trace=self.trace,
                    num_warps=self.num_warps, num_stages=self.combine_num_stages or self.num_stages,
                    group_n=self.group_n, use_tma=self.use_tma, pre_reduce=self.pre_reduce,
                    epilogue_n=self.combine_epilogue_n)


def default_programs(device: torch.device, num_comm: int | None, num_compute: int | None) -> tuple[int, int]:
    """(communication, compute) program counts: on a GPU one eighth of the SMs communicate and the rest
    compute (the whole grid co-resident, one program per SM); in the interpreter 2 + 2."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        num_comm = num_comm or max(1, sms // 8)
        num_compute = num_compute or sms - num_comm
    return num_comm or 2, num_compute or 2


def epilogue_split(block_n: int, epilogue_n: int | None, where: str, knob: str) -> int:
    """Number of column sub-blocks (1, 2, 4 or 8) an epilogue of a `block_n`-wide block works in: pieces of
    `epilogue_n` (None: the whole block; narrower than block_n / 8 is widened). A width that does not divide
    the block raises ValueError naming `knob`."""
    epi_n = max(min(block_n, epilogue_n or block_n), block_n // 8)
    split = block_n // epi_n
    if split not in (1, 2, 4, 8) or split * epi_n != block_n:
        raise ValueError(f"{where}: the column block {block_n} must be a whole number of epilogue sub-blocks of "
                         f"{epilogue_n} (set {knob} to a power of two)")
    return split


def dispatch_programs(device: torch.device, world_size: int, ffn1: int, num_comm: int | None,
                      num_compute: int | None) -> tuple[int, int]:
    """dispatch_gemm's (communication, compute) counts. At world size 1 on a GPU its communication programs
    only copy the rows (read in place by the GEMM) into the receive buffer for the weight gradients: 2H
    bytes per row against 2 * H * F1 GEMM flops, so they need fewer SMs the wider the expert. ceil(65536 / F1)
    of them, between 2 and SMs / 8: Mixtral (F1 28672) 3, Phi-3.5-MoE (12800) 6, Qwen2-MoE (2816) 16 on an
    H100, where 4 of them made layer 0 1.05-1.10x faster than 16 on the first two and 8 made Qwen2-MoE's
    0.86x (docs/BENCHMARKS.md); otherwise `default_programs`."""
    if num_comm is None and world_size == 1 and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        num_comm = min(max(1, sms // 8), max(2, -(-65536 // max(ffn1, 1))))
    return default_programs(device, num_comm, num_compute)


def combine_programs(device: torch.device, world_size: int, num_comm: int | None,
                     num_compute: int | None) -> tuple[int, int]:
    """gemm_combine's (communication, compute) counts (combine_reduce must use the same communication
    count): at world size 1 no row leaves the rank and its communication programs only raise the arrival
    signal, so one is enough and every other SM computes (layer 1 1.03-1.12x faster on an H100 than with
    SMs / 8, docs/BENCHMARKS.md); otherwise `default_programs`."""
    if num_comm is None and world_size == 1:
        num_comm = 1
    return default_programs(device, num_comm, num_compute)


INTERPRETER_BF16 = ("bf16 operands under TRITON_INTERPRET=1: Triton's interpreter computes bf16 tl.dot products "
                    "wrongly (seen with Triton 3.6 and 3.8: errors of 1e10 on unit-scale inputs); run the kernels with "
                    "fp32 or fp16 operands on the CPU, or compiled on a GPU")


def interpreter_bf16(dtype: torch.dtype) -> bool:
    """True where a dot kernel would run bf16 operands in Triton's interpreter, which gets them wrong."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: full-precision products (tests compare against float64); bf16/fp16 ignore it. Every kernel
    with a tl.dot asks it at launch, so it also refuses bf16 in Triton's interpreter (`INTERPRETER_BF16`)."""
    if interpreter_bf16(dtype):
        raise ValueError(INTERPRETER_BF16)
    return "ieee" if dtype == torch.float32 else "tf32"


def rows_16b_aligned(hidden: int, dtype: torch.dtype) -> bool:
    """True when every row of a [*, hidden] region starts 16-byte aligned (regions are 256-aligned)."""
    return hidden * torch.empty((), dtype=dtype).element_size() % 16 == 0
