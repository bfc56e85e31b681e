"""Memory-ordering primitives shared by every comet kernel: the only module with atomics and clocks.

Every cross-program or cross-rank handshake in `comet_megatron.kernels` goes through these helpers:

- `load_acquire(ptr, GLOBALTIMER)` / `store_release(ptr, value)`: one flag access with system-scope acquire/release.
  `store_release` first synchronizes the program's threads (`tl.debug_barrier`) so that every store the
  program issued before it (from any of its threads) is ordered before the flag (release is cumulative).
- `wait_until_geq(flag_ptr, target, timeout, err_ptr, err_code, flag_index, GLOBALTIMER)`: bounded
  spin until `*flag_ptr >= target` (`wait_all_geq`: the same for a contiguous block of flags). Never hangs: on timeout it records a diagnostic in the per-rank
  error buffer and returns False; the caller then skips the work that depended on the flag and the host
  raises `SignalTimeout` (see `check_errors`).
- `signal_peers` / `wait_peers`: the two halves of a barrier over the W ranks of the group.
- `now(clock_ptr, GLOBALTIMER)`: a timestamp for trace mode.

Signals carry EPOCH values: the host gives every communication round a strictly larger epoch, a signaller
stores the epoch and a waiter waits for `flag >= epoch`. Flags are therefore never reset and buffers are
reused across rounds without memsets; a flag left over from an earlier round (smaller epoch) can never
satisfy a later wait.

Timeouts: on a GPU (`GLOBALTIMER=True`) `timeout` is in nanoseconds of `%globaltimer`; in Triton's CPU
interpreter (which has no inline assembly) `timeout` counts spins.

Error buffer (int32, `ERR_WORDS` words per rank, zero = no error): [code, flag_index, observed, expected].
The first failing wait of a launch claims it with a compare-and-swap on word 0, so the diagnostic names
the first flag that never arrived.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

ERR_WORDS = 4

# err_code -> (phase, flag description). Kernels pass these codes to `wait_until_geq`.
ERR_DISPATCH_INPUTS = tl.constexpr(1)
ERR_DISPATCH_TILE = tl.constexpr(2)
ERR_COMBINE_CHUNK = tl.constexpr(3)
ERR_COMBINE_ARRIVAL = tl.constexpr(4)
ERR_LAYOUT_INPUTS = tl.constexpr(5)
ERR_BARRIER = tl.constexpr(6)
ERROR_CODES = {
    1: ("dispatch_gemm", "inputs_ready signal of source rank"),
    2: ("dispatch_gemm", "local M-tile ready flag"),
    3: ("gemm_combine", "local (M-tile, N-chunk) done flag"),
    4: ("combine_reduce", "arrival signal of (source rank * MAX_COMM + comm program)"),
    5: ("receive_layout", "inputs_ready signal (counts) of source rank"),
    6: ("barrier", "barrier signal of rank"),
}


class SignalTimeout(RuntimeError):
    """A bounded wait in a comet kernel expired: some peer (or producer program) never signalled."""


@triton.jit
def load_acquire(ptr, GLOBALTIMER: tl.constexpr):
    """System-scope acquire load of one int32 flag.

    Compiled for a GPU (GLOBALTIMER=True) a plain `ld.acquire.sys`: thousands of programs polling one
    flag must not serialize on atomic read-modify-writes at L2. The interpreter has no inline
    assembly, so there it is an atomic add of 0.
    """
    if GLOBALTIMER:
        val = tl.inline_asm_elementwise("ld.acquire.sys.global.b32 $0, [$1];", "=r,l", [ptr],
                                        dtype=tl.int32, is_pure=False, pack=1)
    else:
        val = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")
    return val


@triton.jit
def store_release(ptr, value):
    """System-scope release store of one flag, ordered after every earlier store of the program."""
    tl.debug_barrier()
    tl.atomic_xchg(ptr, value, sem="release", scope="sys")


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def now(clock_ptr, GLOBALTIMER: tl.constexpr):
    """Trace timestamp: `%globaltimer` ns on a GPU; a shared tick counter in the interpreter."""
    if GLOBALTIMER:
        t = _globaltimer()
    else:
        t = tl.atomic_add(clock_ptr, 1).to(tl.int64)
    return t


@triton.jit
def wait_until_geq(flag_ptr, target, timeout, err_ptr, err_code, flag_index, GLOBALTIMER: tl.constexpr):
    """Spin until `*flag_ptr >= target` (acquire). Returns True, or False after `timeout` (see module doc).

    On timeout the first failing wait of the rank records [err_code, flag_index, observed, target].
    """
    val = load_acquire(flag_ptr, GLOBALTIMER)
    # Once any wait of this rank has failed the round is lost: later waits give up at once, so a dead
    # peer costs one timeout per launch rather than one per waiting tile.
    alive = tl.load(err_ptr, volatile=True) == 0
    if GLOBALTIMER:
        deadline = _globaltimer() + timeout
        while (val < target) & alive & (_globaltimer() < deadline):
            val = load_acquire(flag_ptr, GLOBALTIMER)
    else:
        spins = 0
        while (val < target) & alive & (spins < timeout):
            val = load_acquire(flag_ptr, GLOBALTIMER)
            spins += 1
    ok = val >= target
    if not ok:
        _record_failure(err_ptr, err_code, flag_index, val, target)
    # Every thread of the program must observe the acquired data, not just the one that loaded the flag.
    tl.debug_barrier()
    return ok


@triton.jit
def _record_failure(err_ptr, err_code, index, observed, target):
    """The first failing wait of the rank claims the error buffer: [code, flag index, observed, target]."""
    if tl.atomic_cas(err_ptr, 0, err_code) == 0:
        tl.store(err_ptr + 1, index)
        tl.store(err_ptr + 2, observed)
        tl.store(err_ptr + 3, target)


@triton.jit
def _poll_lanes(ptrs, mask, target, timeout, err_ptr, GLOBALTIMER: tl.constexpr):
    """Spin until every lane with `mask` reads a flag >= target (one vector of acquire loads per poll), or
    the timeout passes, or another wait of the rank has failed. Returns the last values (off-mask lanes:
    `target`); `ptrs` must be valid addresses on every lane."""
    vals = tl.where(mask, load_acquire(ptrs, GLOBALTIMER), target)
    alive = tl.load(err_ptr, volatile=True) == 0
    if GLOBALTIMER:
        deadline = _globaltimer() + timeout
        while (tl.min(vals, 0) < target) & alive & (_globaltimer() < deadline):
            vals = tl.where(mask, load_acquire(ptrs, GLOBALTIMER), target)
    else:
        spins = 0
        while (tl.min(vals, 0) < target) & alive & (spins < timeout):
            vals = tl.where(mask, load_acquire(ptrs, GLOBALTIMER), target)
            spins += 1
    return vals


@triton.jit
def wait_all_geq(flag_ptr, count, target, timeout, err_ptr, err_code, index_base, BLOCK: tl.constexpr,
                 GLOBALTIMER: tl.constexpr):
    """Spin until `flag[i] >= target` for every i < count (count <= BLOCK), polling all flags at once.

    One vector of acquire loads per poll instead of `count` dependent waits: combine_reduce runs
    thousands of programs that each check every (rank, comm program) arrival flag. Failure handling
    as `wait_until_geq`, reporting flag index `index_base + i` of the first flag still behind.
    """
    offs = tl.arange(0, BLOCK)
    live = offs < count
    # idle lanes re-read flag 0: always a valid address
    vals = _poll_lanes(flag_ptr + tl.where(live, offs, 0), live, target, timeout, err_ptr, GLOBALTIMER)
    ok = tl.min(vals, 0) >= target
    if not ok:
        _record_failure(err_ptr, err_code, index_base + tl.min(tl.where(vals < target, offs, BLOCK), 0),
                        tl.min(vals, 0), target)
    tl.debug_barrier()
    return ok


@triton.jit
def wait_gather_geq(ptrs, mask, target, timeout, err_ptr, err_code, index, safe_ptr, GLOBALTIMER: tl.constexpr):
    """Spin until `*ptrs[i] >= target` for every lane i with `mask[i]` (flags at arbitrary addresses; lanes
    off the mask poll `safe_ptr`, any valid flag). Failure handling as `wait_until_geq` (reports `index`)."""
    vals = _poll_lanes(tl.where(mask, ptrs, safe_ptr), mask, target, timeout, err_ptr, GLOBALTIMER)
    ok = tl.min(vals, 0) >= target
    if not ok:
        _record_failure(err_ptr, err_code, index, tl.min(vals, 0), target)
    tl.debug_barrier()
    return ok


@triton.jit
def signal_peers(flag_table_ptr, slot, epoch, WORLD: tl.constexpr):
    """Release-store `epoch` into `flag[slot]` of every rank's flag region (address table `flag_table_ptr`)."""
    for peer in tl.static_range(WORLD):
        base = tl.load(flag_table_ptr + peer).to(tl.pointer_type(tl.int32), bitcast=True)
        store_release(base + slot, epoch)


@triton.jit
def wait_peers(flag_ptr, epoch, timeout, err_ptr, err_code, WORLD: tl.constexpr, GLOBALTIMER: tl.constexpr):
    """Wait until the local flags `flag[0..WORLD)` (one per peer) all reach `epoch` (failures: see above)."""
    for peer in tl.static_range(WORLD):
        wait_until_geq(flag_ptr + peer, epoch, timeout, err_ptr, err_code, peer, GLOBALTIMER)


@triton.jit(do_not_specialize=["epoch"])  # epochs grow: one compile, not one per divisibility
def _barrier_kernel(flag_table_ptr, flag_ptr, rank, epoch, timeout, err_ptr,
                    WORLD: tl.constexpr, ARRIVE: tl.constexpr, WAIT: tl.constexpr,
                    GLOBALTIMER: tl.constexpr):
    if ARRIVE:
        signal_peers(flag_table_ptr, rank, epoch, WORLD)
    if WAIT:
        wait_peers(flag_ptr, epoch, timeout, err_ptr, ERR_BARRIER, WORLD, GLOBALTIMER)


def barrier(view, epoch: int, arrive: bool = True, wait: bool = True) -> None:
    """Barrier over the group on the `barrier` signal region (one launch of one program).

    With real ranks call it with both halves. Emulated ranks in one process run the `arrive` half on every
    rank before any rank's `wait` half (a single-threaded interpreter cannot wait for a later launch).
    """
    launch(_barrier_kernel, (1,),
        view.tables["barrier"], view.regions["barrier"], view.rank, epoch, view.timeout, view.errors,
        WORLD=view.world_size, ARRIVE=arrive, WAIT=wait, GLOBALTIMER=use_globaltimer(view.errors),
    )


def use_globaltimer(tensor: torch.Tensor) -> bool:
    """True when kernels run compiled on a GPU (deadline from %globaltimer), False in the interpreter."""
    import os

    return tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


def check_errors(view, phase: str = "", phase_of=None) -> None:
    """Raise `SignalTimeout` if a kernel of `view`'s rank recorded a timed-out wait (one host sync).

    `phase_of(epoch)`, when given, names the phase from the epoch the failed wait expected (a check that
    covers several rounds). The error buffer is cleared after reading so the rank can be reused after the
    failure was handled.
    """
    code, index, observed, expected = view.errors.tolist()
    if code == 0:
        return
    view.errors.zero_()
    kernel, flag = ERROR_CODES.get(code, ("unknown kernel", f"error code {code}"))
    if phase_of is not None:
        phase = phase_of(expected)
    where = f" during {phase}" if phase else ""
    raise SignalTimeout(
        f"rank {view.rank}/{view.world_size}{where}: {kernel} timed out waiting for {flag} {index} "
        f"to reach epoch {expected} (last seen {observed}); a peer or producer never signalled"
    )
