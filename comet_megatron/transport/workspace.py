"""`SymmetricWorkspace`: one symmetric buffer per EP rank and the `RankView` the kernels receive.

The byte layout comes from `kernels.WorkspaceLayout` (sized by capacity tokens per rank, top-k,
hidden size, experts, EP size, dtype); this class only allocates it on every rank with the chosen
backend, exchanges base addresses and builds the per-rank view. The buffer is zeroed once at
allocation; signals carry epochs, so it is reused across micro-batches and layers without memsets.

Capacity: every rank must use the same layout. `ensure_capacity(tokens)` agrees on the largest
token count of the group (an all-reduce of one integer) and, when it exceeds the capacity,
re-allocates on every rank (collectively) or raises an error naming `--comet-capacity` and the size
needed, following `--comet-grow-workspace`.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from comet_megatron.config import CometConfigError
from comet_megatron.kernels import RankView, WorkspaceLayout

log = logging.getLogger("comet_megatron.transport")


class WorkspaceTooSmall(CometConfigError):
    pass


class PeerUnreachable(RuntimeError):
    """The EP peers did not answer the (bounded) workspace agreement: one died or is stuck."""


class SymmetricWorkspace:
    """The symmetric workspace of one EP group (shared by all comet layers of the same shapes)."""

    def __init__(
        self,
        backend: str,
        group,
        *,
        topk: int,
        hidden: int,
        num_experts: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: Optional[int],
        grow: bool,
        timeout_s: float,
        max_comm_programs: int = 64,
    ):
        if backend not in ("symm_mem", "cuda_ipc", "emulated"):
            raise ValueError(f"no symmetric workspace for transport {backend!r}")
        self.backend = backend
        self.group = group
        self.world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        self.topk, self.hidden, self.num_experts = topk, hidden, num_experts
        self.dtype, self.device = dtype, device
        self.capacity = capacity  # None: size from the first batch
        self.grow = grow
        self.timeout_s = timeout_s
        # epochs of forward rounds whose error check waits for their backward (comet_megatron.fused)
        self.unchecked_forwards: set[int] = set()
        self.max_comm_programs = max_comm_programs
        self.view: Optional[RankView] = None
        self._keepalive: list = []  # peer mappings must outlive the view's address tables

    # ------------------------------------------------------------------ capacity
    def ensure_capacity(self, tokens: int) -> RankView:
        """The view for a call carrying `tokens` tokens on this rank (allocating or growing)."""
        needed = tokens
        if self.world > 1 and self.view is not None and not self.grow and self.capacity is not None:
            # Fixed capacity (--comet-capacity N --no-comet-grow-workspace): the size was agreed on when the
            # workspace was allocated and can never change, so later calls skip the agreement (a host sync
            # per layer call). A rank whose batch no longer fits refuses alone, naming the flag; its peers'
            # waits give up after --comet-wait-timeout-s and raise CometTimeout.
            if tokens > self.view.layout.capacity_tokens:
                raise WorkspaceTooSmall(
                    f"rank {self.rank}/{self.world}: a batch of {tokens} tokens exceeds the fixed comet "
                    f"workspace capacity ({self.view.layout.capacity_tokens}); set --comet-capacity {tokens} "
                    "(or more), or allow --comet-grow-workspace."
                )
            return self.view
        if self.world > 1:
            t = torch.tensor([tokens], dtype=torch.int64, device=self._collective_device())
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            try:  # bounded like every other wait: a dead or stuck peer must not hang this rank
                work.wait(timeout=timedelta(seconds=self.timeout_s))
            except Exception as exc:  # noqa: BLE001  (backends raise different types)
                raise PeerUnreachable(
                    f"rank {self.rank}/{self.world}: the EP peers did not agree on the workspace "
                    f"size within {self.timeout_s:g}s ({type(exc).__name__}: {exc})"
                ) from exc
            needed = int(t.item())
        if self.view is not None and needed <= self.view.layout.capacity_tokens:
            return self.view
        if self.view is not None and not self.grow:
            raise WorkspaceTooSmall(
                f"a batch of {needed} tokens per rank exceeds the comet workspace capacity "
                f"({self.view.layout.capacity_tokens}); set --comet-capacity {needed} (or more), "
                "or allow --comet-grow-workspace."
            )
        if self.view is None and self.capacity is not None and needed > self.capacity and not self.grow:
            raise WorkspaceTooSmall(
                f"a batch of {needed} tokens per rank exceeds --comet-capacity {self.capacity}; "
                f"set --comet-capacity {needed} (or more), or allow --comet-grow-workspace."
            )
        capacity = max(needed, self.capacity or 0)
        if self.view is not None:
            capacity = max(capacity, 2 * self.view.layout.capacity_tokens)
            log.info("comet: growing the %s workspace to %d tokens per rank", self.backend, capacity)
        self._allocate(capacity)
        return self.view

    def _collective_device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return self.device if backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ allocation
    def _allocate(self, capacity: int) -> None:
        layout = WorkspaceLayout(
            capacity, self.topk, self.hidden, self.num_experts, self.world, self.dtype,
            self.max_comm_programs,
        )
        epoch = self.view.epoch if self.view is not None else 0
        self.view = None
        self._keepalive = []
        if self.backend == "symm_mem":
            local, bases = self._alloc_symm_mem(layout)
        elif self.backend == "cuda_ipc":
            local, bases = self._alloc_ipc(layout)
        else:
            local = torch.zeros(layout.nbytes, dtype=torch.uint8, device=self.device)
            bases = torch.tensor([local.data_ptr()], dtype=torch.int64, device=self.device)
        self._keepalive.append(local)
        timeout = self._timeout_units()
        view = RankView.from_symmetric_buffer(self.rank, self.world, layout, local, bases, timeout)
        # A fresh zeroed buffer accepts any epoch >= 1: keep counting so that late readers of the
        # old buffer (none: allocation is collective and synchronous) cannot alias.
        view.epoch = epoch
        self.view = view

    def _timeout_units(self) -> int:
        if self.device.type == "cuda":
            return int(self.timeout_s * 1e9)  # %globaltimer nanoseconds
        return max(int(self.timeout_s * 2000), 1000)  # interpreter spins (~0.5 ms each)

    def _alloc_symm_mem(self, layout: WorkspaceLayout):
        import torch.distributed._symmetric_memory as symm

        if hasattr(symm, "enable_symm_mem_for_group"):  # required by older torch, idempotent
            symm.enable_symm_mem_for_group(self.group.group_name)
        buf = symm.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        buf.zero_()
        handle = symm.rendezvous(buf, group=self.group)
        self._keepalive.append(handle)
        bases = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=self.device)
        handle.barrier()
        return buf, bases

    def _alloc_ipc(self, layout: WorkspaceLayout):
        """Share each rank's buffer with its peers.

        CUDA: torch's CUDA IPC handles (`reduce_tensor` yields plain, picklable handle data), so
        several ranks may share one GPU. CPU (tests under Triton's interpreter): a file in /dev/shm
        that every peer maps with `torch.from_file(shared=True)` and unlinks once all have mapped it.
        """
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            local = torch.zeros(layout.nbytes, dtype=torch.uint8, device=self.device)
            torch.cuda.synchronize(self.device)
            handle = reduce_tensor(local)
        else:
            import os
            import tempfile
            import uuid

            shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            path = os.path.join(shm_dir, f"comet-ws-{uuid.uuid4().hex}-r{self.rank}")
            local = torch.from_file(path, shared=True, size=layout.nbytes, dtype=torch.uint8)
            local.zero_()
            handle = path
        handles: list = [None] * self.world
        dist.all_gather_object(handles, handle, group=self.group)
        ptrs = []
        for peer, peer_handle in enumerate(handles):
            if peer == self.rank:
                ptrs.append(local.data_ptr())
                continue
            if self.device.type == "cuda":
                fn, fn_args = peer_handle
                mapped = fn(*fn_args)
            else:
                mapped = torch.from_file(peer_handle, shared=True, size=layout.nbytes, dtype=torch.uint8)
            self._keepalive.append(mapped)
            ptrs.append(mapped.data_ptr())
        dist.barrier(group=self.group)
        if self.device.type == "cpu":
            os.unlink(handle)  # every peer holds a mapping; the memory lives until they drop it
        bases = torch.tensor(ptrs, dtype=torch.int64, device=self.device)
        return local, bases
