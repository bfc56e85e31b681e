#!/usr/bin/env bash
# Create (or reuse) the cached venv and point it at this checkout.
#
#   ./scripts/bootstrap.sh          # prints the venv path on its last line
#
# The venv lives at ${COMET_VENV:-~/.cache/comet-megatron/venv-<hash of pyproject deps>}, so every
# clone with the same dependencies shares it (the first install downloads torch: ~10 minutes).
# Each run re-points the venv's editable install (`pip install --no-deps -e .`) at the checkout it
# is run from, unless it already points there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

log() { echo "bootstrap: $*" >&2; }

PY="$(comet_find_python)"
VENV="$(comet_venv_path)"
HASH="$(comet_deps_hash "$PY")"
MARKER="$VENV/.comet-deps-$HASH"
mkdir -p "$(dirname "$VENV")"

# one bootstrap at a time per venv (clones share it)
exec 9>"$VENV.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if [[ ! -f "$MARKER" ]]; then
    log "installing dependencies into $VENV (first time: downloads torch, ~10 minutes)"
    mapfile -t REQS < <(comet_requirements "$PY")
    "$VPY" -m pip install --disable-pip-version-check --upgrade pip >&2
    "$VPY" -m pip install --disable-pip-version-check "${REQS[@]}" >&2
    touch "$MARKER"
else
    log "dependencies already installed in $VENV"
fi

# Does the venv's comet_megatron (and its mapped kernels/ and patches/) come from this checkout?
points_here() {
    "$VPY" - "$COMET_ROOT" <<'PYEOF' 2>/dev/null
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
want = {"comet_megatron": "comet_megatron", "comet_megatron.kernels": "kernels",
        "comet_megatron.patches": "patches"}
for name, folder in want.items():
    spec = importlib.util.find_spec(name)
    origin = os.path.realpath(spec.origin) if spec and spec.origin else ""
    if os.path.dirname(origin) != os.path.join(root, folder):
        sys.exit(1)
PYEOF
}

if points_here; then
    log "editable install already points at $COMET_ROOT"
else
    log "pointing the editable install at $COMET_ROOT"
    "$VPY" -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e "$COMET_ROOT" >&2
    points_here || { log "error: comet_megatron still does not import from $COMET_ROOT"; exit 1; }
fi
log "ready: $VENV"
echo "$VENV"
