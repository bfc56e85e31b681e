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


def check_placement(placement: list, rank: int, can_access=None) -> tuple[bool, str, bool]:
    """(reachable, why-not, shared) for the EP group's `placement`, one (host, GPU index) per rank.

    reachable: every rank on this host and its GPU peer-accessible from `rank`'s (`can_access(a, b)`,
    default torch's); shared: two ranks use the same GPU (cuda_ipc can share it, torch symmetric
    memory cannot: its rendezvous refuses allocations of several ranks on one device)."""
    if len(placement) <= 1:
        return True, "", False
    if len({host for host, _ in placement}) > 1:
        return False, "EP peers span several hosts (inter-node transport is not implemented yet)", False
    can_access = can_access or torch.cuda.can_device_access_peer
    mine = placement[rank][1]
    for _, index in placement:
        if index != mine and not can_access(mine, index):
            return False, f"GPU {mine} cannot access GPU {index} peer-to-peer", False
    indices = [index for _, index in placement]
    return True, "", len(set(indices)) < len(indices)


def _placement(group, device: torch.device) -> tuple[list, int]:
    """((host, GPU index) of every rank of `group`, this rank's position): one all_gather_object."""
    world = _group_size(group)
    if world == 1:
        return [(None, device.index)], 0
    import socket

    hosts: list = [None] * world
    dist.all_gather_object(hosts, (socket.gethostname(), device.index), group=group)
    return hosts, dist.get_rank(group)


def _peers_reachable(group, device: torch.device) -> tuple[bool, str, bool]:
    """All ranks of `group` on this host and their GPUs peer-accessible from ours; and whether some
    ranks share a GPU."""
    placement, rank = _placement(group, device)
    return check_placement(placement, rank)


# EP size 1 (nothing to overlap): the reference path. Measured on an H100 under Megatron's DDP (docs/BENCHMARKS.md,
# seventh session, after the reference path got its activation and per-token sums as one Triton pass each):
# faster than the fused kernels on a one-rank workspace or level with them, 2048 to 16384 tokens per call on
# Mixtral, Phi-3.5-MoE and Qwen2-MoE shapes: fused 0.73-1.01x of it, except Qwen2-MoE at 2048 tokens (1.10x
# in that run, 0.97x in the run before: a host-bound case that varies +-15% between runs). The sixth
# session's rule (fused from 8192 / 16384 tokens) dated from before those changes. `--comet-transport
# emulated` still runs the fused kernels at EP size 1.
EP1_REASON = ("EP size 1: no communication to overlap, and the reference path measured as fast as or faster "
              "than the fused kernels there (--comet-transport emulated forces them)")


SHARED_GPU = ("several EP ranks share one GPU and torch symmetric memory needs one GPU per rank "
              "(its rendezvous refuses them)")


def resolve_transport(
    cfg: CometConfig, group, device: torch.device, fused_supported: tuple[bool, str],
) -> tuple[str, str]:
    """(transport, why) for a layer: one of nccl, symm_mem, cuda_ipc, emulated, and the reason
    when `auto` fell back to the reference collectives (the caller logs it).

    At EP size 1 `auto` runs the reference path (`EP1_REASON`).

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
        if world == 1:
            return "nccl", EP1_REASON
        reach, why, shared = _peers_reachable(group, device)
        if not reach:
            return "nccl", why
        if shared:
            return "cuda_ipc", SHARED_GPU
        sm_ok, why = _symm_mem_available()
        return ("symm_mem", "") if sm_ok else ("cuda_ipc", why)

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
        reach, why, shared = _peers_reachable(group, device)
        if not reach:
            raise TransportUnavailable(f"--comet-transport symm_mem: {why}; use auto or nccl")
        if shared:
            raise TransportUnavailable(f"--comet-transport symm_mem: {SHARED_GPU}; use cuda_ipc (or auto, "
                                       "which picks it), or give each rank its own GPU")
    if wanted == "cuda_ipc" and on_gpu:
        reach, why, _ = _peers_reachable(group, device)
        if not reach:
            raise TransportUnavailable(f"--comet-transport cuda_ipc: {why}; use auto or nccl")
    return wanted, ""
