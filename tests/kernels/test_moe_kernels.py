"""Fused MoE kernels on emulated ranks against the float64 torch reference (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

from comet_megatron.kernels import (EmulatedGroup, KernelConfig, SignalTimeout, barrier, check_errors,
                                    moe_forward, publish, receive_layout, run_ranks)
from moe_reference import make_problem, reference_grads, reference_rank_outputs, rel_err, seed_from

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd sizes on purpose: H and F are not multiples of any block size below.
HIDDEN, FFN = 40, 20
SMALL = dict(block_m=16, block_n=16, block_k=16, block_h=32, num_comm_dispatch=2, num_comm_combine=2,
             num_compute=2)


@pytest.fixture
def seed(request) -> int:
    return seed_from(request.node.nodeid)


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty allocation during the test starts as NaN (floats) or INT_MIN (ints), so a
    row the kernels forget to write shows up in the comparison."""
    original = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(torch.iinfo(t.dtype).min)
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def make_group(p, dtype, capacity=None, **kwargs) -> EmulatedGroup:
    g = EmulatedGroup(p.world, capacity_tokens=capacity or max(max(x.shape[0] for x in p.xs), 1), topk=p.topk,
                      hidden=p.hidden, num_experts=p.num_experts, dtype=dtype, device=DEVICE, **kwargs)
    for v in g.views:  # data regions may hold garbage; only the signal regions must start at zero
        for name in ("tokens", "probs", "combine", "combine_scalars"):
            v.regions[name].fill_(float("nan"))
    return g


def to_dev(ts, dtype=None):
    return [t.to(DEVICE, dtype) if dtype is not None and t.is_floating_point() else t.to(DEVICE) for t in ts]


def run_and_check(p, group, cfg, dtype, tol, grad_seed, weights=None, reversed_experts=(False, False)):
    """Forward and backward round on every rank against the float64 reference. `weights`: per-rank (w1, w2)
    lists to use instead of the problem's (with `reversed_experts` as in `moe_forward`)."""
    el = p.local_experts
    if weights is None:
        weights = ([p.local_w1(r, dtype).to(DEVICE) for r in range(p.world)],
                   [p.local_w2(r, dtype).to(DEVICE) for r in range(p.world)])
    w1, w2 = weights
    xs, probs = to_dev(p.xs, dtype), to_dev(p.topk_probs)
    fwd = group.forward(xs, to_dev(p.topk_idx), probs, w1, w2, cfg, reversed_experts)
    ref = reference_rank_outputs(p)
    for r in range(p.world):
        assert rel_err(fwd[r][0].cpu(), ref[r]) < tol, f"forward rank {r}"
    g = torch.Generator().manual_seed(grad_seed)
    grad_outs = [torch.randn(x.shape, generator=g) for x in p.xs]
    bwd = group.backward([s for _, s in fwd], to_dev(grad_outs, dtype), w1, w2, cfg,
                         reversed_experts=reversed_experts)
    ref_rank, dw1, dw2 = reference_grads(p, grad_outs)
    for r in range(p.world):
        gx, gp, gw1, gw2 = (t.cpu() for t in bwd[r])
        assert rel_err(gx, ref_rank[r][0]) < tol, f"grad x rank {r}"
        assert rel_err(gp, ref_rank[r][1]) < tol, f"grad probs rank {r}"
        assert rel_err(gw1, dw1[r * el:(r + 1) * el]) < tol, f"dW1 rank {r}"
        assert rel_err(gw2, dw2[r * el:(r + 1) * el]) < tol, f"dW2 rank {r}"


CASES = {
    # name: (world, tokens per rank, topk, experts per rank, gated, activation, routing, config overrides)
    "w1_k1_swiglu": (1, [13], 1, 3, True, "silu", "uniform", {}),
    "w2_k2_swiglu": (2, [11, 7], 2, 2, True, "silu", "uniform", {}),
    "w2_k4_gelu": (2, [9, 10], 4, 3, False, "gelu", "uniform", {}),
    "w2_k2_swiglu_grouped_items": (2, [16, 13], 2, 1, True, "silu", "uniform", dict(group_m=2, group_n=2)),
    "w2_k2_geglu_bigtiles": (2, [12, 12], 2, 2, True, "gelu", "uniform",
                             dict(block_m=32, block_n=32, block_k=32, block_h=64)),
    "w4_k2_relu_skewed": (4, [10, 8, 12, 9], 2, 2, False, "relu", "skewed", {}),
    "w4_k2_swiglu_empty_experts": (4, [9, 9, 9, 9], 2, 2, True, "silu", "sparse", {}),
    "w4_k1_silu_rank_without_tokens": (4, [6, 0, 9, 3], 1, 1, False, "silu", "uniform", {}),
    "w4_k4_swiglu_one_comm_program": (4, [5, 7, 6, 4], 4, 2, True, "silu", "uniform",
                                      dict(num_comm_dispatch=1, num_comm_combine=1, num_compute=3)),
    "w8_k2_swiglu": (8, [4, 6, 0, 5, 3, 7, 2, 5], 2, 1, True, "silu", "uniform", {}),
    # Activation backward in the GEMM epilogue instead of the separate pass (gated and plain).
    "w2_k2_swiglu_fused_act_backward": (2, [11, 8], 2, 2, True, "silu", "uniform", dict(fused_act_backward=True)),
    "w2_k2_gelu_fused_act_backward": (2, [9, 12], 2, 2, False, "gelu", "skewed", dict(fused_act_backward=True)),
    # ... on column sub-blocks of the epilogue (4 and 2 per block; the last block partly past F)
    "w2_k2_swiglu_fused_act_backward_4_subblocks": (2, [11, 8], 2, 2, True, "silu", "uniform",
                                                    dict(fused_act_backward=True, bwd_block_n=32, bwd_epilogue_n=8)),
    "w2_k2_gelu_fused_act_backward_2_subblocks": (2, [9, 12], 2, 2, False, "gelu", "skewed",
                                                  dict(fused_act_backward=True, bwd_block_n=32, bwd_epilogue_n=16)),
    # Layer 0's forward epilogue on column sub-blocks (4 and 2 per block; the last block partly past F)
    "w2_k2_swiglu_forward_4_subblocks": (2, [10, 13], 2, 2, True, "silu", "uniform",
                                         dict(block_n=32, fwd_epilogue_n=8)),
    "w2_k2_gelu_forward_2_subblocks": (2, [12, 7], 2, 2, False, "gelu", "skewed", dict(block_n=32, fwd_epilogue_n=16)),
    # ... 8 pieces (forward, fused activation backward: F = 20 reaches into the second half of a 32-wide
    # block) and gemm_combine's epilogue in 8 and 4 (H = 40: into the second half of a 64-wide chunk)
    "w2_k2_swiglu_8_subblocks": (2, [13, 9], 2, 2, True, "silu", "uniform",
                                 dict(block_n=32, fwd_epilogue_n=4, fused_act_backward=True, bwd_block_n=32,
                                      bwd_epilogue_n=4, combine_block_n=64, combine_epilogue_n=8)),
    "w2_k2_gelu_combine_4_subblocks": (2, [11, 12], 2, 2, False, "gelu", "skewed",
                                       dict(combine_block_n=32, combine_epilogue_n=8)),
    # Rows of one token that meet on an expert rank are summed before they travel (pre_reduce): several
    # of a token's top-k experts per rank, partner rows in other tiles and super-chunks, a rank without
    # tokens, skewed loads, fp32 forward and backward (grad_x, grad_probs, weight gradients).
    "w2_k4_swiglu_pre_reduce": (2, [13, 9], 4, 3, True, "silu", "uniform",
                                dict(pre_reduce=True, group_n=2)),
    "w4_k4_gelu_pre_reduce_skewed": (4, [10, 0, 12, 7], 4, 2, False, "gelu", "skewed", dict(pre_reduce=True)),
    "w3_k2_swiglu_pre_reduce_grouped": (3, [15, 11, 8], 2, 1, True, "silu", "uniform",
                                        dict(pre_reduce=True, group_m=2, group_n=2)),
    # Each layer with its own column block (gemm_combine chunk, dispatch backward block).
    "w2_k2_swiglu_per_layer_blocks": (2, [14, 9], 2, 2, True, "silu", "uniform",
                                      dict(block_n=32, combine_block_n=16, bwd_block_n=16, bwd_num_stages=2)),
    # Enough rows per expert that whole M-tiles hold only the receiver's own rows (read in place by the
    # compute programs) next to tiles that mix local and remote rows (wait for the pull).
    "w2_k2_local_tiles_in_place": (2, [45, 38], 2, 1, True, "silu", "uniform", {}),
    "w3_k1_local_tiles_in_place": (3, [40, 33, 0], 1, 1, False, "gelu", "skewed", {}),
    # More communication programs than tiles: idle programs must still raise their arrival signals.
    "w2_k1_more_comm_programs_than_tiles": (2, [3, 2], 1, 1, False, "silu", "uniform",
                                            dict(num_comm_dispatch=5, num_comm_combine=6, num_compute=3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_backward_fp32(case, seed, poison):
    world, tokens, topk, epr, gated, act, routing, overrides = CASES[case]
    p = make_problem(seed, world=world, tokens=tokens, topk=topk, hidden=HIDDEN, ffn=FFN, experts_per_rank=epr,
                     gated=gated, activation=act, routing=routing)
    cfg = KernelConfig(activation=act, gated=gated, **{**SMALL, **overrides})
    run_and_check(p, make_group(p, torch.float32), cfg, torch.float32, 1e-4, seed + 1)


def test_forward_backward_fp16(seed, poison):
    p = make_problem(seed, world=2, tokens=[9, 6], topk=2, hidden=HIDDEN, ffn=FFN, experts_per_rank=2)
    run_and_check(p, make_group(p, torch.float16), KernelConfig(**SMALL), torch.float16, 2e-2, seed + 1)


def test_repeated_rounds_reuse_workspace(seed, poison):
    """Same workspace, increasing epochs, new routing and token counts each round: no stale flags."""
    first = make_problem(seed, world=2, tokens=[8, 5], topk=2, hidden=HIDDEN, ffn=FFN, experts_per_rank=2)
    group = make_group(first, torch.float32, capacity=12)
    cfg = KernelConfig(**SMALL)
    for i, tokens in enumerate(([8, 5], [12, 1], [3, 10])):
        p = make_problem(seed + 10 * i, world=2, tokens=tokens, topk=2, hidden=HIDDEN, ffn=FFN, experts_per_rank=2,
                         routing="skewed" if i == 1 else "uniform")
        run_and_check(p, group, cfg, torch.float32, 1e-4, seed + 10 * i + 1)
    assert all(v.epoch == 6 for v in group.views)  # one forward and one backward round per iteration


def test_receive_order_and_metadata(seed):
    """Receive rows are sorted by local expert, then source rank in ring order from the receiver, then
    pair id; recv_pair / recv_src / recv_prob describe each row."""
    world, epr, topk = 3, 2, 2
    p = make_problem(seed, world=world, tokens=[7, 5, 6], topk=topk, hidden=HIDDEN, ffn=FFN, experts_per_rank=epr)
    group = make_group(p, torch.float32)
    cfg = KernelConfig(**SMALL)
    w1 = [p.local_w1(r, torch.float32).to(DEVICE) for r in range(world)]
    w2 = [p.local_w2(r, torch.float32).to(DEVICE) for r in range(world)]
    fwd = group.forward(to_dev(p.xs), to_dev(p.topk_idx), to_dev(p.topk_probs), w1, w2, cfg)
    for r in range(world):
        expected = []
        for j in range(epr):
            for i in range(world):
                s = (r + i) % world
                flat = p.topk_idx[s].reshape(-1)
                expected += [(s, pair) for pair in range(flat.numel()) if flat[pair] == r * epr + j]
        d = fwd[r][1].dispatch
        got = list(zip(d.recv_src.tolist(), d.recv_pair.tolist()))
        assert got == expected
        src_x = torch.stack([p.xs[s][pair // topk] for s, pair in expected])
        src_p = torch.stack([p.topk_probs[s].reshape(-1)[pair] for s, pair in expected])
        torch.testing.assert_close(d.recv.cpu(), src_x, rtol=0, atol=0)
        torch.testing.assert_close(d.recv_prob.cpu(), src_p, rtol=0, atol=0)
        layout = fwd[r][1].layout
        rows = layout.expert_offsets.tolist()
        assert rows[-1] == len(expected)
        # Tiles: never straddle experts; processing order starts with tiles made only of local rows.
        n = int(layout.num_tiles[0])
        for q in range(n):
            j, a, b = (int(t[q]) for t in (layout.tile_expert, layout.tile_row_start, layout.tile_row_end))
            assert rows[j] <= a < b <= rows[j + 1] and b - a <= layout.block_m
        covered = sorted(row for q in range(n)
                         for row in range(int(layout.tile_row_start[q]), int(layout.tile_row_end[q])))
        assert covered == list(range(rows[-1]))
        # Processing order: by ring position of a tile's last row, so local-only tiles come first.
        last_src = [(int(d.recv_src[int(layout.tile_row_end[q]) - 1]) - r) % world for q in range(n)]
        assert last_src == sorted(last_src)


def test_world_size_1_round_knows_its_row_count_without_the_gpu(seed):
    """At world size 1 every (token, slot) pair comes back to the rank: the forward round sizes its receive
    tensors from that count (no host sync) and never reads the device's expert offsets; the count is the one
    the layout kernel computed, and the forward is correct (checked against float64 in the w1 CASES)."""
    p = make_problem(seed, world=1, tokens=[11], topk=3, hidden=HIDDEN, ffn=FFN, experts_per_rank=4)
    group = make_group(p, torch.float32)
    fwd = group.forward(to_dev(p.xs), to_dev(p.topk_idx), to_dev(p.topk_probs),
                        [p.local_w1(0, torch.float32).to(DEVICE)], [p.local_w2(0, torch.float32).to(DEVICE)],
                        KernelConfig(**SMALL))
    layout = fwd[0][1].layout
    assert layout.known_rows == 11 * 3 and layout._offsets_host is None  # never read from the device
    assert layout.expert_offsets.tolist()[-1] == layout.known_rows
    assert fwd[0][1].dispatch.recv.shape[0] == 33


def test_trace_mode(seed):
    p = make_problem(seed, world=2, tokens=[6, 8], topk=2, hidden=HIDDEN, ffn=FFN, experts_per_rank=1)
    group = make_group(p, torch.float32)
    cfg = KernelConfig(trace=True, **SMALL)
    w1 = [p.local_w1(r, torch.float32).to(DEVICE) for r in range(2)]
    w2 = [p.local_w2(r, torch.float32).to(DEVICE) for r in range(2)]
    fwd = group.forward(to_dev(p.xs), to_dev(p.topk_idx), to_dev(p.topk_probs), w1, w2, cfg)
    for _, state in fwd:
        n_tiles = int(state.layout.num_tiles[0])
        t = state.dispatch.trace.cpu()
        comm, compute = t[:n_tiles], t[state.layout.max_tiles:]
        assert (comm >= 0).all() and (comm[:, 0] <= comm[:, 1]).all()
        live = compute[compute[:, 0] >= 0]
        assert live.shape[0] == n_tiles * -(-FFN // cfg.block_n) and (live[:, 0] <= live[:, 1]).all()
        # A compute item starts only after its tile landed (the interpreter's tick counter is global).
        assert live[:, 0].min() > comm[:, 1].min()
        c = state.combine_trace.cpu()
        assert (c[:, 0] >= 0).sum() >= 2 * n_tiles


def test_peer_that_never_publishes_times_out(seed):
    """Rank 1 never publishes: rank 0's bounded waits expire and the host raises, naming rank and flag."""
    p = make_problem(seed, world=2, tokens=[5, 5], topk=2, hidden=HIDDEN, ffn=FFN, experts_per_rank=1)
    group = make_group(p, torch.float32, timeout=200)
    v0 = group.views[0]
    epoch = v0.next_epoch()
    publish(v0, p.xs[0].to(DEVICE), epoch, p.topk_idx[0].to(DEVICE), p.topk_probs[0].to(DEVICE))
    receive_layout(v0, epoch, 16)
    with pytest.raises(SignalTimeout,
                       match=r"rank 0/2 during receive_layout: .*inputs_ready signal .* 1 to reach epoch 1"):
        check_errors(v0, "receive_layout")
    check_errors(v0)  # the error buffer was cleared


def test_peer_that_never_delivers_times_out(seed):
    """Rank 1 stops after publishing: rank 0's combine_reduce times out on rank 1's arrival signals."""
    p = make_problem(seed, world=2, tokens=[5, 6], topk=2, hidden=HIDDEN, ffn=FFN, experts_per_rank=1)
    group = make_group(p, torch.float32, timeout=200)
    cfg = KernelConfig(**SMALL)
    gens = [moe_forward(v, p.xs[r].to(DEVICE), p.topk_idx[r].to(DEVICE), p.topk_probs[r].to(DEVICE),
                        p.local_w1(r, torch.float32).to(DEVICE), p.local_w2(r, torch.float32).to(DEVICE), cfg)
            for r, v in enumerate(group.views)]
    for g in gens:
        next(g)  # both publish
    assert next(gens[0]) == "dispatch_gemm+gemm_combine"  # rank 1 never runs its kernels
    with pytest.raises(SignalTimeout, match=r"rank 0/2 during combine_reduce: combine_reduce timed out .*arrival"):
        run_ranks([gens[0]], [group.views[0]])


def test_barrier(seed):
    p = make_problem(seed, world=3, tokens=[1, 1, 1], topk=1, hidden=HIDDEN, ffn=FFN, experts_per_rank=1)
    group = make_group(p, torch.float32, timeout=200)
    for epoch in (1, 2):
        for v in group.views:
            barrier(v, epoch, wait=False)
        for v in group.views:
            barrier(v, epoch, arrive=False)
            check_errors(v)
    for v in group.views[:2]:  # rank 2 does not arrive at epoch 3
        barrier(v, 3, wait=False)
    barrier(group.views[0], 3, arrive=False)
    with pytest.raises(SignalTimeout, match=r"barrier signal of rank 2"):
        check_errors(group.views[0])


@pytest.mark.parametrize("k_major", [False, True], ids=["n_major_weights", "k_major_weights"])
@pytest.mark.parametrize("world,tokens,topk", [(1, [21], 2), (2, [13, 9], 2), (4, [7, 0, 9, 5], 4)])
def test_tma_descriptor_path(world, tokens, topk, k_major, seed, poison, monkeypatch):
    """The TMA-descriptor operand path (the default on Hopper GPUs) gives the reference results: forced on
    here so the interpreter checks its index arithmetic (3-D weight blocks, per-expert bounds, rows past
    a tile); both weight layouts (Megatron's [out, in] parameters are the K-major case)."""
    p = make_problem(seed, world=world, tokens=tokens, topk=topk, hidden=48, ffn=24, experts_per_rank=2,
                     gated=True, routing="skewed")
    cfg = KernelConfig(**{**SMALL, "use_tma": True})
    if k_major:
        real_w1, real_w2 = p.local_w1, p.local_w2
        monkeypatch.setattr(p, "local_w1", lambda r, dt: real_w1(r, dt).transpose(1, 2).contiguous().transpose(1, 2))
        monkeypatch.setattr(p, "local_w2", lambda r, dt: real_w2(r, dt).transpose(1, 2).contiguous().transpose(1, 2))
    run_and_check(p, make_group(p, torch.float32), cfg, torch.float32, 1e-4, seed + 1)


def _descending(w: torch.Tensor, gap: int) -> torch.Tensor:
    """[El, A, B] expert weights re-homed as Megatron's distributed optimizer does: descending expert order,
    `gap` elements of other parameters between consecutive experts. Returns the view in memory order
    (view[i] = expert El-1-i), the operand of `reversed_experts`; the gaps hold NaN (a read of them shows)."""
    el, a, b = w.shape
    buf = torch.full((el * (a * b + gap),), float("nan"), dtype=w.dtype, device=w.device)
    view = buf.as_strided((el, a, b), (a * b + gap, b, 1))
    view.copy_(w.flip(0))
    return view


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer_loads", "tma"])
@pytest.mark.parametrize("world,tokens,topk", [(1, [21], 2), (2, [13, 9], 2)])
def test_reversed_expert_weights_read_in_place(world, tokens, topk, use_tma, seed, poison):
    """Weights stored in descending expert order with other parameters between them (Megatron's distributed
    optimizer layout) are read in place through `reversed_experts`: view index i is expert El-1-i. Forward,
    input and router gradients and the weight gradients (in expert order) equal the float64 reference, for
    both operand paths; Megatron's [out, in] parameters (K-major) in the layer, so K-major here."""
    p = make_problem(seed, world=world, tokens=tokens, topk=topk, hidden=48, ffn=24, experts_per_rank=3,
                     gated=True, routing="skewed")
    cfg = KernelConfig(**{**SMALL, "use_tma": use_tma})
    # [El, out, in] parameters laid out descending, seen as [El, in, out] (K-major) by the kernels
    w1 = [_descending(p.local_w1(r, torch.float32).transpose(1, 2).contiguous(), 16).transpose(1, 2).to(DEVICE)
          for r in range(p.world)]
    w2 = [_descending(p.local_w2(r, torch.float32).transpose(1, 2).contiguous(), 32).transpose(1, 2).to(DEVICE)
          for r in range(p.world)]
    run_and_check(p, make_group(p, torch.float32), cfg, torch.float32, 1e-4, seed + 1, weights=(w1, w2),
                  reversed_experts=(True, True))


def test_pre_reduce_sends_one_row_per_token_and_rank(seed, poison):
    """With pre_reduce, of the rows of one token that meet on an expert rank only one crosses to the
    owner: the owner's combine slots of the other k stay untouched (NaN from the poisoned workspace),
    the leader slots (smallest k per remote rank) hold data, and the output still equals the reference."""
    p = make_problem(seed, world=2, tokens=[16, 12], topk=4, hidden=HIDDEN, ffn=FFN, experts_per_rank=3)
    group = make_group(p, torch.float32)
    cfg = KernelConfig(**{**SMALL, "pre_reduce": True})
    w1 = [p.local_w1(r, torch.float32).to(DEVICE) for r in range(p.world)]
    w2 = [p.local_w2(r, torch.float32).to(DEVICE) for r in range(p.world)]
    fwd = group.forward(to_dev(p.xs), to_dev(p.topk_idx), to_dev(p.topk_probs), w1, w2, cfg)
    ref = reference_rank_outputs(p)
    skipped = 0
    for r in range(p.world):
        assert rel_err(fwd[r][0].cpu(), ref[r]) < 1e-4
        combine = group.views[r].regions["combine"].cpu()
        for t, experts in enumerate(p.topk_idx[r].tolist()):
            for k, e in enumerate(experts):
                owner = e // p.local_experts
                slot = combine[t * p.topk + k]
                leader = all(experts[kk] // p.local_experts != owner for kk in range(k))
                if owner == r or leader:
                    assert torch.isfinite(slot).all(), (r, t, k)
                else:
                    assert torch.isnan(slot).all(), f"rank {r} token {t} slot {k}: a pre-reduced row was sent"
                    skipped += 1
    assert skipped > 0  # the routing put several of a token's experts on one remote rank


def test_epilogue_sub_block_width_is_checked(seed):
    """A sub-block width that does not divide the column block is refused naming the knob; a narrow one is
    widened to at most 8 sub-blocks (and still exact)."""
    p = make_problem(seed, world=1, tokens=[9], topk=2, hidden=HIDDEN, ffn=FFN, experts_per_rank=2)
    w1, w2 = [p.local_w1(0, torch.float32).to(DEVICE)], [p.local_w2(0, torch.float32).to(DEVICE)]
    with pytest.raises(ValueError, match="fwd_epilogue_n"):
        make_group(p, torch.float32).forward(to_dev(p.xs), to_dev(p.topk_idx), to_dev(p.topk_probs), w1, w2,
                                             KernelConfig(**{**SMALL, "block_n": 32, "fwd_epilogue_n": 12}))
    cfg = KernelConfig(**{**SMALL, "block_n": 32, "fwd_epilogue_n": 1, "combine_block_n": 64, "combine_epilogue_n": 2})
    run_and_check(p, make_group(p, torch.float32), cfg, torch.float32, 1e-4, seed + 1)


def test_combine_programs_at_world_size_1():
    """gemm_combine and combine_reduce resolve the same communication count: 1 at world size 1 unless set."""
    from comet_megatron.kernels.config import combine_programs, default_programs

    cpu = torch.device("cpu")
    assert combine_programs(cpu, 1, None, None)[0] == 1
    assert combine_programs(cpu, 1, 3, None)[0] == 3
    assert combine_programs(cpu, 2, None, None) == default_programs(cpu, None, None)


def test_dispatch_programs_at_world_size_1(monkeypatch):
    """dispatch_gemm's copy programs at world size 1 on a GPU: fewer the wider the expert (2H bytes per row
    against 2 H F1 flops), between 2 and SMs / 8; explicit counts, other world sizes and the CPU unchanged."""
    from types import SimpleNamespace

    from comet_megatron.kernels.config import default_programs, dispatch_programs

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    gpu = torch.device("cuda", 0)
    assert [dispatch_programs(gpu, 1, f1, None, None)[0] for f1 in (28672, 12800, 2816, 64)] == [3, 6, 16, 16]
    assert dispatch_programs(gpu, 1, 28672, None, None)[1] == 129
    assert dispatch_programs(gpu, 1, 28672, 5, None)[0] == 5
    assert dispatch_programs(gpu, 2, 28672, None, None) == default_programs(gpu, None, None) == (16, 116)
    cpu = torch.device("cpu")
    assert dispatch_programs(cpu, 1, 28672, None, None) == default_programs(cpu, None, None)
