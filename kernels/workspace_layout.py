"""The symmetric workspace: which regions every rank allocates, and the per-rank view kernels receive.

Contract with a transport (torch symmetric memory, CUDA IPC, emulated ranks):

1. Build `WorkspaceLayout(...)` from the capacity (max tokens per rank), top-k, hidden size, number of
   experts, world size and activation dtype, and allocate `layout.nbytes` bytes of symmetric memory
   (same size and layout on every rank; alignment `REGION_ALIGN`). It must be zero-filled once at
   allocation (signals start at epoch 0); it is never reset afterwards.
2. For each rank construct `RankView.from_symmetric_buffer(rank, world_size, layout, local_buffer,
   peer_base_ptrs)` where `local_buffer` is this rank's uint8 buffer and `peer_base_ptrs` an int64
   device tensor [W] with the address of every rank's buffer as seen from this rank (e.g. torch
   symmetric memory's `buffer_ptrs_dev`, or pointers of opened CUDA IPC handles). That is all: the
   kernels reach peers only through the per-region address tables built from those base pointers.
3. All ranks of the group call the same sequence of comet operations, so `view.next_epoch()` returns
   the same epoch on every rank for the same communication round.

Regions (C = capacity tokens per rank, K = top-k, H = hidden, E = experts, W = world size,
El = E / W, MC = `max_comm_programs`):

| region          | shape           | dtype  | written by                         | read by                    |
| --------------- | --------------- | ------ | ---------------------------------- | -------------------------- |
| tokens          | [C, H]          | dtype  | owner (x forward, grad_out bwd)    | peers' dispatch_gemm pulls |
| probs           | [C*K]           | fp32   | owner (flattened topk_probs)       | peers' dispatch_gemm pulls |
| send_order      | [C*K]           | int32  | owner (pair ids sorted by expert)  | peers' dispatch_gemm pulls |
| send_offsets    | [E+1]           | int32  | owner (expert offsets in order)    | peers' dispatch_gemm pulls |
| recv_counts     | [W, El]         | int32  | source rank s writes row s         | owner's receive_layout     |
| combine         | [C*K, H]        | dtype  | expert owners' gemm_combine        | owner's combine_reduce     |
| combine_scalars | [C*K]           | fp32   | expert owners' gemm_combine (bwd)  | owner (grad of probs)      |
| inputs_ready    | [W]             | int32  | signal: source s stores epoch at s | dispatch_gemm, layout      |
| arrival         | [W, MC]         | int32  | signal: (source s, comm program c) | combine_reduce             |
| barrier         | [W]             | int32  | signal: rank s stores epoch at s   | `signals.barrier`          |

The hidden activations (size F1 = fc1 width) never cross ranks: dispatch_gemm pulls rows into LOCAL
buffers, so F1 does not enter the symmetric size. Per-rank local scratch (tile flags, error buffer)
lives in `RankView` and grows on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

REGION_ALIGN = 256


@dataclass(frozen=True)
class Region:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the symmetric buffer

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class WorkspaceLayout:
    """Byte layout of the symmetric buffer every rank allocates (see module docstring for the table)."""

    def __init__(self, capacity_tokens: int, topk: int, hidden: int, num_experts: int, world_size: int,
                 dtype: torch.dtype, max_comm_programs: int = 64):
        if num_experts % world_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by world_size={world_size}")
        self.capacity_tokens = capacity_tokens
        self.topk = topk
        self.hidden = hidden
        self.num_experts = num_experts
        self.world_size = world_size
        self.local_experts = num_experts // world_size
        self.dtype = dtype
        self.max_comm_programs = max_comm_programs
        c, k, h, w = max(capacity_tokens, 1), topk, hidden, world_size
        specs = [
            ("tokens", (c, h), dtype),
            ("probs", (c * k,), torch.float32),
            ("send_order", (c * k,), torch.int32),
            ("send_offsets", (num_experts + 1,), torch.int32),
            ("recv_counts", (w, self.local_experts), torch.int32),
            ("combine", (c * k, h), dtype),
            ("combine_scalars", (c * k,), torch.float32),
            ("inputs_ready", (w,), torch.int32),
            ("arrival", (w, max_comm_programs), torch.int32),
            ("barrier", (w,), torch.int32),
        ]
        self.regions: dict[str, Region] = {}
        offset = 0
        for name, shape, dt in specs:
            region = Region(name, shape, dt, offset)
            self.regions[name] = region
            offset += -(-region.nbytes // REGION_ALIGN) * REGION_ALIGN
        self.nbytes = offset

    def region_views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensor views of every region inside one rank's uint8 `buffer`."""
        if buffer.dtype != torch.uint8 or buffer.numel() < self.nbytes:
            raise ValueError(f"need a uint8 buffer of >= {self.nbytes} bytes, got {buffer.dtype} {buffer.numel()}")
        return {
            r.name: buffer[r.offset:r.offset + r.nbytes].view(r.dtype).view(r.shape)
            for r in self.regions.values()
        }


@dataclass
class RankView:
    """Everything a comet kernel launch needs to know about one rank of the expert-parallel group.

    rank, world_size: position in the group.
    layout:  the `WorkspaceLayout` shared by all ranks.
    regions: this rank's typed views of its own symmetric regions (host code writes inputs here).
    tables:  per region an int64 device tensor [world_size]: address of that region on every rank.
    timeout: bound of every wait (ns of %globaltimer on GPU, spins in the interpreter).
    epoch:   last epoch handed out; `next_epoch()` advances it (identically on every rank).
    errors:  int32 [signals.ERR_WORDS] error buffer written by timed-out waits (see `signals`).
    clock:   int32 [1] tick counter used for trace timestamps in the interpreter.
    """

    rank: int
    world_size: int
    layout: WorkspaceLayout
    regions: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor]
    timeout: int
    epoch: int = 0
    errors: torch.Tensor | None = None
    clock: torch.Tensor | None = None
    _scratch: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_symmetric_buffer(cls, rank: int, world_size: int, layout: WorkspaceLayout,
                              local_buffer: torch.Tensor, peer_base_ptrs: torch.Tensor,
                              timeout: int | None = None) -> "RankView":
        device = local_buffer.device
        if timeout is None:
            # 10 s of %globaltimer on a GPU; on the interpreter a spin count (a few seconds of CPU).
            timeout = 10_000_000_000 if device.type == "cuda" else 20_000
        bases = peer_base_ptrs.to(device=device, dtype=torch.int64)
        tables = {name: bases + r.offset for name, r in layout.regions.items()}
        return cls(
            rank=rank, world_size=world_size, layout=layout, regions=layout.region_views(local_buffer),
            tables=tables, timeout=timeout,
            errors=torch.zeros(4, dtype=torch.int32, device=device),
            clock=torch.zeros(1, dtype=torch.int32, device=device),
        )

    @property
    def device(self) -> torch.device:
        return self.errors.device

    def next_epoch(self) -> int:
        """Epoch of the next communication round (publish -> dispatch -> combine -> reduce)."""
        self.epoch += 1
        return self.epoch

    def scratch(self, name: str, numel: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """A local, zero-initialized, never-reset buffer of >= numel elements (local epoch flags).

        Grows by reallocation; fresh zeros are valid flags since every wait targets an epoch >= 1.
        """
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.zeros(max(numel, 1), dtype=dtype, device=self.device)
            self._scratch[name] = buf
        return buf
