"""Run a test body in N gloo processes with Megatron's model-parallel state initialised.

`run_distributed(fn, world_size, tp=..., ep=..., **kwargs)` spawns `world_size` CPU processes, each
of which sets up torch.distributed (gloo), the CPU shims and Megatron's parallel state, calls
`fn(rank=..., **kwargs)` and sends back its (picklable) return value. A failure in any rank
re-raises in the caller with that rank's traceback; a rank that hangs is killed at `timeout` seconds.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, tp, ep, etp, kwargs, out_dir, env):
    os.environ.update(env or {})
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist

        from comet_megatron.patches import cpu

        cpu.apply()
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            create_gloo_process_groups=False,
        )
        value = fn(rank=rank, **kwargs)
        with open(result_path, "wb") as f:
            pickle.dump(("ok", value), f)
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (report every failure to the parent)
        with open(result_path, "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        raise


def run_distributed(
    fn, world_size: int, *, tp: int = 1, ep: int = 1, etp: int | None = None, timeout: float = 600,
    env: dict | None = None, may_die: tuple = (), **kwargs
):
    """`env` is set in each rank before anything is imported (e.g. TRITON_INTERPRET=1).

    Ranks in `may_die` are allowed to end without a result (a test that kills them); their entry
    in the returned list is None."""
    with tempfile.TemporaryDirectory() as out_dir:
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, fn, tp, ep, etp, kwargs, out_dir, env))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                if r in may_die:
                    results.append(None)
                else:
                    errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "ok":
                results.append(value)
            else:
                errors.append(f"rank {r} failed:\n{value}")
        if hung:
            errors.insert(0, f"ranks {hung} did not finish within {timeout}s")
        if errors:
            raise AssertionError("\n".join(errors))
        return results
