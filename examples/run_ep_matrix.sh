#!/usr/bin/env bash
# The expert-parallel benchmark matrix on one N-GPU host, in about 10 minutes, into one folder.
#
#   examples/run_ep_matrix.sh [OUT_DIR]            (default: ep-results/<UTC date-time>)
#
# Stage 1 (layer): torchrun, one process per GPU, EP = GPU count: Megatron alltoall + SequentialMLP,
#   Megatron alltoall + comet grouped experts, comet fused, T_compute and T_comm on the same routing,
#   for Mixtral-8x7B / Qwen2-MoE / Phi-3.5-MoE shapes at 2048..16384 tokens per rank
#   -> OUT/ep.json, OUT/ep.png, OUT/layer.log (table)
# Stage 2 (end to end): comet-megatron pretrain --config configs/qwen2-moe-a2.7b-4l.yaml --steps 20
#   with dispatcher comet, alltoall, alltoall + --overlap-moe-expert-parallel-comm
#   -> OUT/e2e.json (tokens/s, loss curves, speedups), OUT/e2e_loss.png, OUT/e2e-*.log
#
# Knobs (environment): PYTHON (default: the bootstrap venv, else python3), NPROC (default: GPU count),
#   SHAPES, TOKENS, VARIANTS, STEPS (20), E2E_RUNS, E2E_CONFIG, SKIP_E2E=1, BUDGET_S (total, 570),
#   LAYER_BUDGET_S (stage 1 share, 300), COMET_TRANSPORT (auto).
#   CPU_SMOKE=1: no GPU needed; tests this script's plumbing only (2 gloo processes, tiny shape,
#   configs/tiny.yaml for 4 steps): its numbers mean nothing.
# NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are
# forced here, whatever the caller's environment says.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    # shellcheck source=../scripts/_env.sh
    if source "$ROOT/scripts/_env.sh" 2>/dev/null; then PYTHON="$(comet_run_python)"; fi
fi

SMOKE_ARGS=()
if [[ "${CPU_SMOKE:-0}" == "1" ]]; then
    NPROC="${NPROC:-2}"
    SMOKE_ARGS=(--cpu-smoke)
    TOKENS="${TOKENS:-16}"
    SHAPES="${SHAPES:-smoke}"   # ignored by --cpu-smoke (tiny built-in shape)
    E2E_CONFIG="${E2E_CONFIG:-configs/tiny.yaml}"
    STEPS="${STEPS:-4}"
    E2E_RUNS="${E2E_RUNS:-comet alltoall}"
    BUDGET_S="${BUDGET_S:-900}"
fi
if [[ -z "${NPROC:-}" ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "run_ep_matrix: nvidia-smi not found; this script needs NVIDIA GPUs (set NPROC to override)." >&2
        exit 2
    fi
    NPROC="$(nvidia-smi -L | wc -l)"
fi
if [[ "$NPROC" -lt 1 ]]; then
    echo "run_ep_matrix: no GPU visible." >&2
    exit 2
fi

OUT="${1:-ep-results/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
# Qwen2-MoE first: where overlap matters most, so a run cut short by the budget still has it
SHAPES="${SHAPES:-qwen2-moe-a2.7b mixtral-8x7b phi-3.5-moe}"
TOKENS="${TOKENS:-2048 4096 8192 16384}"
VARIANTS="${VARIANTS:-megatron megatron+grouped megatron+ep-overlap comet-fused}"
STEPS="${STEPS:-20}"
E2E_CONFIG="${E2E_CONFIG:-configs/qwen2-moe-a2.7b-4l.yaml}"
E2E_RUNS="${E2E_RUNS:-comet alltoall alltoall+ep-overlap}"
BUDGET_S="${BUDGET_S:-570}"
LAYER_BUDGET_S="${LAYER_BUDGET_S:-300}"
COMET_TRANSPORT="${COMET_TRANSPORT:-auto}"
[[ ${#SMOKE_ARGS[@]} -gt 0 ]] && COMET_TRANSPORT="${COMET_TRANSPORT_SMOKE:-cuda_ipc}"
TORCHRUN=("$PYTHON" -m torch.distributed.run)   # = torchrun, from the same Python

{
    echo "run_ep_matrix: $(date -u '+%Y-%m-%d %H:%M:%S UTC') host $(hostname) nproc $NPROC"
    echo "  python $PYTHON; commit $(git rev-parse --short HEAD 2>/dev/null || echo "${COMET_COMMIT:-unknown}")"
    echo "  NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
    nvidia-smi -L 2>/dev/null || true
} | tee "$OUT/run.txt"

START=$SECONDS
status=0

# ---------------------------------------------------------------- stage 1: the layer matrix
echo "== stage 1: MoE layer, EP=$NPROC ($SHAPES; tokens $TOKENS)" | tee -a "$OUT/run.txt"
# --budget-s stops starting new token counts in time; `timeout` is the hard stop behind it
# shellcheck disable=SC2086
timeout --kill-after=20 $((LAYER_BUDGET_S + 90)) \
    "${TORCHRUN[@]}" --standalone --nproc-per-node "$NPROC" -m comet_megatron.bench_ep \
    --shapes $SHAPES --tokens $TOKENS --variants $VARIANTS --comet-transport "$COMET_TRANSPORT" \
    --budget-s "$LAYER_BUDGET_S" --out "$OUT" "${SMOKE_ARGS[@]}" 2>&1 | tee "$OUT/layer.log"
rc=${PIPESTATUS[0]}
echo "stage 1 exit code $rc after $((SECONDS - START)) s" | tee -a "$OUT/run.txt"
[[ $rc -ne 0 ]] && status=1

# ---------------------------------------------------------------- stage 2: end to end
if [[ "${SKIP_E2E:-0}" != "1" ]]; then
    left=$((BUDGET_S - (SECONDS - START)))
    read -r -a runs <<<"$E2E_RUNS"
    per_run=$((left / ${#runs[@]}))
    if [[ $per_run -lt 60 ]]; then per_run=60; fi
    echo "== stage 2: pretrain $E2E_CONFIG, $STEPS steps, runs: $E2E_RUNS (<= ${per_run} s each)" \
        | tee -a "$OUT/run.txt"
    "$PYTHON" -m comet_megatron.bench_ep e2e --config "$E2E_CONFIG" --steps "$STEPS" \
        --nproc "$NPROC" --runs "${runs[@]}" --timeout-s "$per_run" --out "$OUT" \
        -- --expert-model-parallel-size "$NPROC" 2>&1 | tee "$OUT/e2e.log"
    rc=${PIPESTATUS[0]}
    echo "stage 2 exit code $rc after $((SECONDS - START)) s" | tee -a "$OUT/run.txt"
    [[ $rc -ne 0 ]] && status=1
fi

echo "results in $OUT:" | tee -a "$OUT/run.txt"
ls -1 "$OUT" | sed 's/^/  /' | tee -a "$OUT/run.txt"
exit $status
