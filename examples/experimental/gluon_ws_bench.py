import importlib.util, json, os, statistics, sys, types
import torch
from comet_megatron.kernels.gluon_gemm import grouped_gemm_rows
spec = importlib.util.spec_from_file_location("ws", "examples/experimental/gluon_ws_layer1.py"); ws = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ws)
dev = "cuda"
SHAPES = {"qwen2": (2048, 1408, 60, 4), "mixtral": (4096, 14336, 8, 2), "phi": (4096, 6400, 16, 2)}
big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

def queued_ms(f, reps=15):
    for _ in range(3): f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        big @ big; s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return round(statistics.median(ts), 4)

res = {}
cases = [("qwen2", 8192), ("qwen2", 2048), ("qwen2", 16384), ("mixtral", 2048), ("mixtral", 8192), ("phi", 8192)]
if len(sys.argv) > 1:
    cases = cases[:int(sys.argv[1])]
for shape, tokens in cases:
    H, F, E, K = SHAPES[shape]
    torch.manual_seed(0)
    R = tokens * K
    idx = torch.randn(tokens, E, device=dev).topk(K, dim=1).indices.flatten()
    counts = torch.bincount(idx, minlength=E).tolist()
    st, en, ex, off = [], [], [], 0
    for e, c in enumerate(counts):
        for s in range(0, c, 128):
            st.append(off + s); en.append(off + min(s + 128, c)); ex.append(e)
        off += c
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)
    lay = types.SimpleNamespace(tile_expert=i32(ex), tile_row_start=i32(st), tile_row_end=i32(en),
                                num_tiles=i32([len(ex)] * 2), max_tiles=len(ex))
    a = torch.randn(R, F, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(E, H, F, device=dev, dtype=torch.bfloat16) / F ** 0.5).transpose(1, 2)
    prob = torch.rand(R, device=dev)
    offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    ref = torch._grouped_mm(a, w, offs=offs).float() * prob[:, None]
    r = {"cublas": queued_ms(lambda: torch._grouped_mm(a, w, offs=offs))}
    out = torch.empty(R, H, device=dev, dtype=torch.bfloat16)
    r["gluon"] = queued_ms(lambda: grouped_gemm_rows(a, w, lay, R, prob=prob, out=out))
    for lr, cr in ((24, 232), (40, 232)):
        name = f"ws_{lr}_{cr}"
        try:
            out.fill_(float("nan"))
            ws.ws_rows(a, w, lay, R, prob=prob, out=out, loader_regs=lr, consumer_regs=cr); torch.cuda.synchronize()
            r[name + "_err"] = round((out.float() - ref).abs().max().item(), 4)
            r[name] = queued_ms(lambda: ws.ws_rows(a, w, lay, R, prob=prob, out=out, loader_regs=lr,
                                                   consumer_regs=cr))
        except Exception as exc:  # noqa
            r[name] = repr(exc)[-300:]
    res[f"{shape}-{tokens}"] = r
    print(shape, tokens, json.dumps(r), flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "wsbench.json"), "w"), indent=1)
