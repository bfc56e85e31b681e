"""How expert-parallel ranks reach each other's memory: `SymmetricWorkspace` and transport choice.

Backends (`CometConfig.transport`):
    symm_mem  torch symmetric memory (one process per GPU, peers over NVLink)
    cuda_ipc  buffers shared between processes through torch's IPC (CUDA IPC handles on GPUs, so
              several ranks can share one GPU; shared-memory files on the CPU, for tests under
              Triton's interpreter)
    emulated  one process is the whole group (EP size 1 in Megatron; `kernels.EmulatedGroup` for N
              virtual ranks in benchmarks and kernel tests)
    nccl      no workspace: the reference collectives of `CometTokenDispatcher`
    auto      symm_mem/cuda_ipc when every peer is a GPU reachable peer-to-peer on this host, else
              nccl (logged)
"""

from comet_megatron.transport.select import TransportUnavailable, resolve_transport  # noqa: F401
from comet_megatron.transport.workspace import SymmetricWorkspace  # noqa: F401
