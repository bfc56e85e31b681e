"""Main job: GPT MoE pretraining with `megatron.training.pretrain` on mock data.

Launch one process per GPU (or per CPU rank) with torchrun; every Megatron argument is accepted,
plus the `--comet-*` flags:

    torchrun --nproc-per-node 8 -m comet_megatron.pretrain \\
        --num-layers 4 --hidden-size 4096 ... --moe-token-dispatcher-type comet --mock-data

`comet-megatron pretrain --config configs/<name>.yaml` builds such a command line from a YAML.

The model is Megatron's `GPTModel` with the Transformer Engine spec when TE is importable and
`--transformer-impl transformer_engine`, else the local spec. MoE layers whose
`moe_token_dispatcher_type` is `comet` are built by `comet_megatron.integration` once `enable()`
ran. Without a GPU the CPU shims of `comet_megatron.patches.cpu_training` (and the MoE-layer
shims of `comet_megatron.patches.cpu`) are applied and the defaults switch to gloo
and CPU initialization.

Per step it prints loss, tokens/s and step time (a rich table row on a terminal, a plain line
otherwise), and at the end a summary (means leave out the first WARMUP_STEPS steps), including
one machine-readable line:
`COMET_SUMMARY {"steps": ..., "mean_tokens_per_s": ..., "final_loss": ...}`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from typing import Any, Sequence

import torch

logger = logging.getLogger("comet_megatron.pretrain")

SUMMARY_PREFIX = "COMET_SUMMARY "
WARMUP_STEPS = 2  # left out of the summary's means


# ---------------------------------------------------------------- environment
def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises more than ImportError when CUDA is missing
        return False
    return True


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def default_argv(argv: Sequence[str], cuda: bool) -> list[str]:
    """Fill in the launch defaults this entry needs; explicit user flags always win."""
    argv = list(argv)

    def add(flag: str, *value: str) -> None:
        if not _has_flag(argv, flag):
            argv.extend([flag, *value])

    if not _has_flag(argv, "--data-path") and not _has_flag(argv, "--mock-data"):
        argv.append("--mock-data")
    add("--tokenizer-type", "NullTokenizer")
    add("--eval-interval", "1000000")  # Megatron divides by it even with --eval-iters 0
    if not te_available():
        add("--transformer-impl", "local")
        # TE/APEX kernels: fused wgrad accumulation, persistent layer norm, rope, masked softmax
        for flag in ("--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
                     "--no-rope-fusion", "--no-masked-softmax-fusion"):
            if not _has_flag(argv, flag):
                argv.append(flag)
    if not cuda:
        add("--distributed-backend", "gloo")
        if not _has_flag(argv, "--use-cpu-initialization"):
            argv.append("--use-cpu-initialization")
        # the bias+activation / bias+dropout fusions are compiled for CUDA
        for flag in ("--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                     "--no-bias-dropout-fusion"):
            if not _has_flag(argv, flag):
                argv.append(flag)
    return argv


def apply_cpu_shims() -> bool:
    """Apply every CPU shim when no GPU is present; returns whether the run is on CPU."""
    if torch.cuda.is_available():
        return False
    from comet_megatron.patches import cpu_training

    return cpu_training.apply()  # includes the MoE layer's shims (patches/cpu.py)


# ---------------------------------------------------------------- model
def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    """Megatron `GPTModel` (MoE layers from the block spec) built from the global args."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine" and te_available()
    if args.num_experts:
        layer_spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=args.normalization,
            qk_l2_norm=args.qk_l2_norm, vp_stage=vp_stage,
        )
    elif use_te:
        layer_spec = get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=args.qk_layernorm, qk_l2_norm=args.qk_l2_norm
        )
    else:
        layer_spec = get_gpt_layer_local_spec(
            normalization=args.normalization, qk_layernorm=args.qk_layernorm,
            qk_l2_norm=args.qk_l2_norm,
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


# ---------------------------------------------------------------- data
def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Mock (or indexed, with --data-path) GPT datasets through Megatron's dataset builder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    cls = MockGPTDataset if config.mock else GPTDataset
    return BlendedMegatronDatasetBuilder(
        cls, train_val_test_num_samples, lambda: True, config
    ).build()


datasets_provider.is_distributed = True


def get_batch(data_iterator):
    """The next micro-batch on this rank (every rank reads its own; TP ranks read the same)."""
    from megatron.core import mpu

    if not (mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage()):
        return None, None, None, None, None
    data = next(data_iterator)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
             for k, v in data.items()}
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("attention_mask"),
            batch["position_ids"])


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-averaged LM loss, in Megatron's (sum, count) reporting format."""
    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, functools.partial(loss_func, loss_mask)


# ---------------------------------------------------------------- progress
class Progress:
    """Per-step loss / tokens/s / step time and the final summary (printed on the last rank)."""

    def __init__(self, tokens_per_step: int, total_steps: int, enabled: bool) -> None:
        self.tokens_per_step = tokens_per_step
        self.total_steps = total_steps
        self.enabled = enabled
        self.records: list[dict[str, float]] = []
        self._console = None
        if enabled and sys.stdout.isatty():
            try:
                from rich.console import Console

                self._console = Console()
            except ImportError:
                self._console = None

    def step(self, iteration: int, loss: float, step_time_s: float) -> None:
        tokens_per_s = self.tokens_per_step / step_time_s if step_time_s > 0 else float("nan")
        rec = {"step": iteration, "loss": loss, "step_time_s": step_time_s,
               "tokens_per_s": tokens_per_s}
        self.records.append(rec)
        if not self.enabled:
            return
        if self._console is not None:
            self._console.print(
                f"[bold]step {iteration:>5}/{self.total_steps}[/bold]  loss [cyan]{loss:8.4f}"
                f"[/cyan]  [green]{tokens_per_s:10.1f}[/green] tokens/s  "
                f"step {step_time_s * 1000:8.1f} ms"
            )
        else:
            print(f"step {iteration}/{self.total_steps} loss {loss:.4f} tokens/s {tokens_per_s:.1f} "
                  f"step_time_ms {step_time_s * 1000:.1f}", flush=True)

    def summary(self) -> dict[str, Any]:
        # The first steps carry one-time work (allocations, Triton/JIT compilation, lazy init):
        # the means leave out up to WARMUP_STEPS of them, keeping at least one step.
        warmup = min(WARMUP_STEPS, max(len(self.records) - 1, 0))
        timed = self.records[warmup:]
        mean_tps = (sum(r["tokens_per_s"] for r in timed) / len(timed)) if timed else float("nan")
        mean_step = (sum(r["step_time_s"] for r in timed) / len(timed)) if timed else float("nan")
        final_loss = self.records[-1]["loss"] if self.records else float("nan")
        return {"steps": len(self.records), "warmup_steps": warmup,
                "mean_tokens_per_s": mean_tps, "mean_step_time_s": mean_step,
                "final_loss": final_loss, "tokens_per_step": self.tokens_per_step}

    def print_summary(self) -> dict[str, Any]:
        s = self.summary()
        if not self.enabled:
            return s
        if self._console is not None:
            from rich.table import Table

            table = Table(title="comet-megatron pretrain summary "
                                f"(means leave out {s['warmup_steps']} warm-up steps)")
            for col in ("steps", "mean tokens/s", "mean step time", "final loss"):
                table.add_column(col, justify="right")
            table.add_row(str(s["steps"]), f"{s['mean_tokens_per_s']:.1f}",
                          f"{s['mean_step_time_s'] * 1000:.1f} ms", f"{s['final_loss']:.4f}")
            self._console.print(table)
        else:
            print(f"summary: steps {s['steps']} mean tokens/s {s['mean_tokens_per_s']:.1f} "
                  f"mean step time {s['mean_step_time_s'] * 1000:.1f} ms "
                  f"final loss {s['final_loss']:.4f} "
                  f"(means leave out {s['warmup_steps']} warm-up steps)", flush=True)
        print(SUMMARY_PREFIX + json.dumps(s), flush=True)
        return s


# ---------------------------------------------------------------- entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse Megatron + comet arguments, pretrain, print the summary; returns the summary."""
    logging.basicConfig(level=os.environ.get("COMET_LOG_LEVEL", "WARNING"))
    if os.environ.get("RANK", "0") == "0" and "COMET_LOG_LEVEL" not in os.environ:
        logging.getLogger("comet_megatron").setLevel(logging.INFO)  # which transport runs
    argv = list(sys.argv[1:] if argv is None else argv)
    on_cpu = apply_cpu_shims()
    argv = default_argv(argv, cuda=not on_cpu)

    from comet_megatron import integration
    from comet_megatron.patches import megatron_training

    # Megatron parses sys.argv, here and again inside `pretrain` (ft_integration): it holds the
    # filled-in argv for the whole run. `enable()` makes every parse accept the comet flags.
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "comet_megatron.pretrain", *argv]
    integration.enable()
    restore_helpers = megatron_training.use_prebuilt_dataset_helpers()
    try:
        return _parse_and_pretrain()
    finally:
        restore_helpers()
        sys.argv = saved_argv


def _parse_and_pretrain() -> dict[str, Any]:
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.training import pretrain

    from comet_megatron.patches import megatron_training

    args = parse_and_validate_args()  # comet flags come from the hook enable() installed
    if args.moe_token_dispatcher_type == "comet":
        from comet_megatron import integration

        integration.enable(integration.config_from_args(args))

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # train_step's reduced loss lives on the last pipeline stage, i.e. the last rank
    progress = Progress(args.global_batch_size * args.seq_length, args.train_iters or 0,
                        enabled=(rank == world - 1))

    def on_step(iteration: int, loss_dict: dict, step_time_s: float) -> None:
        loss = loss_dict.get("lm loss")
        progress.step(iteration, float(loss) if loss is not None else float("nan"), step_time_s)

    restore_observer = megatron_training.observe_train_steps(on_step)
    try:
        pretrain(pretrain_cfg_container_from_args(args), datasets_provider,
                 ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)
    finally:
        restore_observer()
    summary = progress.print_summary()
    if progress.enabled and not math.isfinite(summary["final_loss"]):
        logger.warning("final loss is not finite: %s", summary["final_loss"])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
