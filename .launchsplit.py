import collections, os, sys, time
import torch, triton
from comet_megatron.bench import _init_distributed, build_layers, load_shape
from comet_megatron.kernels import launch as L
stats = collections.defaultdict(list)
sig_t = collections.defaultdict(list)
orig_launch, orig_sig = L.launch, L.bind
cur = [None]
def tsig(args, kwargs):
    t = time.perf_counter(); r = orig_sig(args, kwargs); sig_t[cur[0]].append(time.perf_counter() - t); return r
L.bind = tsig
import importlib
mods = [importlib.import_module(f"comet_megatron.kernels.{m}") for m in ("accumulate", "dispatch_gemm", "gemm_combine", "routing", "signals", "wgrad")]
def timed(kernel, grid, *a, **k):
    cur[0] = kernel.fn.__name__
    t = time.perf_counter(); r = orig_launch(kernel, grid, *a, **k); stats[cur[0]].append(time.perf_counter() - t); return r
for m in mods: m.launch = timed
_init_distributed()
shape = load_shape("qwen2-moe-a2.7b")
layer = build_layers(shape, ["comet-fused"], ddp=True)["comet-fused"]
x = torch.randn(2048, 1, shape.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn_like(x)
for _ in range(10):
    y, _ = layer(x); y.backward(dy)
torch.cuda.synchronize(); stats.clear(); sig_t.clear()
for _ in range(20):
    y, _ = layer(x); y.backward(dy)
torch.cuda.synchronize()
for name, v in sorted(stats.items(), key=lambda kv: -sum(kv[1])):
    v = sorted(v); s = sorted(sig_t[name])
    print(f"{name:28s} launch median {v[len(v)//2]*1e6:7.1f} us, signature median {s[len(s)//2]*1e6:6.1f} us")
# one GEMM launch: pieces
import cProfile, pstats, io
pr = cProfile.Profile(); pr.enable()
for _ in range(10):
    y, _ = layer(x); y.backward(dy)
torch.cuda.synchronize(); pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])
