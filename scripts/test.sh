#!/usr/bin/env bash
# Set up the venv if needed (scripts/bootstrap.sh), then run every test that needs no GPU.
#   ./scripts/test.sh [PYTEST ARGS]     e.g. ./scripts/test.sh -m "not gpu and not slow"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
VENV="$(bash "$COMET_ROOT/scripts/bootstrap.sh" | tail -n 1)"
cd "$COMET_ROOT"
exec "$VENV/bin/python" -m pytest -m "not gpu" -ra "$@"
