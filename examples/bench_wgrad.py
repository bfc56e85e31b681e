"""Expert weight gradients accumulated into fp32 `main_grad`: the ways comet can do it, timed side by side.

    python examples/bench_wgrad.py --shapes mixtral-8x7b qwen2-moe-a2.7b phi-3.5-moe --tokens 2048 8192 \
        --out wgrad.json

Under Megatron's DDP every expert's weight gradient ends in its fp32 `main_grad` (one slice of a flat buffer,
in DDP's own order). Per shape, token count and linear (fc1: [2F, H] from d_pre and x; fc2: [H, F] from the
output gradient and h * p), random rows split evenly over the experts (`--rows routed`: as a random top-k
routing splits them, unevenly, as in the layer), it times (median of CUDA-event timings
after warm-up, L2 flushed, `triton.testing.do_bench`):

* `cublas-addmm`: one cuBLAS GEMM per expert with beta = 1 into `main_grad` (`experts.accumulate_wgrad_gemms`);
* `grouped+add`: cuBLAS's grouped GEMM to a bf16 [El, M, N] gradient, then one Triton add into the
  `main_grad`s (`kernels.accumulate`);
* `gluon-ws` (`--ws-configs` variants): `kernels.gluon_wgrad.grouped_wgrad_ws`, the warp-specialised persistent
  Gluon kernel (Hopper): main loop and `main_grad` epilogue in different warps, overlapped;
* `triton` (and `--configs` variants): `kernels.wgrad.grouped_wgrad_accumulate`, one launch for every expert,
  with the epilogue the layer uses (`COMET_WGRAD_TMA_OUT`); `{"tma_out": true}` / `{"tma_out": false}`: its tiles
  leave through TMA (bulk reduce-add / store) / through registers.

and prints ms, TB/s of `main_grad` traffic (read + write of fp32), TFLOP/s and each one's speed vs
`cublas-addmm`. Checks every variant's result against `cublas-addmm`'s first.

`--overwrite`: the same variants as a step's first micro-batch runs them (`experts.main_grads_zeroed`): written,
not added (cuBLAS beta = 0, the Triton kernels' `overwrite`), traffic = the fp32 write alone.

`--target bf16`: the weight gradients as a fresh bf16 [El, M, N] tensor instead (`kernels.grouped_wgrad`, what the
reference path's backward computes where no `main_grad` takes them, and `bench kernels`' `wgrad` rows): `grouped_mm`
(cuBLAS's grouped GEMM, K split by expert), `triton` (the Triton backend with its tiles, `grouped_wgrad_tiles`)
and `--configs` variants (keyword sets for `grouped_wgrad`: block_m, block_n, block_k, group_m, num_warps,
num_stages, tma_out), `--ws-configs` variants (`grouped_wgrad`'s "gluon" backend: the Gluon kernel writing the
bf16 output, knobs of `wgrad_ws_plan`); speed vs `grouped_mm`,
each result checked against it.
"""

from __future__ import annotations

import argparse
import json
import sys


def expert_counts(tokens: int, experts: int, topk: int, how: str = "even") -> list[int]:
    """Rows per expert for `tokens` tokens routed to `topk` of `experts` experts each: split evenly, or
    ("routed") as a random routing assigns them (each token's top-k of uniform random scores; seed 0)."""
    rows = tokens * topk
    if how == "even":
        return [rows // experts + (1 if e < rows % experts else 0) for e in range(experts)]
    if how != "routed":
        raise ValueError(f"rows split {how!r}: use even or routed")
    import torch

    gen = torch.Generator().manual_seed(0)
    picks = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
    return torch.bincount(picks.reshape(-1), minlength=experts).tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "qwen2-moe-a2.7b", "phi-3.5-moe"])
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--configs", default="[{}]",
                   help="JSON list of keyword sets for grouped_wgrad_accumulate, each timed as its own variant "
                        "({} = its Hopper tiles, kernels.wgrad.WGRAD_ACCUMULATE_TILES)")
    p.add_argument("--ws-configs", default="[]",
                   help="JSON list of keyword sets for kernels.gluon_wgrad.grouped_wgrad_ws (the warp-specialised "
                        "Gluon kernel, Hopper), each timed as its own variant 'gluon-ws ...' ({} = its defaults)")
    p.add_argument("--rows", choices=("even", "routed"), default="even",
                   help="rows per expert: split evenly, or as a random top-k routing of the tokens assigns them "
                        "(uneven, as in the layer; seeded)")
    p.add_argument("--overwrite", action="store_true",
                   help="write the gradients instead of adding them (a step's first micro-batch)")
    p.add_argument("--target", choices=("main-grad", "bf16"), default="main-grad",
                   help="accumulate into fp32 main_grads (default), or write a fresh bf16 gradient (grouped_wgrad)")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    args = p.parse_args(argv)
    if args.target == "bf16" and args.overwrite:
        p.error("--overwrite is for --target main-grad (a fresh bf16 gradient is always written)")
    try:
        ws_configs = json.loads(args.ws_configs)
    except json.JSONDecodeError as exc:
        p.error(f"--ws-configs: not JSON ({exc}); give a list of keyword sets, e.g. '[{{}}, {{\"block_k\": 64}}]'")
    if not isinstance(ws_configs, list) or not all(isinstance(c, dict) for c in ws_configs):
        p.error("--ws-configs: give a JSON list of keyword sets (objects)")

    import torch
    import triton

    from comet_megatron.bench import load_shape
    from comet_megatron.experts import accumulate_wgrad_gemms, wgrad_tma_out
    from comet_megatron.kernels import accumulate
    from comet_megatron.kernels.wgrad import (WGRAD_ACCUMULATE_TILES, grouped_wgrad_accumulate, outputs_aligned,
                                              tma_output_rows)

    if not torch.cuda.is_available():
        print("bench_wgrad.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    configs = json.loads(args.configs)
    bf16 = args.target == "bf16"
    dev = torch.device("cuda")
    records = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name in args.shapes:
        shape = load_shape(name)
        f1 = 2 * shape.ffn if shape.gated else shape.ffn
        for tokens in args.tokens:
            rows = tokens * shape.topk
            el = shape.experts
            counts = expert_counts(tokens, el, shape.topk, args.rows)
            offsets = [0]
            for c in counts:
                offsets.append(offsets[-1] + c)
            dev_offsets = torch.tensor(offsets, dtype=torch.int32, device=dev)
            for linear, (m_dim, n_dim) in (("fc1", (f1, shape.hidden)), ("fc2", (shape.hidden, shape.ffn))):
                a = torch.randn(rows, m_dim, device=dev, dtype=torch.bfloat16)
                b = torch.randn(rows, n_dim, device=dev, dtype=torch.bfloat16)
                if bf16:
                    records += _bf16_records(name, tokens, linear, a, b, dev_offsets, counts, configs, args.rows,
                                             ws_configs)
                    del a, b
                    continue
                # main_grads in reversed order in one flat buffer, as Megatron's DDP lays them out
                flat = torch.zeros(el * m_dim * n_dim, device=dev, dtype=torch.float32)
                mains = [flat[(el - 1 - e) * m_dim * n_dim:][:m_dim * n_dim].view(m_dim, n_dim) for e in range(el)]
                base = accumulate.flat_base(mains)
                host_offsets = accumulate.element_offsets(base, mains)
                out_offsets = torch.tensor(host_offsets, dtype=torch.int64, device=dev)
                out_rows = tma_output_rows(base, host_offsets, m_dim, n_dim)
                aligned = outputs_aligned(base, host_offsets, n_dim)  # as the layer tells the kernels

                ow = args.overwrite

                def cublas():
                    accumulate_wgrad_gemms(mains, a, b, offsets, ow)

                def grouped_add():
                    g = torch._grouped_mm(a.t(), b, offs=dev_offsets[1:])
                    accumulate.accumulate_into(base, out_offsets, g, ow)

                variants = {"cublas-addmm": cublas, "grouped+add": grouped_add}
                for i, cfg in enumerate(configs):
                    # as the layer runs it
                    kw = {**WGRAD_ACCUMULATE_TILES, "tma_out": wgrad_tma_out(), "aligned": aligned, **cfg}
                    label = "triton" if not cfg else f"triton {json.dumps(cfg, sort_keys=True)}"
                    variants[label] = (lambda kw=kw: grouped_wgrad_accumulate(a, b, dev_offsets, base, out_offsets,
                                                                              overwrite=ow, out_rows=out_rows, **kw))
                for cfg in ws_configs:
                    from comet_megatron.kernels.gluon_wgrad import grouped_wgrad_ws

                    variants[f"gluon-ws {json.dumps(cfg, sort_keys=True)}"] = (
                        lambda cfg=cfg: grouped_wgrad_ws(a, b, dev_offsets, base, out_offsets, overwrite=ow,
                                                         **{"aligned": aligned, **_rows_for(cfg, out_rows), **cfg}))
                # correctness: each variant once from zero (overwrite: from NaN, never read) against cublas-addmm
                start = float("nan") if ow else 0.0
                flat.fill_(start)
                cublas()
                want = flat.clone()
                for label, fn in variants.items():
                    flat.fill_(start)
                    try:
                        fn()
                        torch.cuda.synchronize()
                        err = ((flat - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                    except Exception as exc:  # a config Triton cannot compile: report it, go on
                        print(f"  {name} {tokens} {linear} {label}: FAILED {type(exc).__name__}: {exc}"[:300])
                        continue
                    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                    flops = 2.0 * rows * m_dim * n_dim
                    traffic = (4.0 if ow else 8.0) * el * m_dim * n_dim  # fp32 main_grad (read +) write
                    records.append(dict(shape=name, tokens=tokens, linear=linear, variant=label, ms=ms,
                                        overwrite=ow, rows_split=args.rows, max_rows=max(counts),
                                        tflops=flops / ms / 1e9, main_grad_tbs=traffic / ms / 1e9, rel_err=err))
                base_ms = next(r["ms"] for r in records if r["shape"] == name and r["tokens"] == tokens
                               and r["linear"] == linear and r["variant"] == "cublas-addmm")
                for r in records:
                    if r["shape"] == name and r["tokens"] == tokens and r["linear"] == linear:
                        r["vs_cublas"] = base_ms / r["ms"]
                        print(f"{name:16s} {tokens:6d} {linear} {r['variant']:40s} {r['ms']:8.3f} ms "
                              f"{r['main_grad_tbs']:5.2f} TB/s {r['tflops']:6.1f} TFLOP/s "
                              f"x{r['vs_cublas']:.2f} (err {r['rel_err']:.1e})")
                del a, b, flat, mains, base, out_rows
    if args.out:
        for r in records:
            r["target"] = args.target
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, records=records), fh, indent=1)
    return 0


def _rows_for(cfg, out_rows) -> dict:
    """The main_grads as rows for a Gluon variant that asks for the TMA store (`{"tma_store": true}`)."""
    return {"out_rows": out_rows} if cfg.get("tma_store") and out_rows is not None else {}


def _gluon_bf16(a, b, dev_offsets, cfg):
    """The Gluon weight-gradient kernel writing a fresh [El, M, N] gradient in a's dtype: grouped_wgrad's "gluon"
    backend, `cfg` its knobs (`wgrad_ws_plan`'s)."""
    from comet_megatron.kernels.wgrad import grouped_wgrad

    return grouped_wgrad(a, b, dev_offsets, backend="gluon", **cfg)


def _bf16_records(name, tokens, linear, a, b, dev_offsets, counts, configs, rows_split, ws_configs=()) -> list:
    """`--target bf16`: the fresh bf16 weight gradient by cuBLAS's grouped GEMM and by grouped_wgrad's Triton
    backend (+ configs, + the Gluon kernel writing it: `ws_configs`), each checked against cuBLAS's, timed,
    printed."""
    import torch
    import triton

    from comet_megatron.kernels.wgrad import grouped_wgrad

    def cublas():
        return torch._grouped_mm(a.t(), b, offs=dev_offsets[1:])

    variants = {"grouped_mm": cublas, "triton": lambda: grouped_wgrad(a, b, dev_offsets, backend="triton")}
    for cfg in configs:
        if cfg:
            variants[f"triton {json.dumps(cfg, sort_keys=True)}"] = (
                lambda cfg=cfg: grouped_wgrad(a, b, dev_offsets, backend="triton", **cfg))
    for cfg in ws_configs:
        variants[f"gluon-ws {json.dumps(cfg, sort_keys=True)}"] = (
            lambda cfg=cfg: _gluon_bf16(a, b, dev_offsets, cfg))
    want = cublas().float()
    scale = want.abs().max().clamp_min(1e-30)
    out = []
    for label, fn in variants.items():
        try:
            err = ((fn().float() - want).abs().max() / scale).item()
        except Exception as exc:  # a config Triton cannot compile: report it, go on
            print(f"  {name} {tokens} {linear} {label}: FAILED {type(exc).__name__}: {exc}"[:300])
            continue
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        out.append(dict(shape=name, tokens=tokens, linear=linear, variant=label, ms=ms, rows_split=rows_split,
                        max_rows=max(counts), tflops=flops / ms / 1e9, rel_err=err))
    base_ms = out[0]["ms"]
    for r in out:
        r["vs_grouped_mm"] = base_ms / r["ms"]
        print(f"{name:16s} {tokens:6d} {linear} {r['variant']:40s} {r['ms']:8.3f} ms {r['tflops']:6.1f} TFLOP/s "
              f"x{r['vs_grouped_mm']:.2f} (err {r['rel_err']:.1e})")
    return out


if __name__ == "__main__":
    sys.exit(main())
