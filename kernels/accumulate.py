"""Add a stacked gradient into G separate buffers of one storage in one launch: dst[g] += src[g].

The expert weight gradients come out of the grouped GEMMs as one `[G, ...]` tensor (bf16), and Megatron's
DDP keeps each expert's gradient in its own slice (`main_grad`, usually fp32) of one flat buffer, in an
order of its own. torch's per-tensor `add_` with mixed dtypes runs its non-vectorised ("unrolled")
elementwise kernel, one launch per expert (measured on an H100: ~1.4 TB/s; docs/BENCHMARKS.md); this
kernel reads `src` and the destinations with wide loads in one launch. `overwrite=True` stores `src` instead
(dst[g] = src[g], the destinations never read): for `main_grad`s that Megatron's DDP zeroed at the start of the
step and nothing added to since.

`accumulate_into(base, offsets, src)`: `base` is a flat view over the destinations' storage, `offsets[g]`
the element offset of destination g in it (int64 device tensor); every destination is contiguous with
`src[g].numel()` elements. Runs compiled on CUDA and under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

BLOCK = 4096


@triton.jit
def _accumulate_kernel(base_ptr, offsets_ptr, src_ptr, n, BLOCK: tl.constexpr, OVERWRITE: tl.constexpr):
    g = tl.program_id(0)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    dst = base_ptr + tl.load(offsets_ptr + g) + idx
    s = tl.load(src_ptr + g.to(tl.int64) * n + idx, mask=mask, other=0.0).to(tl.float32)
    if not OVERWRITE:  # else the destination is not read at all (it may hold anything)
        s += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, s.to(base_ptr.dtype.element_ty), mask=mask)


def flat_base(dsts) -> torch.Tensor | None:
    """(flat view over the storage all of `dsts` live in, [G] element offsets) or None when they do not
    share one storage, dtype and size, or are not contiguous."""
    first = dsts[0]
    storage = first.untyped_storage()
    size = first.element_size()
    for d in dsts:
        if (d.dtype != first.dtype or d.numel() != first.numel() or not d.is_contiguous()
                or d.untyped_storage().data_ptr() != storage.data_ptr() or d.device != first.device):
            return None
    base = torch.empty(0, dtype=first.dtype, device=first.device)
    base.set_(storage, 0, (storage.nbytes() // size,), (1,))
    return base


def element_offsets(base: torch.Tensor, dsts) -> list[int]:
    size = base.element_size()
    return [(d.data_ptr() - base.data_ptr()) // size for d in dsts]


def accumulate_into(base: torch.Tensor, offsets: torch.Tensor, src: torch.Tensor, overwrite: bool = False) -> None:
    """base[offsets[g] : offsets[g] + n] += src[g] for every g (n = src[0].numel()), accumulated in fp32;
    with `overwrite`, = src[g] (the destinations are written, never read)."""
    groups = src.shape[0]
    if groups == 0 or src.numel() == 0:
        return
    src = src.contiguous()
    n = src.numel() // groups
    if offsets.numel() != groups or offsets.dtype != torch.int64:
        raise ValueError(f"accumulate_into: offsets must be {groups} int64 element offsets")
    launch(_accumulate_kernel, (groups, triton.cdiv(n, BLOCK)), base, offsets, src, n, BLOCK=BLOCK,
           OVERWRITE=bool(overwrite))
