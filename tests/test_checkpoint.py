"""Distributed checkpoints move between Megatron's experts and comet's, both ways.

Save a MoE layer built with Megatron's alltoall dispatcher + SequentialMLP, load it into a comet
layer initialised differently: outputs equal. Then save from comet and load into a fresh Megatron
layer. Plain (non-distributed) state dicts carry the same names too.
"""

from __future__ import annotations

from mp import run_distributed


def _body(rank, ckpt_root):
    import os

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    import comet_megatron
    from moe_cases import make_config, make_input, rel_err

    comet_megatron.enable()
    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)

    def build(dispatcher, seed):
        torch.manual_seed(seed)
        return spec.submodules.mlp(config=make_config(dispatcher))

    def save(layer, name):
        path = os.path.join(ckpt_root, name)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(layer.sharded_state_dict(prefix="moe."), path)
        dist.barrier()
        return path

    def load(layer, path):
        state = dist_checkpointing.load(layer.sharded_state_dict(prefix="moe."), path)
        layer.load_state_dict({k[len("moe."):]: v for k, v in state.items()}, strict=True)

    x = make_input(8, 2, 16, seed=rank)
    ref = build("alltoall", 1)
    com = build("comet", 2)
    assert type(com).__name__ == "CometMoELayer"
    before = rel_err(com(x)[0].detach(), ref(x)[0].detach())
    load(com, save(ref, "from_megatron"))
    forward_err = rel_err(com(x)[0].detach(), ref(x)[0].detach())

    com2 = build("comet", 3)
    ref2 = build("alltoall", 4)
    load(ref2, save(com2, "from_comet"))
    backward_err = rel_err(ref2(x)[0].detach(), com2(x)[0].detach())
    same_names = sorted(ref.state_dict()) == sorted(com.state_dict())
    return {"before": before, "m2c": forward_err, "c2m": backward_err, "names": same_names}


def test_distributed_checkpoint_round_trip(tmp_path):
    results = run_distributed(_body, 2, ep=2, ckpt_root=str(tmp_path))
    for r in results:
        assert r["names"], "comet layer's state-dict keys differ from Megatron's"
        assert r["before"] > 1e-2, "differently initialised layers should differ before loading"
        assert r["m2c"] == 0.0, f"Megatron -> comet checkpoint: outputs differ by {r['m2c']}"
        assert r["c2m"] == 0.0, f"comet -> Megatron checkpoint: outputs differ by {r['c2m']}"
