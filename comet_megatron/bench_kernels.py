"""`comet-megatron bench kernels`: each fused kernel against the same GEMM through cuBLAS, on this GPU.

At world size 1 (one emulated rank on the GPU: the "communication" is a local gather/scatter) every
kernel of one MoE forward+backward round is timed alone, with fresh epochs (the waits are real), next
to the unfused GEMM it replaces, `torch._grouped_mm` on the same rows (pre-sorted by expert):

    L0 fwd   dispatch_gemm            pull rows + fc1 + activation   vs  grouped_mm fc1 (+ activation)
    L1 fwd   gemm_combine + reduce    fc2 + prob scale + combine     vs  grouped_mm fc2
    L0 bwd   dispatch_gemm_backward   pull grads + fc2 dgrad + act'  vs  grouped_mm fc2 dgrad
    L1 bwd   gemm_combine + reduce    fc1 dgrad + return of grads    vs  grouped_mm fc1 dgrad
    wgrad    grouped_wgrad            dW1, dW2                       vs  grouped_mm (K split by expert)
             (the Gluon kernel on Hopper, else the Triton backend: `programs["wgrad"]` says which)

Reported per kernel: ms, TFLOP/s, `vs cuBLAS` = t_cublas / t_ours (>= 0.95 is the single-GPU issue's
target for plain GEMMs) and `vs SM share` = t_cublas * SMs / compute programs / t_ours: the fused
kernels give `num_comm` SMs to communication, so at world size 1 their floor is the cuBLAS time
scaled by the share of SMs left to compute (target: >= 0.95, i.e. within 5%). The GEMM alone does less
than the fused kernel (no row gather, activation, combine), so two more yardsticks: `cuBLAS+act` (layer 0:
GEMM + its elementwise pass) and, at world size 1, `unfused` = the cheapest unfused pipeline doing the
kernel's whole job (row gather + GEMM + one Triton activation pass; GEMM + one Triton per-token row sum for
layer 1's combine, which the fused L1 timing holds: gemm_combine + combine_reduce), with `vs share unf`.

With `--world N` the N expert-parallel ranks are EMULATED on this GPU (one process, one workspace per
rank, ranks' kernels serialized on one stream) and rank 0's kernels are timed: 1/N of its rows are
local (read in place, combined without the communication programs), the rest go through the pull
and the combine's communication programs; the cuBLAS baseline does rank 0's GEMMs on as many rows.
This measures the cost of the remote path on one GPU, not an overlap speedup (there is no link to
hide). L1 then times rank 0's gemm_combine alone (its combine_reduce would wait for emulated peers).

Median of CUDA-event timings of `--reps` calls after `--warmup` calls, in `--rounds` interleaved rounds (each
times the cuBLAS baselines and then every configuration once, with reps / rounds calls (rounded up); the figure is the
median over rounds), so that a drift of the GPU's clocks during the run reaches ours and cuBLAS's alike.
Several kernel configurations
can be compared in one run (`--configs '[{"block_n": 256}, {"use_tma": false}]'`); the first is the
tuning cache's choice (or the Hopper default) unless given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


# A spin of ~1 ms enqueued before each start event: the host-side launch of what is timed (Triton's
# launcher, TMA descriptors, torch ops: 0.1-0.3 ms, variable) then overlaps it instead of landing in
# the timed window, where it made the same 1 ms kernel read 1.1-1.8 ms between configs of one run.
SLEEP_CYCLES = 2_000_000


def _events_ms(fn, reps: int, warmup: int) -> float:
    """Median ms of the region that `fn(record)` brackets with `record(0)` / `record(1)`: device time
    (on a GPU the start event waits behind a short spin while the host launches the work)."""
    import torch

    for _ in range(warmup):
        fn(lambda i: None)
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():  # CPU smoke run (interpreter): wall clock, meaningless as a timing
            marks = [0.0, 0.0]

            def mark(i, marks=marks):
                marks[i] = time.perf_counter()
            fn(mark)
            times.append((marks[1] - marks[0]) * 1e3)
            continue
        ev = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]

        def record(i, ev=ev):
            if i == 0:  # keep the GPU busy while the host launches: the window holds device time only
                torch.cuda._sleep(SLEEP_CYCLES)
            ev[i].record()
        fn(record)
        ev[1].synchronize()
        times.append(ev[0].elapsed_time(ev[1]))
    times.sort()
    return times[len(times) // 2]


class KernelBench:
    """One shape at one token count per rank: inputs, a workspace of `world` ranks (emulated on this
    GPU when world > 1, labelled so) and the timed closures. Timings are rank 0's kernels."""

    def __init__(self, shape, tokens: int, seed: int = 0, world: int = 1, dtype=None):
        import torch

        from comet_megatron.kernels import EmulatedGroup

        if shape.experts % world:
            raise SystemExit(f"bench kernels: {shape.experts} experts do not split over --world {world}")
        self.shape, self.tokens, self.world = shape, tokens, world
        # CPU: the smoke run of the tests (Triton interpreter, fp32); timings there mean nothing
        dev, dt = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
        dt = dtype or dt
        h, f, e, k = shape.hidden, shape.ffn, shape.experts, shape.topk
        f1 = 2 * f if shape.gated else f
        self.el = el = e // world
        g = torch.Generator(device=dev).manual_seed(seed)
        self.xs = [torch.randn(tokens, h, device=dev, dtype=dt, generator=g) for _ in range(world)]
        self.grads = [torch.randn(tokens, h, device=dev, dtype=dt, generator=g) for _ in range(world)]
        self.idxs = [torch.rand(tokens, e, device=dev, generator=g).topk(k, dim=1).indices.to(torch.int32)
                     for _ in range(world)]
        self.probss = [torch.softmax(torch.randn(tokens, k, device=dev, generator=g), 1) for _ in range(world)]
        self.x, self.grad, self.idx, self.probs = self.xs[0], self.grads[0], self.idxs[0], self.probss[0]
        # Megatron's [out, in] parameter layout, read transposed (as the comet layer does)
        self.w1 = (torch.randn(e, f1, h, device=dev, dtype=dt, generator=g) / h**0.5).transpose(1, 2)
        self.w2 = (torch.randn(e, h, f, device=dev, dtype=dt, generator=g) / f**0.5).transpose(1, 2)
        self.w1s = [self.w1[r * el:(r + 1) * el] for r in range(world)]
        self.w2s = [self.w2[r * el:(r + 1) * el] for r in range(world)]
        self.group = EmulatedGroup(world, capacity_tokens=tokens, topk=k, hidden=h, num_experts=e, dtype=dt,
                                   device=dev)
        self.views = self.group.views
        self.view = self.views[0]
        # cuBLAS baseline: the rows rank 0 receives (every rank's pairs routed to experts [0, El)),
        # pre-sorted by expert
        counts = sum(torch.bincount(i.reshape(-1).long(), minlength=e) for i in self.idxs)[:el]
        self.rows = int(counts.sum())
        self.offs = torch.cumsum(counts, 0).to(torch.int32)
        self.x_sorted = torch.randn(self.rows, h, device=dev, dtype=dt, generator=g)
        self.g_sorted = torch.randn(self.rows, h, device=dev, dtype=dt, generator=g)
        self.h_sorted = torch.randn(self.rows, f, device=dev, dtype=dt, generator=g)
        self.pre_sorted = torch.randn(self.rows, f1, device=dev, dtype=dt, generator=g)
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else None

    def flops(self) -> dict:
        s, r = self.shape, self.rows
        f1 = 2 * s.ffn if s.gated else s.ffn
        fc1, fc2 = 2.0 * r * s.hidden * f1, 2.0 * r * s.ffn * s.hidden
        return {"L0 fwd": fc1, "L1 fwd": fc2, "L0 bwd": fc2, "L1 bwd": fc1, "wgrad dW1": fc1, "wgrad dW2": fc2}

    # --- cuBLAS baselines -------------------------------------------------------------------------
    def cublas(self, reps: int, warmup: int) -> dict:
        import torch
        import torch.nn.functional as F

        from comet_megatron.kernels.dispatch_gemm import activation_backward

        s, offs = self.shape, self.offs
        gm = torch._grouped_mm if self.x.is_cuda else _grouped_loop
        f = s.ffn

        def timed(body):
            def fn(rec):
                rec(0)
                body()
                rec(1)
            return _events_ms(fn, reps, warmup)

        def act(pre):
            return F.silu(pre[:, :f]) * pre[:, f:] if s.gated else F.silu(pre)

        w1, w2 = self.w1s[0], self.w2s[0]
        prob = torch.rand(self.rows, device=self.x.device)
        hp = torch.empty_like(self.h_sorted)

        def act_backward(dhp):
            # the unfused layer-0 backward's elementwise part: one pass (ours; torch's autograd takes several)
            # from dhp to d_pre, h * p and grad_prob, the same traffic as the fused kernel's separate pass
            activation_backward(torch.empty_like(self.pre_sorted), self.pre_sorted, prob, ffn=f,
                                activation="silu", gated=s.gated, hp=hp, dhp=dhp).sum(1)

        out = {}
        if self.world == 1:
            out.update(self._unfused(gm, timed, prob, act_backward))
        out.update({
            "L0 fwd": timed(lambda: gm(self.x_sorted, w1, offs=offs)),
            "L0 fwd +act": timed(lambda: act(gm(self.x_sorted, w1, offs=offs))),
            "L1 fwd": timed(lambda: gm(self.h_sorted, w2, offs=offs)),
            "L0 bwd": timed(lambda: gm(self.g_sorted, w2.transpose(1, 2), offs=offs)),
            "L0 bwd +act": timed(lambda: act_backward(gm(self.g_sorted, w2.transpose(1, 2), offs=offs))),
            "L1 bwd": timed(lambda: gm(self.pre_sorted, w1.transpose(1, 2), offs=offs)),
            "wgrad dW1": timed(lambda: gm(self.x_sorted.t(), self.pre_sorted, offs=offs)),
            "wgrad dW2": timed(lambda: gm(self.h_sorted.t(), self.g_sorted, offs=offs)),
        })
        return out

    def _unfused(self, gm, timed, prob, act_backward) -> dict:
        """World size 1: the cheapest unfused pipeline doing what each fused kernel does, "<kernel> unfused":
        L0 fwd = gather of the routed rows (`index_select`) + grouped GEMM + one Triton activation pass;
        L1 fwd = grouped GEMM + one Triton pass summing each token's rows (`kernels.token_sum`, the reference
        path's combine); L0 bwd = gather of the output-gradient rows + grouped GEMM + one activation-backward
        pass; L1 bwd = grouped GEMM + the token sum (the return of the input gradients). The per-token row
        order (shared by the combine and the gather's backward, once per call) is built outside the window."""
        import torch

        from comet_megatron.kernels.activation import activation_forward
        from comet_megatron.kernels.token_sum import sum_rows_by_token, token_row_order

        s, offs = self.shape, self.offs
        w1, w2 = self.w1s[0], self.w2s[0]
        # receive order = (token, slot) pairs sorted by expert, stably
        token = torch.sort(self.idx.reshape(-1).long(), stable=True).indices // s.topk
        order = token_row_order(token, self.tokens)
        return {
            "L0 fwd unfused": timed(lambda: activation_forward(
                gm(self.x.index_select(0, token), w1, offs=offs), prob, activation="silu", gated=s.gated)),
            "L1 fwd unfused": timed(lambda: sum_rows_by_token(gm(self.h_sorted, w2, offs=offs), *order)),
            "L0 bwd unfused": timed(lambda: act_backward(gm(self.grad.index_select(0, token), w2.transpose(1, 2),
                                                            offs=offs))),
            "L1 bwd unfused": timed(lambda: sum_rows_by_token(gm(self.pre_sorted, w1.transpose(1, 2), offs=offs),
                                                              *order)),
        }

    # --- fused kernels ----------------------------------------------------------------------------
    def fused(self, cfg, reps: int, warmup: int, kernels_only: bool = False) -> dict:
        """Median ms of each fused kernel (and the round's routing, the Triton wgrad, a self-check);
        `kernels_only`: the four fused kernels alone (the tuner's `--timing kernels`)."""
        from comet_megatron.kernels.config import combine_programs, dispatch_programs
        from comet_megatron.kernels import (combine_reduce, dispatch_gemm, dispatch_gemm_backward,
                                            check_errors, gemm_combine, grouped_wgrad, publish,
                                            receive_layout)
        from comet_megatron.kernels.gemm_combine import local_gemm_combine, local_layer1

        view, views, T, W = self.view, self.views, self.tokens, self.world
        w1, w2 = self.w1s[0], self.w2s[0]
        f1 = 2 * self.shape.ffn if self.shape.gated else self.shape.ffn
        nc_d, np_ = dispatch_programs(view.device, self.world, f1, cfg.num_comm_dispatch, cfg.num_compute)
        nc_c, np_c = combine_programs(view.device, self.world, cfg.num_comm_combine, cfg.num_compute)
        l0 = cfg.dispatch_kwargs()
        l0b = cfg.dispatch_kwargs(backward=True)
        l1 = cfg.combine_kwargs()
        st: dict = {}

        def new_epoch() -> int:
            return [v.next_epoch() for v in views][0]  # every rank takes part in every round

        def fwd_round(rec, stop_after: str):
            epoch = new_epoch()
            for r in range(1, W):
                publish(views[r], self.xs[r], epoch, self.idxs[r], self.probss[r])
            if stop_after == "routing":
                rec(0)
            publish(view, self.x, epoch, self.idx, self.probs)
            layout = receive_layout(view, epoch, cfg.block_m)
            layout.num_rows()
            if stop_after == "routing":
                rec(1)
                return
            if stop_after == "L0":
                rec(0)
            d = dispatch_gemm(view, layout, w1, epoch, store_pre=True, **l0)
            if stop_after == "L0":
                rec(1)
                return
            rec(0)
            st["gluon"] = local_layer1(view, cfg, d.out, w2)
            if st["gluon"]:  # world size 1 on Hopper: what moe_forward runs
                local_gemm_combine(layout, d.out, w2, T, self.shape.topk, recv_pair=d.recv_pair,
                                   recv_prob=d.recv_prob, **cfg.local_combine_kwargs())
            else:
                gemm_combine(view, layout, d.out, w2, epoch, recv_pair=d.recv_pair, recv_src=d.recv_src,
                             recv_prob=d.recv_prob, **l1)
                if W == 1:  # with emulated peers their deliveries never come: rank 0's gemm_combine only
                    combine_reduce(view, T, epoch, num_comm=cfg.num_comm_combine)
            rec(1)
            st.update(layout=layout, d=d, epoch=epoch)

        def bwd_round(rec, stop_after: str):
            fwd_round(lambda i: None, "L1")
            layout, d = st["layout"], st["d"]
            epoch = new_epoch()
            for r in range(1, W):
                publish(views[r], self.grads[r], epoch)
            publish(view, self.grad, epoch)
            if stop_after == "L0":
                rec(0)
            b = dispatch_gemm_backward(view, layout, d, w2, epoch, **l0b)
            if stop_after == "L0":
                rec(1)
                return
            rec(0)
            if local_layer1(view, cfg, b.out, w1.transpose(1, 2)):
                local_gemm_combine(layout, b.out, w1.transpose(1, 2), T, self.shape.topk, recv_pair=b.recv_pair,
                                   row_scalars=b.grad_prob, **cfg.local_combine_kwargs())
            else:
                gemm_combine(view, layout, b.out, w1.transpose(1, 2), epoch, recv_pair=b.recv_pair,
                             recv_src=b.recv_src, row_scalars=b.grad_prob, **l1)
                if W == 1:
                    combine_reduce(view, T, epoch, num_comm=cfg.num_comm_combine, scalars=True)
            rec(1)
            st.update(b=b)

        out = {} if kernels_only else {"routing": _events_ms(lambda rec: fwd_round(rec, "routing"), reps, warmup)}
        out.update({
            "L0 fwd": _events_ms(lambda rec: fwd_round(rec, "L0"), reps, warmup),
            "L1 fwd": _events_ms(lambda rec: fwd_round(rec, "L1"), reps, warmup),
            "L0 bwd": _events_ms(lambda rec: bwd_round(rec, "L0"), reps, warmup),
            "L1 bwd": _events_ms(lambda rec: bwd_round(rec, "L1"), reps, warmup),
        })
        if kernels_only:
            check_errors(view, "bench kernels")
            return out
        d, b, offsets = st["d"], st["b"], st["layout"].expert_offsets

        wgrad_backend = _our_wgrad_backend(d.recv, b.out)

        def wg(a, bb):
            def fn(rec):
                rec(0)
                grouped_wgrad(a, bb, offsets, backend=wgrad_backend)
                rec(1)
            return _events_ms(fn, reps, warmup)

        out["wgrad dW1"] = wg(d.recv, b.out)
        out["wgrad dW2"] = wg(d.out, b.recv)
        gluon = st.get("gluon", False)  # the Gluon layer 1 uses every SM, no communication program
        out["_programs"] = {"comm_dispatch": nc_d, "comm_combine": 0 if gluon else nc_c, "compute": np_,
                            "compute_combine": self.sms if gluon and self.sms else np_c,
                            "layer1": "gluon" if gluon else "triton", "wgrad": wgrad_backend}
        check_errors(view, "bench kernels")  # a timed-out wait would make the timings meaningless
        self.check(cfg)
        return out

    def check(self, cfg) -> None:
        """The fused forward equals a float per-expert computation (guards the timed configuration)."""
        import torch
        import torch.nn.functional as F

        # a fresh group: the timing rounds left the peers' combine signals behind rank 0's epochs
        from comet_megatron.kernels import EmulatedGroup

        s0 = self.shape
        group = EmulatedGroup(self.world, capacity_tokens=self.tokens, topk=s0.topk, hidden=s0.hidden,
                              num_experts=s0.experts, dtype=self.x.dtype, device=self.x.device)
        out = group.forward(self.xs, self.idxs, self.probss, self.w1s, self.w2s, cfg)[0][0]
        s, k = self.shape, self.shape.topk
        flat = self.idx.reshape(-1).long()
        sel = torch.arange(min(self.tokens, 256), device=self.x.device)
        ref = torch.zeros(sel.numel(), s.hidden, device=self.x.device)
        routed = flat.view(-1, k)[sel]
        for e in routed.unique().tolist():
            t, kk = (routed == e).nonzero(as_tuple=True)
            pre = self.x[sel][t].float() @ self.w1[e].float()
            hh = F.silu(pre[:, :s.ffn]) * pre[:, s.ffn:] if s.gated else F.silu(pre)
            ref.index_add_(0, t, (hh @ self.w2[e].float()) * self.probs[sel][t, kk, None])
        err = ((out[sel].float() - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            raise RuntimeError(f"bench kernels: fused forward differs from the reference (rel err {err:.3g}) "
                               f"with {cfg}")


def compiled_stats() -> dict:
    """Registers, spills and shared memory of every compiled variant of the fused kernels (diagnostics:
    spilling epilogues are the usual reason a fused kernel falls behind its GEMM)."""
    import importlib

    dg = importlib.import_module("comet_megatron.kernels.dispatch_gemm")
    gc = importlib.import_module("comet_megatron.kernels.gemm_combine")

    out = {}
    for name, fn in (("dispatch_gemm", dg._dispatch_gemm_kernel), ("gemm_combine", gc._gemm_combine_kernel)):
        try:
            for cache in fn.device_caches.values():
                for i, kernel in enumerate(cache[0].values()):
                    kernel._init_handles()
                    # in compilation order: per configuration, forward then backward
                    out[f"{name}#{i}"] = {"regs": kernel.n_regs, "spills": kernel.n_spills,
                                          "shared": kernel.metadata.shared}
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            out[name] = f"unavailable: {exc}"
    return out


def run(shapes, tokens_list, configs, reps: int, warmup: int, progress=None, world: int = 1,
        rounds: int = 1) -> list[dict]:
    import torch

    from statistics import median

    from comet_megatron.bench import load_shape
    from comet_megatron.fused import GPU_UNTUNED_DEFAULT
    from comet_megatron.kernels import KernelConfig

    if rounds < 1:
        raise ValueError(f"rounds={rounds}: at least one round")
    per_round = -(-reps // rounds)  # reps split over the rounds, rounded up
    records = []
    for name in shapes:
        shape = load_shape(name)
        for tokens in tokens_list:
            kb = KernelBench(shape, tokens, world=world)
            flops = kb.flops()
            gpu_default = GPU_UNTUNED_DEFAULT if torch.cuda.is_available() else {}
            knobs_of = [{**gpu_default, **_tuned(shape, tokens, world), **o} for o in configs]
            bases: list[dict] = []
            timings: list[list[dict]] = [[] for _ in configs]
            seconds = [0.0] * len(configs)
            failed: dict[int, str] = {}
            burn_in = True  # the first config is run once untimed (clocks, caches, lazy setup): no first-position bias
            for _ in range(rounds):  # interleaved: baselines, then every config, once per round
                bases.append(kb.cublas(per_round, warmup))
                for i, knobs in enumerate(knobs_of):
                    if i in failed:
                        continue
                    cfg = KernelConfig(gated=shape.gated, **knobs)
                    t0 = time.time()
                    try:
                        if burn_in:
                            kb.fused(cfg, 2, 1, kernels_only=True)
                            burn_in = False
                        timings[i].append(kb.fused(cfg, per_round, warmup))
                    except Exception as exc:  # noqa: BLE001 - e.g. too much shared memory: report, go on
                        failed[i] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    seconds[i] += time.time() - t0
            base = {k: median([b[k] for b in bases]) for k in bases[0]}
            for i, knobs in enumerate(knobs_of):
                if i in failed:
                    rec = {"shape": shape.name, "tokens": tokens, "config": knobs, "error": failed[i]}
                    records.append(rec)
                    print(f"\n{shape.name} tokens={tokens} config={knobs}: FAILED {rec['error']}", flush=True)
                    continue
                progs = timings[i][0]["_programs"]
                per_kernel = {k: [t[k] for t in timings[i]] for k in timings[i][0] if k != "_programs"}
                ours = {k: median(v) for k, v in per_kernel.items()}
                # each kernel's floor: cuBLAS scaled by the SMs its own compute programs get
                share = kb.sms / progs["compute"] if kb.sms else 1.0
                share_l1 = kb.sms / progs["compute_combine"] if kb.sms else 1.0

                def share_of(kname):  # gemm_combine has its own compute-program count
                    return share_l1 if kname.startswith("L1") else share
                rec = {"shape": shape.name, "tokens": tokens, "world": world,
                       "ranks": "emulated on one GPU" if world > 1 else "one", "rows_rank0": kb.rows,
                       "l1_includes_combine_reduce": world == 1, "config": knobs, "programs": progs,
                       "sms": kb.sms, "routing_ms": ours.pop("routing"), "kernels": {},
                       "rounds": rounds, "reps_per_round": per_round, "seconds": round(seconds[i], 1)}
                for kname, ms in ours.items():
                    ref = base[kname]
                    fused_kernel = not kname.startswith("wgrad")
                    rec["kernels"][kname] = {
                        "ms": ms, "cublas_ms": ref, "tflops": flops[kname] / ms / 1e9,
                        "cublas_tflops": flops[kname] / ref / 1e9, "vs_cublas": ref / ms,
                        "vs_sm_share": ref * share_of(kname) / ms if fused_kernel else None,
                        "rounds_ms": per_kernel[kname], "cublas_rounds_ms": [b[kname] for b in bases],
                    }
                for kname in ("L0 fwd", "L0 bwd"):  # GEMM + the unfused elementwise pass the kernel fuses
                    k = rec["kernels"][kname]
                    k["cublas_with_act_ms"] = base[f"{kname} +act"]
                    k["vs_sm_share_with_act"] = base[f"{kname} +act"] * share / k["ms"]
                for kname in ("L0 fwd", "L1 fwd", "L0 bwd", "L1 bwd"):  # world 1: the whole unfused pipeline
                    if f"{kname} unfused" in base:
                        k = rec["kernels"][kname]
                        k["unfused_ms"] = base[f"{kname} unfused"]
                        k["vs_sm_share_unfused"] = base[f"{kname} unfused"] * share_of(kname) / k["ms"]
                records.append(rec)
                if progress is not None:
                    progress(rec)
            del kb
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return records


def _our_wgrad_backend(a, b) -> str:
    """Which of our weight-gradient kernels `bench kernels` times: the Gluon kernel where it runs (Hopper, 16-bit
    operands TMA can load), else grouped_wgrad's Triton backend."""
    from comet_megatron.kernels.gluon_wgrad import gluon_wgrad_supported

    return "gluon" if a.is_cuda and gluon_wgrad_supported(a, b) is None else "triton"


def _grouped_loop(a, w, offs):
    """torch._grouped_mm's semantics on the CPU (smoke runs): 2-D a with offsets, a^T (K split) too."""
    import torch

    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if w.dim() == 2:  # wgrad form: a [K, M]^T-view, w [M', N] split along the shared dim
        return torch.stack([a[:, s:e] @ w[s:e] for s, e in zip(starts, ends)])
    return torch.cat([a[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))])


def _tuned(shape, tokens: int, world: int = 1) -> dict:
    import torch

    from comet_megatron import tune
    from comet_megatron.config import CometConfig

    key = tune.make_key(hidden=shape.hidden, ffn=shape.ffn, experts=shape.experts, topk=shape.topk,
                        gated=shape.gated, world=world, tokens=tokens,
                        dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    cached, _ = tune.cached_config(CometConfig().tune_cache, key)
    return dict(cached or {})


def print_table(records) -> None:
    for rec in records:
        print_record(rec)


def print_record(rec) -> None:
    if "error" in rec:
        return
    head = (f"{'shape':18s} {'tok':>6s} {'kernel':10s} {'ms':>8s} {'cuBLAS':>8s} {'TF/s':>6s} {'vs cuBLAS':>9s} "
            f"{'vs SM share':>11s} {'cuBLAS+act':>10s} {'vs share+act':>12s} {'unfused':>8s} {'vs share unf':>12s}")
    ep = f" EP={rec['world']} (ranks emulated on one GPU; L1 = rank 0's gemm_combine only)" if rec["world"] > 1 else ""
    print(f"\n{rec['shape']} tokens={rec['tokens']}{ep} programs={rec['programs']} config={rec['config']} "
          f"routing={rec['routing_ms']:.3f} ms")
    print(head)
    for kname, r in rec["kernels"].items():
        share = f"{r['vs_sm_share']:.3f}" if r["vs_sm_share"] is not None else "-"
        act = f"{r['cublas_with_act_ms']:10.3f}" if "cublas_with_act_ms" in r else f"{'-':>10s}"
        act_share = f"{r['vs_sm_share_with_act']:12.3f}" if "vs_sm_share_with_act" in r else f"{'-':>12s}"
        unf = f"{r['unfused_ms']:8.3f}" if "unfused_ms" in r else f"{'-':>8s}"
        unf_share = f"{r['vs_sm_share_unfused']:12.3f}" if "vs_sm_share_unfused" in r else f"{'-':>12s}"
        print(f"{rec['shape']:18s} {rec['tokens']:6d} {kname:10s} {r['ms']:8.3f} {r['cublas_ms']:8.3f} "
              f"{r['tflops']:6.0f} {r['vs_cublas']:9.3f} {share:>11s} {act} {act_share} {unf} {unf_share}",
              flush=True)


def parse_configs(text: str) -> list[dict]:
    """`--configs`: a JSON list of objects whose keys are KernelConfig fields (clear error otherwise)."""
    import dataclasses

    from comet_megatron.kernels import KernelConfig

    try:
        configs = json.loads(text)
    except ValueError:
        configs = None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise SystemExit(f"bench kernels: --configs must be a JSON list of objects, got {text!r}")
    fields = {f.name for f in dataclasses.fields(KernelConfig)}
    for c in configs:
        unknown = sorted(set(c) - fields)
        if unknown:
            raise SystemExit(f"bench kernels: --configs: unknown knob(s) {unknown}; known: {sorted(fields)}")
    return configs or [{}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="comet-megatron bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "qwen2-moe-a2.7b", "phi-3.5-moe"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192])
    parser.add_argument("--configs", default="[{}]",
                        help="JSON list of KernelConfig overrides to compare (default: the tuned/default one)")
    parser.add_argument("--world", type=int, default=1,
                        help="expert-parallel ranks EMULATED on this GPU (rank 0's kernels are timed: its "
                             "remote tiles go through the pull, its remote rows through the combine's "
                             "communication programs); default 1")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (cuBLAS baselines, then every config, once per round; "
                             "reps / rounds calls each, rounded up); the figures are medians over rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs)
    if args.world < 1:
        raise SystemExit(f"bench kernels: --world must be >= 1, got {args.world}")
    if any(t < 1 for t in args.tokens) or args.reps < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("bench kernels: --tokens, --reps and --rounds must be >= 1, --warmup >= 0")
    from comet_megatron.bench import load_shape

    for name in args.shapes:  # unknown names fail here, naming the known configs
        shape = load_shape(name)
        if shape.experts % args.world:
            raise SystemExit(f"bench kernels: {shape.experts} experts of {name} do not split over --world "
                             f"{args.world}")
    import os

    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench kernels: needs a CUDA GPU (the fused kernels are timed compiled); "
                         "TRITON_INTERPRET=1 runs a CPU smoke test whose timings mean nothing")
    records = run(args.shapes, args.tokens, configs, args.reps, args.warmup, progress=print_record,
                  world=args.world, rounds=args.rounds)
    stats = compiled_stats()
    for name, st in stats.items():
        print(f"compiled {name}: {st}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter (smoke)",
            "torch": torch.__version__}
    import triton

    from comet_megatron.bench import _git_commit

    meta.update(triton=triton.__version__, commit=_git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (out / "kernels.json").write_text(json.dumps({"meta": meta, "records": records, "compiled": stats}, indent=1, default=str))
    print(f"\nwrote {out / 'kernels.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
