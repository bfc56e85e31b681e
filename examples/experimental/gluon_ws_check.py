import importlib.util, sys, types, torch
spec = importlib.util.spec_from_file_location("ws", "examples/experimental/gluon_ws_layer1.py"); ws = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ws)
lr, cr, tokens, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dev = "cuda"; H, F, E, K = 2048, 1408, 8, 2
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
out = torch.full((R, H), float("nan"), device=dev, dtype=torch.bfloat16)
ws.ws_rows(a, w, lay, R, prob=prob, out=out, loader_regs=lr, consumer_regs=cr, mode=mode); torch.cuda.synchronize()
print("ok", lr, cr, tokens, "mode", mode, (out.float() - ref).abs().max().item(), flush=True)
