#!/usr/bin/env bash
# One GPU: the measurements behind the README's status figures, into one folder (about 25 minutes on an H100).
#
#   examples/reproduce_single_gpu.sh [OUT_DIR]        (default: single-gpu-results/<UTC date-time>)
#
# Stage 1 (layer): the MoE layer under Megatron's DDP, EP=1, every variant (Megatron alltoall + SequentialMLP,
#   alltoall + comet's grouped experts, comet reference / fused, the expert GEMMs alone) for Mixtral-8x7B,
#   Qwen2-MoE and Phi-3.5-MoE shapes at 2048-16384 tokens; forward, forward+backward as a later micro-batch and
#   as a step's first one (gradients just zeroed)  -> OUT/layer-<shape>/bench.{json,png}, OUT/layer-<shape>.log
# Stage 2 (kernels): each fused kernel alone vs cuBLAS and vs the unfused pipeline, world size 1
#   -> OUT/kernels/..., OUT/kernels.log
# Stage 2b (weight gradients): examples/bench_wgrad.py --rows routed, the expert weight gradients added into fp32
#   main_grad (cuBLAS per expert, grouped GEMM + add, the Triton and Gluon kernels) and written as a fresh bf16
#   gradient (cuBLAS's grouped GEMM, the Triton and Gluon backends)  -> OUT/wgrad-{main-grad,bf16}.{json,log}
# Stage 3 (end to end): comet-megatron pretrain on configs/qwen2-moe-a2.7b-4l.yaml, one process, comet vs
#   alltoall (tokens/s medians, loss curves)  -> OUT/e2e/e2e.{json,png}, OUT/e2e.log
#
# Knobs (environment): PYTHON (default: the bootstrap venv, else python3), SHAPES, TOKENS, E2E_STEPS (12),
#   SKIP_LAYER=1, SKIP_KERNELS=1, SKIP_WGRAD=1, SKIP_E2E=1, DRY_RUN=1 (print the commands, run nothing).
# Several GPUs of one host: examples/run_ep_matrix.sh.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    # shellcheck source=../scripts/_env.sh
    if source "$ROOT/scripts/_env.sh" 2>/dev/null; then PYTHON="$(comet_run_python)"; fi
fi
SHAPES="${SHAPES:-mixtral-8x7b qwen2-moe-a2.7b phi-3.5-moe}"
TOKENS="${TOKENS:-2048 4096 8192 16384}"
OUT="${1:-single-gpu-results/$(date -u +%Y%m%d-%H%M%S)}"
read -r -a shapes <<<"$SHAPES"
read -r -a tokens <<<"$TOKENS"

run() {  # run "$@" (a comet-megatron subcommand) with its output in LOG; DRY_RUN=1 prints it instead
    local log="$1"; shift
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        echo "+ $PYTHON -m comet_megatron.cli $*"
        return 0
    fi
    echo "== comet-megatron $*  (log: $log)"
    "$PYTHON" -m comet_megatron.cli "$@" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}

run_py() {  # run "$@" (a script of this repository and its arguments) with its output in LOG; DRY_RUN=1 prints it
    local log="$1"; shift
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        echo "+ $PYTHON $*"
        return 0
    fi
    echo "== $*  (log: $log)"
    "$PYTHON" "$@" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}

if [[ "${DRY_RUN:-0}" != "1" ]]; then
    SMI="${NVIDIA_SMI:-nvidia-smi}"
    if ! command -v "$SMI" >/dev/null 2>&1 || ! "$SMI" -L >/dev/null 2>&1; then
        echo "reproduce_single_gpu: no NVIDIA GPU here (DRY_RUN=1 prints the commands)." >&2
        exit 2
    fi
    mkdir -p "$OUT"
fi
failed=0
if [[ "${SKIP_LAYER:-0}" != "1" ]]; then
    for shape in "${shapes[@]}"; do  # one process per shape: each starts with an empty allocator
        run "$OUT/layer-$shape.log" bench layer --ddp --shapes "$shape" --tokens "${tokens[@]}" \
            --modes fwd fwd+bwd fwd+bwd:first --out "$OUT/layer-$shape" || failed=1
    done
fi
if [[ "${SKIP_KERNELS:-0}" != "1" ]]; then
    run "$OUT/kernels.log" bench kernels --world 1 --tokens 2048 8192 --shapes "${shapes[@]}" \
        --out "$OUT/kernels" || failed=1
fi
if [[ "${SKIP_WGRAD:-0}" != "1" ]]; then
    run_py "$OUT/wgrad-main-grad.log" examples/bench_wgrad.py --rows routed --ws-configs '[{}]' \
        --shapes "${shapes[@]}" --tokens "${tokens[@]}" --out "$OUT/wgrad-main-grad.json" || failed=1
    run_py "$OUT/wgrad-bf16.log" examples/bench_wgrad.py --rows routed --target bf16 --ws-configs '[{}]' \
        --shapes "${shapes[@]}" --tokens "${tokens[@]}" --out "$OUT/wgrad-bf16.json" || failed=1
fi
if [[ "${SKIP_E2E:-0}" != "1" ]]; then
    run "$OUT/e2e.log" bench ep e2e --config configs/qwen2-moe-a2.7b-4l.yaml --steps "${E2E_STEPS:-12}" --nproc 1 \
        --runs comet alltoall --out "$OUT/e2e" -- --expert-model-parallel-size 1 || failed=1
fi
if [[ "${DRY_RUN:-0}" != "1" ]]; then
    echo "reproduce_single_gpu: results in $OUT$([[ $failed == 1 ]] && echo ' (a stage failed: see its log)')"
fi
exit "$failed"
