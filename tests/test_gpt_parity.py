"""A 2-layer MoE GPTModel trained for a few steps: comet's loss curve == Megatron alltoall's.

Both models start from identical weights (state dict copied: the comet layer keeps Megatron's
parameter names) and see the same batches; non-expert gradients are averaged over data-parallel
ranks as Megatron's DDP would, expert gradients over the expert-data-parallel group.
"""

from __future__ import annotations

import pytest

from mp import run_distributed

STEPS = 4


def _train(rank, dispatcher, state, steps, topk, aux):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from moe_cases import make_config

    cfg = make_config(
        dispatcher,
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=48,
        moe_ffn_hidden_size=48,
        num_moe_experts=4,
        moe_router_topk=topk,
        moe_aux_loss_coeff=0.01 if aux else 0.0,
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_router_pre_softmax=topk == 1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    torch.manual_seed(1234)
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16,
        position_embedding_type="rope",
    )
    if state is not None:
        model.load_state_dict(state, strict=True)
    init_state = {k: v.clone() for k, v in model.state_dict().items() if v is not None and torch.is_tensor(v)}
    moe_types = sorted({type(m).__name__ for m in model.modules() if "MoE" in type(m).__name__})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dp = ps.get_data_parallel_group()
    edp = ps.get_expert_data_parallel_group()
    losses = []
    for step in range(steps):
        # One fixed batch per rank: the loss must fall as the model fits it.
        g = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
        tokens = torch.randint(0, 64, (2, 16), generator=g)
        labels = torch.roll(tokens, -1, dims=1)
        position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
        attn = torch.ones(2, 1, 16, 16, dtype=torch.bool).triu(1)
        loss = model(tokens, position_ids, attn, labels=labels).float().mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            if p.grad is None:
                continue
            group = dp if getattr(p, "allreduce", True) else edp
            dist.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)
        opt.step()
        value = loss.detach().clone()
        dist.all_reduce(value, group=dp)
        losses.append(value.item() / dist.get_world_size(dp))
    return {"losses": losses, "moe_types": moe_types, "state": init_state}


def _body(rank, topk, aux):
    import comet_megatron

    comet_megatron.enable()
    ref = _train(rank, "alltoall", None, STEPS, topk, aux)
    com = _train(rank, "comet", ref["state"], STEPS, topk, aux)
    return {"ref": ref["losses"], "com": com["losses"], "types": (ref["moe_types"], com["moe_types"])}


@pytest.mark.slow
@pytest.mark.parametrize("topk,aux", [(2, True), (1, False)])
def test_gpt_training_loss_matches_megatron(topk, aux):
    results = run_distributed(_body, 2, ep=2, topk=topk, aux=aux)
    for r in results:
        assert r["types"] == (["MoELayer"], ["CometMoELayer"]), r["types"]
        for step, (a, b) in enumerate(zip(r["com"], r["ref"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: comet {a} vs alltoall {b}"
        assert r["ref"][-1] < r["ref"][0], "training did not reduce the loss"
