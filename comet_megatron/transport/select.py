"""Choose the transport of one MoE layer from the config and what this machine can do."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from comet_megatron.config import CometConfig, CometConfigError

class TransportUnavailable(CometConfigError):
    """The configured transport cannot run here (the message says what is missing)."""


def triton_interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _symm_mem_available() -> tuple[bool, str]:
    try:
        import torch.distributed._symmetric_memory as symm  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        return False, f"torch.distributed._symmetric_memory is not importable ({exc})"
    return True, ""


def _peers_reachable(group, device: torch.device) -> tuple[bool, str]:
    """All ranks of `group` on this host and their GPUs peer-accessible from ours."""
    world = _group_size(group)
    if world == 1:
        return True, ""
    import socket

    hosts: list = [None] * world
    dist.all_gather_object(hosts, (socket.gethostname(), device.index), group=group)
    if len({h for h, _ in hosts}) > 1:
        return False, "EP peers span several hosts (inter-node transport is not implemented yet)"
    for _, index in hosts:
        if index != device.index and not torch.cuda.can_device_access_peer(device.index, index):
            return False, f"GPU {device.index} cannot access GPU {index} peer-to-peer"
    return True, ""


def resolve_transport(
    cfg: CometConfig, group, device: torch.device, fused_supported: tuple[bool, str]
) -> tuple[str, str]:
    """(transport, why) for a layer: one of nccl, symm_mem, cuda_ipc, emulated, and the reason
    when `auto` fell back to the reference collectives (the caller logs it).

    `fused_supported` is (ok, why-not) for the layer's configuration (activation, expert-TP...).
    An explicit transport that cannot run raises `TransportUnavailable` naming what is missing.
    """
    wanted = cfg.transport
    world = _group_size(group)
    if not cfg.overlap:
        return "nccl", "--no-comet-overlap"
    if wanted == "nccl":
        return "nccl", "--comet-transport nccl"
    ok, why = fused_supported
    on_gpu = device.type == "cuda"
    if wanted == "auto":
        if not ok:
            return "nccl", f"the fused kernels do not implement {why}"
        if not on_gpu:
            return "nccl", "no GPU"
        if world == 1:  # the fused kernels only add work when there is nothing to overlap
            return "nccl", "EP size 1, no communication to overlap"
        reach, why = _peers_reachable(group, device)
        if not reach:
            return "nccl", why
        sm_ok, _ = _symm_mem_available()
        return ("symm_mem", "") if sm_ok else ("cuda_ipc", "torch symmetric memory unavailable")

    if not ok:
        raise TransportUnavailable(
            f"--comet-transport {wanted}: the fused kernels cannot run this layer ({why}). "
            "Use --comet-transport auto (falls back to the reference path) or --no-comet-overlap."
        )
    if not on_gpu and not triton_interpreter_active():
        raise TransportUnavailable(
            f"--comet-transport {wanted} needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests); "
            "use --comet-transport auto or nccl on this machine."
        )
    if wanted == "emulated" and world != 1:
        raise TransportUnavailable(
            f"--comet-transport emulated runs the whole EP group in one process, but the EP size "
            f"is {world}; use symm_mem or cuda_ipc (one process per rank) or auto."
        )
    if wanted == "symm_mem":
        if not on_gpu:
            raise TransportUnavailable("--comet-transport symm_mem needs CUDA GPUs; use cuda_ipc on the CPU")
        sm_ok, why = _symm_mem_available()
        if not sm_ok:
            raise TransportUnavailable(f"--comet-transport symm_mem: {why}; use cuda_ipc or auto")
        reach, why = _peers_reachable(group, device)
        if not reach:
            raise TransportUnavailable(f"--comet-transport symm_mem: {why}; use auto or nccl")
    if wanted == "cuda_ipc" and on_gpu:
        reach, why = _peers_reachable(group, device)
        if not reach:
            raise TransportUnavailable(f"--comet-transport cuda_ipc: {why}; use auto or nccl")
    return wanted, ""
