"""Launch the comet-megatron GPT MoE pretraining job with torchrun yourself.

One process per GPU, NCCL, the comet dispatcher; every Megatron argument is accepted:

    torchrun --nproc-per-node 8 examples/pretrain_gpt_comet.py \
        --num-layers 4 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 \
        --group-query-attention --num-query-groups 8 --seq-length 4096 \
        --max-position-embeddings 32768 --position-embedding-type rope --normalization RMSNorm \
        --swiglu --disable-bias-linear --untie-embeddings-and-output-weights --vocab-size 32000 \
        --num-experts 8 --moe-ffn-hidden-size 14336 --moe-router-topk 2 \
        --moe-token-dispatcher-type comet --comet-transport symm_mem \
        --expert-model-parallel-size 8 --bf16 --micro-batch-size 1 --global-batch-size 16 \
        --train-iters 20 --lr 3e-4 --mock-data --tokenizer-type NullTokenizer

`comet-megatron pretrain --config configs/<name>.yaml --dry-run` prints such a command for a config.
Without a GPU the same script runs on CPU processes over gloo.
"""

from comet_megatron.pretrain import main

if __name__ == "__main__":
    main()
