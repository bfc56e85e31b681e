#!/usr/bin/env bash
# Run the main job (configs/tiny.yaml by default) with the venv made by scripts/bootstrap.sh.
#   ./scripts/run-main.sh [--config configs/<name>.yaml] [--steps N] [--nproc N] [-- MEGATRON ARGS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
VENV="$(comet_venv_path)"
if [[ ! -x "$VENV/bin/comet-megatron" ]]; then
    echo "run-main: no venv at $VENV; run ./scripts/bootstrap.sh first." >&2
    exit 1
fi
cd "$COMET_ROOT"
args=("$@")
if [[ " ${args[*]-} " != *" --config "* && " ${args[*]-} " != *" --config="* ]]; then
    args=(--config configs/tiny.yaml "${args[@]}")
fi
exec "$VENV/bin/comet-megatron" pretrain "${args[@]}"
